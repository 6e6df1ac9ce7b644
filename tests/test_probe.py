import pytest
import torch

from remedis.data import Preprocessing, Record
from remedis.data.dataset import ImageCache
from remedis.evaluate.probe import linear_probe_auroc


def _cache(n: int, seed: int) -> ImageCache:
    g = torch.Generator().manual_seed(seed)
    labels = ["a" if i % 2 else "b" for i in range(n)]
    pixels = torch.rand(n, 1, 32, 32, generator=g) * 0.3
    for i, lab in enumerate(labels):
        if lab == "b":
            pixels[i, :, 8:24, 8:24] += 0.6  # a bright square: linearly visible in random features
    records = [Record(image=f"{i}.png", label=lab, site="s", patient_id=str(i)) for i, lab in enumerate(labels)]
    return ImageCache(records=records, pixels=pixels.clamp(0, 1), preprocessing=Preprocessing(32))


class PatchMeans(torch.nn.Module):
    """A fixed 'backbone' whose embedding is the mean of each 8x8 patch: the square is linearly visible."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward_features(self, x):
        return torch.nn.functional.avg_pool2d(x, 8) * self.scale

    def forward_head(self, x):
        return x.flatten(1)


def test_linear_probe_separates_a_visible_class_and_refuses_one_class():
    backbone = PatchMeans()
    assert linear_probe_auroc(backbone, _cache(60, 0), _cache(40, 1), ["a", "b"], 1) > 0.95
    # scored for the class asked for: class 0 as positive ranks just as well
    flipped = linear_probe_auroc(backbone, _cache(60, 0), _cache(40, 1), ["a", "b"], 0)
    assert flipped > 0.95
    one_class = _cache(10, 2).subset(lambda r: r.label == "a")
    with pytest.raises(ValueError, match="only class"):
        linear_probe_auroc(backbone, one_class, _cache(10, 3), ["a", "b"], 1)
