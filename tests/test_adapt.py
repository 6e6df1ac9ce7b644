"""Adaptation pieces: soups, WiSE-FT, calibration, operating point, MICLe pairs, partial freezing, bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from remedis.adapt.calibration import Calibration, fit_temperature
from remedis.adapt.finetune import _freeze, check_adaptation_data
from remedis.adapt.weights import greedy_soup, uniform_soup, wise_ft
from remedis.commands.adapt import parse_budget, parse_budgets
from remedis.data.dataset import ImageCache
from remedis.data.manifest import Record
from remedis.data.preprocess import Preprocessing
from remedis.metrics import ece, threshold_for_sensitivity
from remedis.models import Classifier
from remedis.models.backbones import backbone_blocks
from remedis.pretrain.micle import MICLeDataset


def small_state(seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict().items()}


def test_soup_of_identical_models_is_the_model():
    s = small_state(0)
    soup = uniform_soup([s, {k: v.clone() for k, v in s.items()}, s])
    for k in s:
        assert torch.allclose(soup[k].float(), s[k].float(), atol=1e-7)


def test_uniform_soup_is_the_mean():
    a, b = small_state(0), small_state(1)
    soup = uniform_soup([a, b])
    assert torch.allclose(soup["0.weight"], (a["0.weight"] + b["0.weight"]) / 2, atol=1e-7)


def test_greedy_soup_skips_members_that_hurt():
    a, b, bad = small_state(0), small_state(1), small_state(2)
    target = (a["0.weight"] + b["0.weight"]) / 2

    def metric(s):  # best when the soup equals the mean of a and b
        return -float((s["0.weight"] - target).abs().sum())

    bad["0.weight"] = bad["0.weight"] + 100
    _, chosen = greedy_soup([a, b, bad], metric)
    assert sorted(chosen) == [0, 1]


def test_wise_ft_ends_and_midpoint():
    init = {"w": torch.zeros(3), "b": torch.ones(2)}
    tuned = {"backbone.w": torch.full((3,), 2.0), "backbone.b": torch.full((2,), 3.0), "head.w": torch.full((2,), 5.0)}
    assert torch.equal(wise_ft(init, tuned, 1.0, "backbone.")["backbone.w"], tuned["backbone.w"])
    zero = wise_ft(init, tuned, 0.0, "backbone.")
    assert torch.equal(zero["backbone.w"], init["w"]) and torch.equal(zero["backbone.b"], init["b"])
    assert torch.equal(zero["head.w"], tuned["head.w"])  # a layer the initial model lacks stays fine-tuned
    assert torch.allclose(wise_ft(init, tuned, 0.5, "backbone.")["backbone.w"], torch.ones(3))
    with pytest.raises(ValueError):
        wise_ft(init, tuned, 1.5)


def test_temperature_scaling_lowers_heldout_nll():
    g = torch.Generator().manual_seed(0)
    n = 4000
    targets = torch.randint(0, 2, (n,), generator=g)
    clean = (targets.float() * 2 - 1)[:, None] * torch.tensor([[-1.0, 1.0]]) + 0.8 * torch.randn(n, 2, generator=g)
    logits = 4.0 * clean  # overconfident by construction
    fit, held = slice(0, n // 2), slice(n // 2, n)
    t = fit_temperature(logits[fit], targets[fit])
    assert t > 1.1  # overconfident logits need T > 1
    before = F.cross_entropy(logits[held], targets[held])
    after = F.cross_entropy(logits[held] / t, targets[held])
    assert after < before
    assert ece((logits[held] / t).softmax(1).numpy(), targets[held].numpy()) < \
        ece(logits[held].softmax(1).numpy(), targets[held].numpy())


def test_threshold_reaches_requested_sensitivity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(bool)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 500), 0, 1)
    for sens in (0.8, 0.9, 0.95):
        t = threshold_for_sensitivity(y, p, sens)
        achieved = (p[y] >= t).mean()
        assert achieved >= sens
        assert (p[y] >= t + 1e-6).mean() < sens + 1.0 / y.sum() + 1e-9  # the largest such threshold


def test_calibration_decides_at_the_threshold_and_matches_the_model():
    cal = Calibration(temperature=2.0, threshold=0.3, positive_index=1)
    logits = np.array([[0.0, -0.5], [0.0, -2.0], [1.0, 3.0]])
    probs = cal.probs(logits)
    assert np.allclose(probs, torch.softmax(torch.tensor(logits) / 2.0, 1).numpy())
    assert list(cal.decide(probs)) == [1, 0, 1]  # 0.44 >= 0.3 is positive although argmax says 0
    assert list(Calibration(threshold=None).decide(probs)) == [0, 0, 1]
    three = Calibration.from_meta({"class_names": ["a", "b", "c"], "calibration": {"temperature": 1.0, "threshold": 0.3}})
    assert three.threshold is None  # multi-class: argmax


def cache_of(labels, patients, size=16):
    recs = [Record(Path(f"/x/{i}.png"), lab, "s", pid) for i, (lab, pid) in enumerate(zip(labels, patients))]
    pixels = torch.arange(len(recs), dtype=torch.float16)[:, None, None, None].expand(-1, 1, size, size).clone() / 100
    return ImageCache(recs, pixels, Preprocessing(size))


def test_micle_pairs_two_images_of_one_patient():
    cache = cache_of(["a"] * 5, ["p1", "p1", "p1", "p2", "p3"])
    ds = MICLeDataset(cache, augment=lambda x: x, seed=0)
    for i in range(3):
        for _ in range(10):
            j = ds.partner(i)
            assert j != i and j in (0, 1, 2)
    assert ds.partner(3) == 3 and ds.partner(4) == 4  # single-image patients fall back to SimCLR pairs
    assert abs(ds.multi_image_fraction - 0.6) < 1e-9
    v1, v2 = ds[0]
    assert not torch.equal(v1, v2)  # different images, even without augmentation


@pytest.mark.parametrize("name", ["resnetv2_18_bit", "resnet18"])
def test_partial_and_linear_freezing(name):
    model = Classifier(name, 2)
    blocks = backbone_blocks(model.backbone)
    assert len(blocks) == 5
    frozen = _freeze(model, "partial", 2)
    assert [id(p) for b in frozen for p in b.parameters()] == [id(p) for b in blocks[:3] for p in b.parameters()]
    assert not any(p.requires_grad for b in blocks[:3] for p in b.parameters())
    assert all(p.requires_grad for b in blocks[3:] for p in b.parameters())
    model = Classifier(name, 2)
    _freeze(model, "linear", -1)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_budget_without_a_class_fails_before_training():
    train = cache_of(["benign"] * 4, ["a", "b", "c", "d"])
    val = cache_of(["benign", "malignant"], ["e", "f"])
    with pytest.raises(ValueError, match=r"training budget has no image of class\(es\) \['malignant'\]"):
        check_adaptation_data(train, val, ["benign", "malignant"], "adapt")


def test_parse_budget():
    assert parse_budget("10%") == 0.1 and parse_budget("0.25") == 0.25 and parse_budget("50") == 50
    for bad in ("0", "150%", "-3", "ten"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)


def test_parse_budgets_sweep_and_lists():
    assert [b for _, b in parse_budgets("sweep")] == [0.01, 0.05, 0.1, 0.25, 1.0]
    assert parse_budgets(" 10%, 50 ") == [("10%", 0.1), ("50", 50)]
    assert parse_budgets("100%,1") == [("100%", 1.0), ("1", 1)]  # all labels, and one labeled image
    with pytest.raises(ValueError, match="twice"):
        parse_budgets("10%,0.1")
    with pytest.raises(ValueError, match="'x'"):
        parse_budgets("10%,x")


def test_knn_scores_match_brute_force():
    from remedis.pretrain.monitor import knn_scores

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(30, 8, generator=g), torch.randn(5, 8, generator=g)
    targets = torch.randint(0, 3, (30,), generator=g)
    got = knn_scores(bank, targets, queries, 3, k=4, temperature=0.1)
    for q in range(5):
        sims = [(float(F.cosine_similarity(queries[q], bank[b], dim=0)), b) for b in range(30)]
        votes = np.zeros(3)
        for s, b in sorted(sims, reverse=True)[:4]:
            votes[int(targets[b])] += np.exp(s / 0.1)
        assert np.allclose(got[q], votes / votes.sum(), atol=1e-5)


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_head_reproduces_the_sklearn_probe(classes):
    """The scaler and (for two classes) sklearn's single logit are folded into one nn.Linear whose
    softmax must equal the probe's predict_proba."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from remedis.adapt.linear_head import head_weights

    rng = np.random.default_rng(classes)
    y = np.arange(90) % classes
    x = rng.normal(size=(90, 6)) * rng.uniform(0.1, 5, 6) + rng.normal(size=6) + y[:, None] * 0.7
    scaler = StandardScaler().fit(x)
    probe = LogisticRegression(C=0.5, max_iter=5000).fit(scaler.transform(x), y)
    weight, bias = head_weights(scaler, probe, classes)
    ours = torch.softmax(torch.from_numpy(x @ weight.T + bias), 1).numpy()
    assert np.allclose(ours, probe.predict_proba(scaler.transform(x)), atol=1e-10)


