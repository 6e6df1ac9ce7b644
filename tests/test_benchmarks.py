"""The benchmark suite runs in reduced mode and produces every figure, finite (no speed is asserted).

Speed targets live in benchmarks/ (JSON with ratios), never in timed tests.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run as bench_run  # noqa: E402

# Figures each reduced benchmark must produce (names are part of the JSON contract of the README).
# The torch.compile figures are left out here (BENCH_COMPILE_TARGETS=none): a cold compile alone took 27 of the
# fixture's 56 s on 2 cores; `python benchmarks/run.py --reduced` still measures them.
EXPECTED = {
    "compute": ["matmul fp32", "matmul bf16",
                *[f"{m} infer {p}" for m in ("resnet18@224", "resnet50@224", "resnetv2_50x1_bit@224", "resnetv2_18_bit@64")
                  for p in ("fp32", "bf16+CL")],
                "resnetv2_18_bit@64 infer bf16+CL StdConv folded"],
    "train": ["train plain fp32", "train plain bf16+CL", "train Lightning bf16", "train Lightning fp32"],
    "scaling": ["scaling epoch 1000 images", "scaling epoch 10000 images", "scaling peak RSS 10000 images"],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("BENCH_COMPILE_TARGETS", "none")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench_run.main(["--reduced", "--only", ",".join(EXPECTED), "--output", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, {k: v.get("error") for k, v in report["benchmarks"].items()}
    return report


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_figure_is_produced_and_finite(report):
    assert report["mode"] == "reduced"
    for key in ("device", "torch", "date", "threads"):
        assert report["environment"][key]
    for bench, names in EXPECTED.items():
        entry = report["benchmarks"][bench]
        assert entry["status"] == "ok", entry.get("error")
        figures = {f["name"]: f for f in entry["result"]["figures"]}
        for name in names:
            found = [f for n, f in figures.items() if n == name or n.endswith(name)]
            assert found, f"{bench}: no figure {name!r} in {sorted(figures)}"
        for f in figures.values():
            assert math.isfinite(f["value"]) and f["value"] > 0, f
            if f["reference"] is not None:
                assert math.isfinite(f["reference"]) and f["reference"] > 0, f
                assert f["ratio"] == pytest.approx(f["value"] / f["reference"]), f


def test_bf16_peak_is_the_reference_for_backbone_efficiency(report):
    figures = {f["name"]: f for f in report["benchmarks"]["compute"]["result"]["figures"]}
    peak = figures["matmul bf16"]["value"]
    eff = figures["resnet50@224 bf16+CL achieved / bf16 matmul peak"]
    assert eff["reference"] == pytest.approx(peak)
    # achieved GFLOP/s = counted FLOPs per image x images/s (ResNet-50, 1 channel: ~8 GFLOP per image)
    ips = figures["resnet50@224 infer bf16+CL"]["value"]
    per_image = figures["resnet50@224 infer fp32"]["gflop_per_image"]
    assert 7.0 < per_image < 8.5
    assert eff["value"] == pytest.approx(per_image * ips, rel=1e-6)


def test_a_failing_benchmark_is_an_error_entry_not_a_crash(tmp_path):
    (tmp_path / "bench_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    (tmp_path / "bench_norun.py").write_text("X = 1\n")
    (tmp_path / "bench_fine.py").write_text("def run(reduced):\n    return {'figures': [{'name': 'x', 'value': 2.0, "
                                            "'unit': 's', 'reference': 1.0, 'ratio': 2.0}]}\n")
    out = tmp_path / "b.json"
    code = bench_run.main(["--reduced", "--folder", str(tmp_path), "--output", str(out)])
    report = json.loads(out.read_text())
    assert code == 1
    assert report["benchmarks"]["broken"]["status"] == "error"
    assert "broken on purpose" in report["benchmarks"]["broken"]["error"]
    assert "no run(reduced" in report["benchmarks"]["norun"]["error"]
    assert report["benchmarks"]["fine"]["status"] == "ok"


def test_flop_count_matches_a_naive_conv_formula():
    """FlopCounterMode (the figures' FLOPs) against 2 x MACs summed from each conv/linear's shapes."""
    import torch

    from benchmarks._common import count_flops
    from remedis.models import create_backbone

    net = create_backbone("resnet18", in_chans=1).eval()
    naive = []

    def conv_hook(m, inp, out):
        naive.append(2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    def linear_hook(m, inp, out):
        naive.append(2 * out.numel() * m.in_features)

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear_hook)
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        counted = count_flops(lambda: net(x))
    assert counted == sum(naive) > 0


def test_reference_protocol_script_runs_on_remedis_splits(shared_data):
    """The independent reference recipe (benchmarks/reference_protocol.py) runs end to end on the same
    BUSI test patients remedis uses for that seed (one epoch per stage, CPU)."""
    import subprocess
    from dataclasses import replace

    from conftest import ROOT

    manifest = shared_data / "breast-ultrasound" / "manifest.csv"
    if not manifest.is_file():
        pytest.skip("breast-ultrasound kit not present")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference_protocol.py"), "--manifest", str(manifest),
                          "--seed", "0", "--budgets", "1.0", "--epochs-scale", "0.01"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    from remedis.data.manifest import read_manifest
    from remedis.data.splits import assign_splits

    busi = [r for r in read_manifest(manifest).records if r.site == "BUSI"]
    merged = {"benign": "not_malignant", "normal": "not_malignant"}
    busi = assign_splits([replace(r, label=merged.get(r.label, r.label)) for r in busi], (0.6, 0.2, 0.2), seed=0)
    assert result["busi_test_images"] == sum(r.split == "test" for r in busi)
    assert set(result["busi_test_auroc"]) == {"random@1", "supervised@1", "remedis@1"}
    # One epoch per stage, and the BUS-BRA upstream already carries to BUSI: measured (seed 0, CPU) 0.805
    # supervised and 0.787 REMEDIS against 0.551 from random initialisation; asserted with a 0.1 margin.
    auc = result["busi_test_auroc"]
    assert min(auc["supervised@1"], auc["remedis@1"]) > auc["random@1"] + 0.1, auc


def test_foundation_adapt_claim_is_the_smallest_budget_reaching_the_best_baseline():
    """Issue 20's claim logic (benchmarks/foundation_adapt.py) on hand-made rows: the best baseline at 100%,
    the smallest foundation-REMEDIS budget at or above its AUROC (point) and above its CI's lower end."""
    from benchmarks import foundation_adapt as fa

    def row(backbone, seed, aurocs, width=0.05):
        return {"target": "BUSI", "backbone": backbone, "seed": seed, "exit": 0,
                "budgets": [{"name": n, "fraction": f, "images": int(f * 400), "auroc": a, "auroc_ci": [a - width, a + width]}
                            for (n, f), a in zip([("1%", .01), ("10%", .1), ("100%", 1.0)], aurocs)]}

    rows = [row("foundation-remedis", 0, [0.70, 0.79, 0.85]), row("foundation-supervised", 0, [0.65, 0.75, 0.80]),
            row("random", 0, [0.55, 0.70, 0.82]), row("kit-remedis", 0, [0.60, 0.72, 0.78]),
            row("foundation-remedis", 1, [0.72, 0.83, 0.87]), row("random", 1, [0.50, 0.66, 0.84])]
    c = fa.claim(rows, "BUSI", 0)
    assert c["best_baseline"] == "random" and c["baseline_auroc"] == 0.82
    assert c["reached_point"]["budget"] == "100%"  # 0.79 at 10% is below 0.82
    assert c["reached_within_ci"]["budget"] == "10%"  # but above 0.77, the CI's lower end
    s = fa.summary(rows)["BUSI"]
    cell = s["table"]["foundation-remedis"]["10%"]
    assert cell["seeds"] == 2 and math.isclose(cell["mean"], 0.81) and math.isclose(cell["sd"], math.sqrt(0.0008))
    assert s["claim"]["best_baseline"] == "random" and math.isclose(s["claim"]["baseline_mean"], 0.83)
    assert s["claim"]["reached_point"] == "100%" and s["claim"]["reached_within_ci"] == "10%"
    assert math.isclose(s["foundation_minus_kit"]["1%"], 0.71 - 0.60)
    # the kit study (issue 18's colour-against-grey table): another backbone is `ours`, the rest are baselines
    k = fa.claim(rows, "BUSI", 0, ours="kit-remedis", baselines=("foundation-supervised", "random"))
    assert k["best_baseline"] == "random" and k["reached_point"] is None and k["reached_within_ci"]["budget"] == "100%"
    kc = fa.summary(rows, "kit-remedis", ("foundation-supervised",))["BUSI"]["claim"]
    assert kc["ours"] == "kit-remedis" and kc["reached_point"] is None and kc["reached_within_ci"] == "100%"


def test_foundation_adapt_grey_target_has_its_own_backbones_and_decoding(tmp_path):
    """rosendahl-grey adapts the kit's grey backbones and a grey random network on luminance, to the same split."""
    from benchmarks import foundation_adapt as fa

    grey, colour = fa.TARGETS["rosendahl-grey"], fa.TARGETS["rosendahl"]
    assert grey.manifest == colour.manifest and grey.site == colour.site and grey.sets == ["data.channels=1"]
    assert colour.sets == []
    assert fa.backbone_folder(tmp_path, "kit-supervised", "rosendahl-grey") == tmp_path / "derm-grey/backbones/supervised"
    assert fa.backbone_folder(tmp_path, "random", "rosendahl-grey") == tmp_path / "random-grey/backbones/random"
    assert fa.backbone_folder(tmp_path, "random", "rosendahl") == tmp_path / "random/backbones/random"
    assert fa.backbone_folder(tmp_path, "foundation-remedis", "NIH") == tmp_path / "foundation/backbones/remedis"
