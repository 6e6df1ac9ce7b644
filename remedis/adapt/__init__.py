"""Stage 3 — adapt: data-efficient fine-tuning of a backbone to a new site, with calibration, the
operating point, the OOD detector and the input contract: a model folder that is ready to serve."""

from remedis.adapt.calibration import Calibration, fit_temperature
from remedis.adapt.finetune import fine_tune
from remedis.adapt.model import AdaptedModel

__all__ = ["AdaptedModel", "Calibration", "fine_tune", "fit_temperature"]
