"""The on-disk decode cache: a second load does not decode, keys follow content and preprocessing,
damaged entries are rebuilt, and worker processes give the same pixels."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import remedis.data.cache as cache_mod
from remedis.data import Preprocessing, Record, load_images


@pytest.fixture
def records(tmp_path):
    out = []
    for i in range(4):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 30), dtype=np.uint8)).save(p)
        out.append(Record(p, "a", "s", f"p{i}"))
    dcm = tmp_path / "img" / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), dcm)
    out.append(Record(dcm, "b", "s", "p9"))
    return out


def count_decodes(monkeypatch) -> list:
    calls = []
    real = cache_mod.decode

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "decode", counting)
    return calls


def test_second_load_does_not_decode_and_matches(records, tmp_path, monkeypatch):
    pre = Preprocessing(16)
    plain = load_images(records, pre)
    calls = count_decodes(monkeypatch)
    first = load_images(records, pre, cache_dir=tmp_path / "c")
    assert len(calls) == 5
    second = load_images(records, pre, cache_dir=tmp_path / "c")
    assert len(calls) == 5  # every image came from the cache
    assert torch.equal(first.pixels, plain.pixels) and torch.equal(second.pixels, plain.pixels)
    assert second.pixels.dtype == torch.float16 and [r.image for r in second.records] == [r.image for r in records]


def test_keys_follow_content_and_preprocessing(records, tmp_path, monkeypatch):
    calls = count_decodes(monkeypatch)
    load_images(records, Preprocessing(16), cache_dir=tmp_path / "c")
    assert len(calls) == 5
    load_images(records, Preprocessing(24), cache_dir=tmp_path / "c")  # new size: new entries
    assert len(calls) == 10
    load_images(records, Preprocessing(16), cache_dir=tmp_path / "c", read_options={"window": "minmax"})
    assert len(calls) == 15  # reader options are part of the key too
    # Same bytes under another name: a content hit, no decode.
    copy = tmp_path / "copy.png"
    shutil.copy(records[0].image, copy)
    again = load_images([Record(copy, "a", "s", "p0")], Preprocessing(16), cache_dir=tmp_path / "c")
    assert len(calls) == 15 and again.pixels.shape == (1, 1, 16, 16)
    # The file is replaced by other content: decoded again, new pixels.
    before = load_images(records[:1], Preprocessing(16), cache_dir=tmp_path / "c").pixels
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(records[0].image)
    after = load_images(records[:1], Preprocessing(16), cache_dir=tmp_path / "c").pixels
    assert len(calls) == 16 and not torch.equal(before, after)
    assert torch.allclose(after.float(), torch.full_like(after.float(), 7 / 255), atol=1e-3)


def test_damaged_entry_is_rebuilt(records, tmp_path, monkeypatch):
    pre = Preprocessing(16)
    good = load_images(records, pre, cache_dir=tmp_path / "c").pixels
    for entry in Path(tmp_path / "c").glob("v*/*.npy"):
        entry.write_bytes(b"garbage")
    calls = count_decodes(monkeypatch)
    again = load_images(records, pre, cache_dir=tmp_path / "c").pixels
    assert len(calls) == 5 and torch.equal(good, again)


def test_workers_give_the_same_pixels(records, tmp_path):
    pre = Preprocessing(16)
    serial = load_images(records, pre)
    parallel = load_images(records, pre, num_workers=2, cache_dir=tmp_path / "c")
    assert torch.equal(serial.pixels, parallel.pixels)
    assert [r.image for r in parallel.records] == [r.image for r in serial.records]


def test_cached_load_with_workers_starts_no_worker(records, tmp_path, monkeypatch):
    import remedis.data.dataset as dataset_mod

    pre = Preprocessing(16)
    first = load_images(records, pre, num_workers=2, cache_dir=tmp_path / "c")

    def no_workers(*a, **k):
        raise AssertionError("workers started although every image is cached")

    monkeypatch.setattr(dataset_mod, "DataLoader", no_workers)
    again = load_images(records, pre, num_workers=2, cache_dir=tmp_path / "c")
    assert torch.equal(first.pixels, again.pixels)


def test_large_loads_are_stored_in_several_packs(records, tmp_path, monkeypatch):
    import remedis.data.dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "STORE_EVERY", 2)
    pre = Preprocessing(16)
    first = load_images(records, pre, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("v*/pack-*.npy"))) == 3  # 5 images: 2 + 2 + 1
    calls = count_decodes(monkeypatch)
    assert torch.equal(load_images(records, pre, cache_dir=tmp_path / "c").pixels, first.pixels) and calls == []


def test_subsets_are_index_views_not_copies():
    """Budgets, splits and per-site sets are views on one storage: a subset of a 64 MB cache allocates
    indices only, its images are the parent's (same memory), and views of views compose."""
    from remedis.data import ImageCache, LabeledDataset

    n = 2048
    recs = [Record(Path(f"{i}.png"), "ab"[i % 2], f"site{i % 4}", f"p{i}", split="train" if i % 3 else "test")
            for i in range(n)]
    pixels = torch.rand(n, 1, 128, 128).half()  # 64 MB
    cache = ImageCache(recs, pixels, Preprocessing(128))
    train = cache.subset(lambda r: r.split == "train")
    site = train.subset(lambda r: r.site == "site1")
    assert site.store is cache.store  # no pixel copy at any level
    assert site.index.numel() * site.index.element_size() < 8 * n
    naive = [i for i, r in enumerate(recs) if r.split == "train" and r.site == "site1"]  # the reference
    assert [r.image for r in site.records] == [recs[i].image for i in naive]
    assert torch.equal(site.pixels, pixels[naive])
    for k in (0, len(site) // 2, len(site) - 1):
        assert site.image(k).data_ptr() == pixels[naive[k]].data_ptr()
    x, y = LabeledDataset(site, ["a", "b"])[3]
    assert torch.equal(x, Preprocessing(128).normalize(pixels[naive[3]].float())) and int(y) == ["a", "b"].index(recs[naive[3]].label)
    with pytest.raises(ValueError, match="records"):
        ImageCache(recs[:3], pixels[:2], Preprocessing(128))
