"""Stage 3 — adapt: data-efficient fine-tuning of a backbone to a new site, with calibration."""

from remedis.adapt.calibration import expected_calibration_error, fit_temperature
from remedis.adapt.finetune import fine_tune
from remedis.adapt.model import AdaptedModel

__all__ = ["AdaptedModel", "fine_tune", "fit_temperature", "expected_calibration_error"]
