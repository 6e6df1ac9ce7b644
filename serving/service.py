"""BentoML service: a PNG, JPEG or DICOM upload in, calibrated class probabilities out.

The model is chosen at build or serve time (`--arg model=<store tag>`, or REMEDIS_MODEL), loaded once
per worker in `__init__`; all image logic lives in `remedis` (the same reader and preprocessing as
training), so this file stays thin.

    bentoml serve serving.service:RemedisService --arg model=remedis-quickstart:latest
    curl -F image=@scan.dcm http://localhost:3000/predict
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
from bentoml.exceptions import InvalidArgument

from remedis.adapt.model import AdaptedModel
from remedis.data.readers import ImageReadError, read_image_bytes

MAX_UPLOAD_BYTES = 64 * 1024 * 1024

_args = bentoml.use_arguments()
MODEL_TAG = getattr(_args, "model", None) or os.environ.get("REMEDIS_MODEL", "remedis-quickstart:latest")


@bentoml.service(resources={"cpu": "1"}, traffic={"timeout": 60})
class RemedisService:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.model = AdaptedModel.load(self.model_ref.path)
        self.tag = str(self.model_ref.tag)

    @bentoml.api
    def predict(self, image: Path) -> dict:
        """Class probabilities (temperature-calibrated) for one uploaded image."""
        data = image.read_bytes()
        if len(data) > MAX_UPLOAD_BYTES:
            raise InvalidArgument(f"upload is larger than {MAX_UPLOAD_BYTES} bytes")
        try:
            pixels = read_image_bytes(data, name=image.name)
        except ImageReadError as exc:
            # The reader's message names the upload and the reason; the temp path is not the client's business.
            raise InvalidArgument(f"cannot read image: {str(exc).split(': ', 1)[-1]}") from None
        probs = self.model.predict_images([pixels])["probs"][0]
        best = int(probs.argmax())
        return {
            "probabilities": {c: float(p) for c, p in zip(self.model.class_names, probs)},
            "label": self.model.class_names[best],
            "model": self.tag,
        }

    @bentoml.api
    def metadata(self) -> dict:
        """Model card: classes, preprocessing, calibration, provenance hashes, report summary."""
        card = Path(self.model_ref.path) / "model_card.json"
        import json

        return {"model": self.tag, **(json.loads(card.read_text()) if card.is_file() else {})}
