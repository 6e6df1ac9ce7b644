"""Colour end to end: RGB pixels reach the network, grey stays one channel, aspect handling, channel
detection, colour augmentations, external RGB weights, the input contract, and a tiny SimCLR ->
fine-tune -> serve run on a 3-channel cache whose served probabilities equal the offline ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from remedis.config import RunConfig
from remedis.data.dataset import load_images
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.training.transforms import FineTuneAugment, RandColourJitter, RandGrayscale, SimCLRAugment

# Red and green of (almost) equal luminance: a grey reader cannot tell them apart, a colour one can.
RED, GREEN = (196, 0, 0), (0, 100, 0)
CLASSES = ["green", "red"]


def _write(path: Path, rgb, size=(20, 20), noise: int = 0, seed: int = 0) -> Path:
    h, w = size
    arr = np.broadcast_to(np.array(rgb, np.int16), (h, w, 3)).copy()
    if noise:
        arr += np.random.default_rng(seed).integers(-noise, noise + 1, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    img.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG", **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def _grey(path: Path, value=128, size=(20, 20)) -> Path:
    Image.fromarray(np.full(size, value, np.uint8), "L").save(path, format="PNG")
    return path


def _rec(path: Path, label: str = "", patient: str | None = None, site: str = "s") -> Record:
    return Record(path, label, site, patient or path.stem)


def test_colour_reaches_the_network(tmp_path):
    from remedis.models import create_backbone

    recs = [_rec(_write(tmp_path / "red.png", RED)), _rec(_write(tmp_path / "green.png", GREEN))]
    grey = load_images(recs, Preprocessing(16, in_chans=1, channels=1)).pixels.float()
    assert (grey[0] - grey[1]).abs().max() <= 1 / 255 + 1e-3  # equal luminance: grey sees one image twice
    pre = Preprocessing(16, in_chans=3, channels=3, aspect="pad")
    cache = load_images(recs, pre)
    px = cache.pixels.float()
    assert px.shape == (2, 3, 16, 16)
    assert torch.allclose(px[0, 0], torch.full((16, 16), 196 / 255), atol=2e-3) and px[0, 1:].max() < 2e-3
    assert torch.allclose(px[1, 1], torch.full((16, 16), 100 / 255), atol=2e-3) and px[1, [0, 2]].max() < 2e-3
    torch.manual_seed(0)
    net = create_backbone("resnet18", in_chans=3).eval()
    with torch.no_grad():
        emb = net(pre.normalize(px))
    assert emb.shape[0] == 2 and (emb[0] - emb[1]).abs().max() > 1e-3


def test_grey_stays_one_channel_unless_the_model_asks_for_three(tmp_path):
    rec = [_rec(_grey(tmp_path / "g.png", 100))]
    one = load_images(rec, Preprocessing(16, in_chans=1, channels=1))
    assert one.pixels.shape == (1, 1, 16, 16)
    pre3 = Preprocessing(16, in_chans=3, channels=1)  # RGB weights on grey data: stored once, repeated at the input
    three = load_images(rec, pre3)
    assert three.pixels.shape == (1, 1, 16, 16) and torch.equal(three.pixels, one.pixels)
    x = pre3.normalize(three.pixels.float())
    assert x.shape == (1, 3, 16, 16) and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    # a grey image in a colour corpus is repeated to three equal channels
    rgb = load_images(rec, Preprocessing(16, in_chans=3, channels=3)).pixels
    assert rgb.shape == (1, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_aspect_pad_crop_and_stretch():
    wide = np.zeros((100, 300), np.float32)  # 300 wide, 100 high: thirds 0, 0.5, 1 from left to right
    wide[:, 100:200], wide[:, 200:] = 0.5, 1.0
    pad = Preprocessing(30, aspect="pad").resize(wide)[0]
    assert pad.shape == (30, 30)
    assert pad[:10].abs().max() == 0 and pad[20:].abs().max() == 0  # black above and below the 1/3 band
    band = pad[10:20]
    assert band[:, :9].max() < 0.05 and abs(float(band[:, 11:19].mean()) - 0.5) < 0.02 and band[:, 21:].min() > 0.95
    crop = Preprocessing(30, aspect="crop").resize(wide)[0]
    assert torch.allclose(crop[:, 1:-1], torch.full((30, 28), 0.5), atol=0.02)  # the centre third, nothing of the sides
    stretch = Preprocessing(30, aspect="stretch").resize(wide)[0]
    assert stretch[:, :9].max() < 0.05 and stretch[:, 21:].min() > 0.95  # whole width squeezed into 30 px
    old = torch.nn.functional.interpolate(torch.from_numpy(wide)[None, None], size=(30, 30), mode="bilinear",
                                          antialias=True, align_corners=False)[0, 0]
    assert torch.allclose(stretch, old.clamp(0, 1))


def test_resolve_channels_detects_a_colour_file_among_grey_ones(tmp_path):
    from remedis.stages import preprocessing_for, resolve_channels

    greys = [_rec(_grey(tmp_path / f"g{i}.png", 40 * i)) for i in range(4)]
    colour = _rec(_write(tmp_path / "c.jpg", (200, 40, 10)))
    cfg = resolve_channels(RunConfig(), greys[:2] + [colour] + greys[2:])
    assert (cfg.data.channels, cfg.model.in_chans) == (3, 3)
    assert preprocessing_for(cfg).channels == 3
    cfg = resolve_channels(RunConfig(), greys)
    assert (cfg.data.channels, cfg.model.in_chans) == (1, 1)
    rgb_weights = RunConfig()
    rgb_weights.model.in_chans = 3
    cfg = resolve_channels(rgb_weights, greys)
    assert (cfg.data.channels, cfg.model.in_chans) == (1, 3)


def _colourful(size=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size // 4, size // 4, generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)


@pytest.mark.parametrize("make", [lambda s: SimCLRAugment(24, seed=s, channels=3),
                                  lambda s: FineTuneAugment(24, seed=s, strength=2.0, channels=3)],
                         ids=["simclr", "finetune"])
def test_rgb_augment_shape_range_colour_and_determinism(make):
    x = _colourful()
    outs = [make(s)(x) for s in range(12)]
    for y in outs:
        assert y.shape == (3, 24, 24) and y.min() >= 0 and y.max() <= 1
    spread = [float((y - y.mean(0, keepdim=True)).abs().mean()) for y in outs]
    assert sum(v > 0.02 for v in spread) >= 8  # colour kept (grey only when grayscale is drawn)
    assert torch.equal(make(3)(x), make(3)(x)) and not torch.equal(make(3)(x), make(4)(x))
    aug = make(0)
    aug.reseed(11)
    a = aug(x)
    aug(x)
    aug.reseed(11)
    assert torch.equal(aug(x), a)  # the datasets' per-(seed, epoch, image) reseed covers the colour steps
    with pytest.raises(ValueError, match=r"channels=3\): expected a \(3, S, S\)"):
        aug(torch.rand(1, 24, 24))


def test_colour_steps_jitter_and_grayscale():
    x = _colourful(16, seed=1)
    grey = RandGrayscale(prob=1.0).set_random_state(0)(x)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.equal(RandGrayscale(prob=0.0).set_random_state(0)(x), x)
    hue = RandColourJitter(0, 0, 0, 0.5, prob=1.0).set_random_state(0)(x)
    assert hue.shape == x.shape and (hue - x).abs().max() > 0.05
    # SimCLR draws grayscale in about 1 of 5 views: some outputs are grey, most are not
    drawn = [SimCLRAugment(16, seed=s, channels=3) for s in range(40)]
    greys = sum(int((a(x).std(0).max() < 1e-6)) for a in drawn)
    assert 1 <= greys <= 16
    with pytest.raises(ValueError, match="channels must be 1"):
        SimCLRAugment(16, channels=2)


def test_external_rgb_weights_load_unchanged_into_an_rgb_backbone(tmp_path):
    from remedis.models import create_backbone
    from remedis.models.external import load_external_weights

    torch.manual_seed(0)
    src = create_backbone("resnet18", in_chans=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "rgb.pth")
    rgb = create_backbone("resnet18", in_chans=3)
    load_external_weights(rgb, tmp_path / "rgb.pth")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in rgb.state_dict().items())
    grey = create_backbone("resnet18", in_chans=1)
    load_external_weights(grey, tmp_path / "rgb.pth")  # as before: the RGB filters summed
    assert torch.allclose(grey.conv1.weight, src.conv1.weight.sum(1, keepdim=True), atol=1e-6)
    # grey weights into an RGB net: the filter spread over the channels, same output on a repeated grey image
    torch.save(grey.state_dict(), tmp_path / "grey.pth")
    back = create_backbone("resnet18", in_chans=3).eval()
    load_external_weights(back, tmp_path / "grey.pth")
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x.expand(1, 3, 32, 32)), grey.eval()(x), atol=1e-5)


def test_contract_statistics_of_colour_images():
    from remedis.data.contract import InputContract, SourceInfo, image_statistics

    g = torch.Generator().manual_seed(0)
    train = (0.3 + 0.4 * torch.rand(30, 1, 1, 1, generator=g)) * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
    train = (train + 0.05 * torch.rand(30, 3, 16, 16, generator=g)).clamp(0, 1)
    stats = image_statistics(train)
    assert stats["mean"].shape == (30,)  # one value per image (its luminance), not per channel
    src = SourceInfo("jpeg", None, "RGB", 3, 16, 16, 1)
    contract = InputContract.fit([src] * 30, train)
    assert contract.channels == [3]
    assert contract.check(src, train[0]) == []  # one (3, S, S) image is one image, not three grey ones
    grey_src = SourceInfo("png", None, "MONOCHROME2", 1, 16, 16, 1)
    reasons = contract.check(grey_src, train[0, :1])
    assert reasons and reasons[0] == "grey image (1 channel), model trained on colour (3)"


def test_tiny_simclr_then_fine_tune_then_serve_on_colour(tmp_path):
    """SimCLR (MICLe) -> fine-tune -> distil on red vs green of equal luminance, 3-channel cache; the
    service's pieces answer colour PNG/JPEG uploads with `predict_files`'s probabilities."""
    from remedis.adapt.distill import distill
    from remedis.adapt.finetune import fine_tune
    from remedis.data.contract import describe_file
    from remedis.pretrain.jobs import train_simclr
    from remedis.stages import fit_input_contract, preprocessing_for, resolve_channels
    from serving.answer import answers, prepare
    from serving.inputs import check_upload
    from serving.runtime import ModelRuntime
    from serving.settings import LimitSettings

    folder = tmp_path / "img"
    folder.mkdir()
    recs = []
    for i in range(36):
        label = CLASSES[i % 2]
        path = _write(folder / f"{i}.{'jpg' if i % 3 == 0 else 'png'}", RED if label == "red" else GREEN,
                      size=(18, 26), noise=12, seed=i)
        recs.append(_rec(path, label, patient=f"p{i // 4}"))  # two images per patient and class: MICLe pairs
    cfg = RunConfig()
    cfg.data.image_size, cfg.model.backbone, cfg.runtime.precision = 16, "resnet18", "fp32"
    cfg = resolve_channels(cfg, recs)
    assert (cfg.data.channels, cfg.model.in_chans) == (3, 3)
    cache = load_images(recs, preprocessing_for(cfg))
    assert cache.pixels.shape == (36, 3, 16, 16)
    train, val = cache.subset(lambda r: int(r.image.stem) < 24), cache.subset(lambda r: int(r.image.stem) >= 24)

    sc = cfg.pretrain.simclr
    sc.epochs, sc.batch_size, sc.max_steps_per_epoch = 1, 8, 2
    backbone = train_simclr(cfg, cache, None, tmp_path / "simclr", None, progress=False)
    cfg.adapt.epochs, cfg.adapt.batch_size, cfg.adapt.min_steps, cfg.adapt.soup = 1, 8, 0, "best"
    model, _, _ = fine_tune(cfg.adapt, cfg.runtime, cfg.model.backbone, cfg.seed, backbone, train, val, CLASSES, 1, progress=False)
    assert model.preprocessing.channels == 3 and model.preprocessing.in_chans == 3

    model.input_contract = fit_input_contract(train)
    assert model.input_contract.channels == [3]
    files = [folder / "24.jpg", folder / "25.png", _write(tmp_path / "new.png", (190, 8, 4), size=(40, 20))]
    offline = model.predict_files(files)["probs"]
    lim = LimitSettings()
    xs, reasons = [], []
    for f in files:
        x, r = prepare(check_upload(f.read_bytes(), None, lim), model.preprocessing, model.input_contract)
        assert x.shape == (3, 16, 16)
        xs.append(x)
        reasons.append(r)
    rt = ModelRuntime(model, "cpu")
    got = answers(rt.forward(np.stack(xs)), model.class_names, model.calibration, None, reasons, contract=True)
    served = np.array([[a.probabilities[c] for c in model.class_names] for a in got])
    assert np.abs(served - offline).max() < 1e-5
    assert reasons[0] == [] and reasons[1] == []
    # a grey upload to the colour model is flagged by the header's channel count
    buf = io.BytesIO()
    Image.fromarray(np.full((18, 26), 60, np.uint8), "L").save(buf, format="PNG")
    _, grey_reasons = prepare(check_upload(buf.getvalue(), "image/png", lim), model.preprocessing, model.input_contract)
    assert grey_reasons[0] == "grey image (1 channel), model trained on colour (3)"
    assert describe_file(files[0]).channels == 3
    # distillation augments the teacher's colour images with a colour recipe too
    student = distill(model, train, val, "resnet18", epochs=1, batch_size=8, runtime=cfg.runtime)
    assert student.preprocessing == model.preprocessing


def test_dermoscopy_config_loads_and_its_manifest_resolves(tmp_path, shared_data):
    from conftest import ROOT

    from remedis.stages import prepare_run_data

    cfg = RunConfig.from_yaml(ROOT / "configs" / "dermoscopy.yaml")
    assert (cfg.data.channels, cfg.model.in_chans, cfg.data.image_size) == (3, None, 64)
    assert cfg.adapt.fractions == [0.01, 0.05, 0.1, 0.25, 1.0]
    cfg.data.manifest = str(shared_data / "dermoscopy" / "manifest.csv")  # independent of the working directory
    prepared = prepare_run_data(cfg.data, cfg.seed, tmp_path)
    assert prepared.task.class_names == ["melanoma", "not_melanoma"] and prepared.task.positive_index == 0
    target = [r for r in prepared.manifest.records if r.site == cfg.data.target_site and r.split == "test"]
    assert sum(r.label == "melanoma" for r in target) >= 30  # enough positives for a test AUROC with a CI
