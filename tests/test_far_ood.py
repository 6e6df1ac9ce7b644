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
