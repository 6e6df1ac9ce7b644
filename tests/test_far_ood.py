"""Far-OOD sets of `remedis evaluate --far-ood`: one per manifest, each with its own name."""

from __future__ import annotations

import pytest


def test_far_ood_sets_keep_one_name_each(tmp_path):
    """Two far-OOD manifests in one folder are two sets (they used to overwrite each other); a repeat is refused."""
    from PIL import Image

    from remedis.data.preprocess import Preprocessing
    from remedis.evaluate.evaluation import load_far_ood

    folder = tmp_path / "ct"
    folder.mkdir()
    for name, shade in (("a.png", 40), ("b.png", 200)):
        Image.new("L", (16, 16), shade).save(folder / name)
    for m in ("brain", "chest"):
        (folder / f"{m}.csv").write_text(f"image,label,site,patient_id\na.png,x,{m},p1\nb.png,x,{m},p2\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "m.csv").write_text(f"image,label,site,patient_id\n{folder / 'a.png'},x,o,p1\n")
    sets = load_far_ood([folder / "brain.csv", folder / "chest.csv", tmp_path / "other" / "m.csv"], Preprocessing(16))
    assert sorted(sets) == ["ct/brain", "ct/chest", "other"] and [len(v) for v in sets.values()] == [2, 2, 1]
    with pytest.raises(ValueError, match="is given more than once"):
        load_far_ood([folder / "brain.csv", folder / "brain.csv"], Preprocessing(16))


def test_a_test_only_manifest_scores_far_ood_with_the_stored_detector():
    """A new site's manifest with test images only (no train split): `--far-ood` sets are scored with the
    model's stored detector and the scores that need no state, instead of being skipped."""
    import numpy as np
    import torch

    from remedis.adapt.model import AdaptedModel
    from remedis.adapt.ood import fit_model_detector
    from remedis.data.dataset import ImageCache
    from remedis.data.manifest import Record
    from remedis.data.preprocess import Preprocessing
    from remedis.evaluate.evaluation import EvalInputs, evaluate_adapted
    from remedis.models import Classifier

    def cache(n, level, site, seed):
        g = torch.Generator().manual_seed(seed)
        px = (level + 0.1 * torch.rand(n, 1, 16, 16, generator=g)).clamp(0, 1)
        recs = [Record(__import__("pathlib").Path(f"/x/{site}{i}.png"), ["a", "b"][i % 2], site, f"{site}{i}") for i in range(n)]
        return ImageCache(recs, px.half(), Preprocessing(16))

    torch.manual_seed(0)
    model = AdaptedModel(Classifier("resnet18", 2), ["a", "b"], Preprocessing(16), positive_index=1)
    detector = fit_model_detector(model, cache(24, 0.3, "t", 0), cache(12, 0.3, "t", 1), "mahalanobis", 0.95)
    far = {"noise-ct": cache(10, 0.9, "ct", 2)}
    entry = evaluate_adapted(model, EvalInputs(test=cache(12, 0.3, "t", 3), target_site="t", roles={"t": "target"},
                                               far_ood=far), n_boot=0, detector=detector)
    ood = entry["ood"]
    assert "stored detector state (mahalanobis)" in ood["note"]
    assert set(ood["sets"]["noise-ct"]["methods"]) == {"mahalanobis", "msp", "max_logit", "energy"}
    assert np.isfinite(ood["sets"]["noise-ct"]["methods"]["mahalanobis"]["auroc"])
    alone = evaluate_adapted(model, EvalInputs(test=cache(12, 0.3, "t", 3), target_site="t", roles={"t": "target"},
                                               far_ood=far), n_boot=0)
    assert alone["ood"]["note"].startswith("no target-site train images and no stored OOD detector")
