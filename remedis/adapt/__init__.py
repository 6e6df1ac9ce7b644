"""Stage 3 — adapt: data-efficient fine-tuning of a backbone to a new site, with calibration, the
operating point, the OOD detector and the input contract: a model folder that is ready to serve.

The names below load on first use, so that what serving needs (`remedis.adapt.calibration`, `.model`)
does not import the training stack (Lightning) with them."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"AdaptedModel": "remedis.adapt.model", "Calibration": "remedis.adapt.calibration",
          "fit_temperature": "remedis.adapt.calibration", "fine_tune": "remedis.adapt.finetune"}

__all__ = ["AdaptedModel", "Calibration", "fine_tune", "fit_temperature"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'remedis.adapt' has no attribute {name!r}")