def _sections(cfg):
    """The config sections `fine_tune` takes."""
    return cfg.adapt, cfg.runtime, cfg.model.backbone, cfg.seed


def bright_dark(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    pixels = (0.2 + 0.6 * labels[:, None, None, None] + 0.05 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    recs = [Record(Path(f"/x/{seed}-{i}.png"), ["benign", "malignant"][int(v)], "s", f"p{seed}-{i}") for i, v in enumerate(labels)]
    return ImageCache(recs, pixels.half(), Preprocessing(size))


def test_sweep_is_the_grid_of_lr_weight_decay_and_augmentation():
    from remedis.adapt.finetune import fine_tune
    from remedis.config import RunConfig

    cfg = RunConfig()
    cfg.data.image_size = 16
    cfg.model.backbone = "resnet18"
    cfg.adapt.epochs, cfg.adapt.batch_size, cfg.runtime.precision = 1, 8, "fp32"
    cfg.adapt.min_steps = 0
    cfg.adapt.sweep_weight_decays, cfg.adapt.sweep_augment_strengths = [0.05], [3.0]
    cfg.adapt.soup = "uniform"
    adapted, _, variants = fine_tune(*_sections(cfg), None, bright_dark(24), bright_dark(12, seed=1), ["benign", "malignant"], 1,
                                     progress=False)
    sweep = adapted.provenance["sweep"]
    lr = 3 * cfg.adapt.lr  # random init takes the larger step
    assert [(m["lr"], m["weight_decay"], m["augment_strength"]) for m in sweep] == [
        (lr, 1e-4, 1.0), (lr, 1e-4, 3.0), (lr, 0.05, 1.0), (lr, 0.05, 3.0)]
    assert adapted.provenance["soup"]["members"] == [0, 1, 2, 3]
    # Same start and data order: members 0/1 differ only by augmentation, 0/2 only by weight decay.
    losses = [m["history"][0]["train_loss"] for m in sweep]
    assert losses[0] != losses[1] and losses[0] != losses[2]


def test_min_steps_gives_small_budgets_more_epochs():
    from remedis.adapt.finetune import fine_tune
    from remedis.config import RunConfig

    cfg = RunConfig()
    cfg.data.image_size = 16
    cfg.model.backbone = "resnet18"
    cfg.adapt.epochs, cfg.adapt.batch_size, cfg.runtime.precision = 2, 8, "fp32"
    cfg.adapt.min_steps = 10  # 25 images in batches of 8: 3 steps per epoch (the 1-image batch dropped)
    adapted, history, _ = fine_tune(*_sections(cfg), None, bright_dark(25), bright_dark(12, seed=1), ["benign", "malignant"], 1,
                                    progress=False)
    # 10 steps need 4 epochs: the 2-epoch schedule stretched by 2, still validated twice
    assert adapted.provenance["epochs"] == 4 and adapted.provenance["steps"] == 12
    assert [h["epoch"] for h in history] == [1, 3]
    cfg.adapt.min_steps = 0
    adapted, history, _ = fine_tune(*_sections(cfg), None, bright_dark(25), bright_dark(12, seed=1), ["benign", "malignant"], 1,
                                    progress=False)
    assert adapted.provenance["epochs"] == 2 and [h["epoch"] for h in history] == [0, 1]


def test_lp_ft_starts_from_the_probe_and_keeps_it_as_a_member():
    from remedis.adapt.finetune import fine_tune
    from remedis.adapt.linear_head import fit_linear_head
    from remedis.config import RunConfig

    train, val, test = bright_dark(24), bright_dark(12, seed=1), bright_dark(12, seed=2)
    torch.manual_seed(0)
    model = Classifier("resnet18", 2)
    c, score = fit_linear_head(model, train, val, ["benign", "malignant"], 1)
    assert score == 1.0 and c in (0.01, 0.1, 1.0)  # a random backbone still separates bright from dark
    with torch.no_grad():
        x = test.preprocessing.normalize(test.pixels.float())
        model.eval()
        assert (model(x).argmax(1) == torch.arange(12) % 2).all()

    cfg = RunConfig()
    cfg.data.image_size = 16
    cfg.model.backbone = "resnet18"
    cfg.adapt.mode, cfg.adapt.epochs, cfg.adapt.batch_size, cfg.runtime.precision = "lp-ft", 1, 8, "fp32"
    cfg.adapt.min_steps = 0
    adapted, _, variants = fine_tune(*_sections(cfg), None, train, val, ["benign", "malignant"], 1, progress=False)
    prov = adapted.provenance
    assert prov["mode"] == "lp-ft" and prov["linear_probe"]["val_auroc"] == 1.0
    assert prov["sweep"][0]["lr"] == 0.0 and len(prov["sweep"]) == 2  # the probe + one fine-tuned member
    assert prov["val_auroc"] == 1.0
    assert list(variants) == ["linear_probe", "best_member", "soup"]

    from remedis.evaluate.evaluation import recipe_ablation

    head_before = adapted.classifier.head.weight.detach().clone()
    ablation = recipe_ablation(adapted, variants, test, n_boot=50, seed=0)
    assert torch.equal(adapted.classifier.head.weight, head_before)  # the model itself is left as it was
    assert set(ablation) == {"linear_probe", "best_member", "soup", "final"}
    assert ablation["linear_probe"]["auroc"] == 1.0  # the probe separates the test images too
    from remedis.evaluate.evaluation import EvalInputs, evaluate_adapted

    final = evaluate_adapted(adapted, EvalInputs(test=test, target_site="s", roles={"s": "target"}), n_boot=0)["sites"]["s"]["auroc"]
    assert abs(ablation["final"]["auroc"] - final) < 1e-9  # same weights, same number as the evaluation
    # identical weights give identical paired-bootstrap intervals
    same = recipe_ablation(adapted, {"copy": adapted.classifier.state_dict()}, test, n_boot=50, seed=0)
    assert same["copy"] == same["final"]
