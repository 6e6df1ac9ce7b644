"""Evaluate one adapted model on a test set with sites: everything the report shows for that model.

For one model and its in-distribution (target) site it gathers
- per-site and per-subgroup metrics with patient-level CIs (`remedis.metrics`),
- calibration before (T = 1) and after temperature scaling,
- OOD detection: the five scores on the target site's test images against every other site
  (near-OOD for `ood`-role sites of the same modality), synthetic noise and other modalities (far-OOD),
- representation shift: layer-by-layer CKA between the backbone checkpoint it started from and its
  adapted backbone, and distances between site centres in its embedding space.

Nothing here is chosen on test data: the operating threshold comes from the model (or the validation
split), the OOD detector is fitted on the train split with its threshold on the validation split.

Example:
    >>> inputs = EvalInputs(test=test_cache, target_site="site-B", roles=roles, train=train, val=val)
    >>> entry = evaluate_adapted(model, inputs, n_boot=200, seed=0)
    >>> entry["sites"]["site-B"]["auroc"], entry["ood"]["detector"]["method"]
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from remedis.adapt.model import AdaptedModel
from remedis.adapt.ood import OODDetector, all_scores, fit_state, fpr_at_tpr, ood_auroc
from remedis.data.dataset import ImageCache
from remedis.evaluate.cka import cka_matrix, layer_features, site_embedding_distances
from remedis.metrics import auroc, ece, site_metrics, threshold_for_sensitivity
from remedis.ood_scores import get_score, score_names

log = logging.getLogger("remedis")

# Manifest columns that identify a person or a visit: never used as a subgroup (they would print
# identifiers into the report).
IDENTIFYING = {"patient_id", "patientid", "patient", "patientname", "patient_name", "name", "mrn",
               "accession", "accessionnumber", "studydate", "birthdate", "patientbirthdate", "date", "dob"}


@dataclass
class EvalInputs:
    """What every model's evaluation shares: test images and site roles, validation images, far-OOD sets, subgroups
    and the OOD detector's settings."""

    test: ImageCache  # labeled test images of every site
    target_site: str  # the in-distribution site (the model was adapted to it)
    roles: dict[str, str]  # site -> "source" | "target" | "ood"
    train: ImageCache | None = None  # target-site train images the model saw (OOD detector state)
    val: ImageCache | None = None  # target-site validation images (operating point, OOD threshold)
    far_ood: dict[str, ImageCache] = field(default_factory=dict)  # name -> images of another modality
    subgroups: list[str] = field(default_factory=list)  # manifest metadata columns, e.g. ["device"]
    backbone_before: torch.nn.Module | None = None  # the backbone checkpoint adaptation started from
    ood_method: str = "mahalanobis"
    ood_accept_rate: float = 0.95
    operating_sensitivity: float = 0.9
    noise_images: int = 64
    cka_images: int = 256


def check_subgroups(columns: list[str]) -> None:
    """Refuse subgroup columns that could carry identifiers (patient, image path); ValueError names the column."""
    for c in columns:
        if c.lower().replace(" ", "") in IDENTIFYING:
            raise ValueError(f"subgroup column {c!r} identifies patients and cannot appear in a report")


def noise_images(n: int, size: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Far-OOD probes in pixel space [0, 1]: half uniform noise, half smoothed Gaussian noise
    (colour noise for a colour model: `channels` 3)."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n - n // 2, channels, size, size, generator=g)
    gauss = (0.5 + 0.25 * torch.randn(n // 2, channels, size, size, generator=g)).clamp(0, 1)
    gauss = torch.nn.functional.avg_pool2d(gauss, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([uniform, gauss])


def infer(model: AdaptedModel, pixels: torch.Tensor, memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`AdaptedModel.infer` (uncalibrated logits, embeddings), remembered in `memo` for a pixel tensor
    already seen during one evaluation."""
    if memo is None:
        return model.infer(pixels)
    key = ("infer", id(pixels))
    if key not in memo:
        memo[key] = (pixels, model.infer(pixels))  # keep `pixels` alive: its id stays unique
    return memo[key][1]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def operating_threshold(model: AdaptedModel, val_logits: np.ndarray | None, val_targets: np.ndarray | None,
                        sensitivity: float) -> tuple[float | None, str]:
    """The model's stored threshold when it has one, else the one meeting `sensitivity` on validation."""
    stored = getattr(model, "threshold", None)
    if stored is not None:
        return float(stored), "stored with the model"
    if val_logits is None or len(val_logits) == 0:
        return None, "none (no validation split)"
    probs = _softmax(val_logits / model.temperature)
    t = threshold_for_sensitivity(val_targets == model.positive_index, probs[:, model.positive_index], sensitivity)
    return t, f"validation split, sensitivity {sensitivity:g}"


def _states(model, inputs: EvalInputs, index, memo: dict) -> dict[str, dict]:
    """Every OOD method's state fitted on the target train split (once per evaluation)."""
    if "states" not in memo:
        _, tr_emb = infer(model, inputs.train.pixels, memo=memo)
        y = np.array([index.get(r.label, -1) for r in inputs.train.records])
        memo["states"] = {m: fit_state(m, tr_emb, y) for m in score_names()}
    return memo["states"]


def evaluate_adapted(model: AdaptedModel, inputs: EvalInputs, n_boot: int = 200, seed: int = 0,
                     detector: OODDetector | None = None, memo: dict | None = None) -> dict:
    """The report entry of one model (without name/backbone/budget, which the caller knows)."""
    check_subgroups(inputs.subgroups)
    memo = {} if memo is None else memo
    names = model.class_names
    index = {c: i for i, c in enumerate(names)}
    binary = len(names) == 2

    val_logits = val_targets = None
    if inputs.val is not None and len(inputs.val):
        val_logits, _ = infer(model, inputs.val.pixels, memo=memo)
        val_targets = np.array([index.get(r.label, -1) for r in inputs.val.records])
    threshold, threshold_source = (operating_threshold(model, val_logits, val_targets, inputs.operating_sensitivity)
                                   if binary else (None, "multi-class: argmax"))

    test = inputs.test.subset(lambda r: r.label in index)
    logits, emb = infer(model, test.pixels)
    targets = np.array([index[r.label] for r in test.records], dtype=int)
    sites = np.array([r.site for r in test.records])
    patients = np.array([r.patient_id for r in test.records])
    probs, raw = _softmax(logits / model.temperature), _softmax(logits)

    def metrics(mask: np.ndarray) -> dict:
        return site_metrics(targets[mask], probs[mask], patients[mask], model.positive_index, n_boot, seed,
                            threshold=threshold, probs_uncalibrated=raw[mask], class_names=names)

    site_names = sorted(set(sites) | set(inputs.roles))
    per_site = {s: metrics(sites == s) for s in site_names}
    subgroups: dict[str, dict[str, dict[str, dict]]] = {}
    for column in inputs.subgroups:
        values = np.array([r.meta.get(column, "") for r in test.records])
        if not (values != "").any():  # e.g. a protocol config's column that only another site's manifest fills
            log.warning("subgroup column %r: no test image has a value in this column; not reported", column)
            continue
        subgroups[column] = {s: {v: metrics((sites == s) & (values == v)) for v in sorted(set(values[sites == s]) - {""})}
                             for s in site_names if (sites == s).any()}

    entry = {"temperature": float(model.temperature),
             "operating_point": {"threshold": threshold, "chosen_on": threshold_source,
                                 "positive_class": names[model.positive_index] if binary else None},
             "sites": per_site, "subgroups": subgroups}
    if val_logits is not None and (val_targets >= 0).any():
        known = val_targets >= 0
        vp = _softmax(val_logits[known] / model.temperature)
        entry["validation"] = {"n_images": int(known.sum()), "auroc": _finite(auroc(val_targets[known], vp, model.positive_index)),
                               "ece": _finite(ece(vp, val_targets[known]))}
    target = sites == inputs.target_site
    if target.any():  # for the claim rule across models (remedis.evaluate.claims); stripped before the report is written
        entry["_predictions"] = {"targets": targets[target], "probs": probs[target], "patients": patients[target],
                                 "positive_index": model.positive_index}
    entry["ood"] = _ood_section(model, inputs, index, logits, emb, sites, detector, seed, memo)
    entry["representation"] = _representation_section(model, inputs, emb, sites, test, seed)
    return entry


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _ood_section(model, inputs: EvalInputs, index, logits, emb, sites, detector, seed, memo) -> dict:
    """Every score's AUROC and FPR at 95% TPR: target-site test images against each other set."""
    tgt = inputs.target_site
    note = None
    if not (sites == tgt).any():
        return {"detector": detector_summary(detector), "note": "no target-site test images: OOD not evaluated"}
    if inputs.train is not None and len(inputs.train) >= 2:
        states = _states(model, inputs, index, memo)
    elif detector is not None:  # a manifest of a new site's test images only: the stored detector's own state
        states = {m: {} for m in score_names() if not get_score(m).state_keys} | {detector.method: detector.state}
        note = ("no target-site train images in this manifest: scored with the model's stored detector state "
                f"({detector.method}) and the scores that need no state ({', '.join(sorted(set(states) - {detector.method}))})")
    else:
        return {"detector": None, "note": "no target-site train images and no stored OOD detector: OOD not evaluated"}
    methods = [m for m in score_names() if m in states]
    id_scores = all_scores(logits[sites == tgt], emb[sites == tgt], None, None, states=states, methods=methods)

    test = inputs.test.subset(lambda r: r.label in index)
    sets: dict[str, tuple[str, np.ndarray, np.ndarray, ImageCache | None]] = {}
    for s in sorted(set(sites) - {tgt}):  # every other site of the manifest: same modality, near-OOD
        sets[s] = ("near", logits[sites == s], emb[sites == s], test.subset(lambda r, s=s: r.site == s))
    noise_l, noise_e = infer(model, noise_images(inputs.noise_images, model.preprocessing.image_size, seed,
                                                   model.preprocessing.channels))
    sets["synthetic-noise"] = ("far", noise_l, noise_e, None)
    for name, cache in inputs.far_ood.items():
        far_l, far_e = infer(model, cache.pixels)
        sets[name] = ("far", far_l, far_e, cache)

    results = {}
    for name, (kind, lg, em, cache) in sets.items():
        scores = all_scores(lg, em, None, None, states=states, methods=methods)
        results[name] = {"kind": kind, "n_images": len(lg),
                         "methods": {m: {"auroc": _none(ood_auroc(id_scores[m], scores[m])),
                                         "fpr95": _none(fpr_at_tpr(id_scores[m], scores[m]))} for m in methods}}
        flagged = detector.is_ood(lg, em) if detector is not None and len(lg) else None
        if flagged is not None:
            results[name]["detector_flagged"] = float(np.mean(flagged))
        contract = contract_flags(model, cache) if cache is not None else None
        if contract is not None:
            results[name]["contract_flagged"] = float(np.mean(contract)) if len(contract) else None
            both = contract if flagged is None else contract | flagged
            results[name]["flagged"] = float(np.mean(both)) if len(both) else None
    out = {"in_distribution": {"site": tgt, "n_images": int((sites == tgt).sum())}, "sets": results,
           "detector": detector_summary(detector),
           "summary": {kind: {m: _mean([r["methods"][m]["auroc"] for r in results.values() if r["kind"] == kind])
                              for m in methods} for kind in ("near", "far")}}
    if note:
        out["note"] = note
    if detector is not None:
        out["detector"]["test_accepted_in_distribution"] = float(np.mean(~detector.is_ood(logits[sites == tgt], emb[sites == tgt])))
    return out


@functools.lru_cache(maxsize=65536)
def _source(path, modality_hint: str | None):
    """Header facts of one file (read once per evaluation run, however many models check it); None when unreadable."""
    from remedis.data.contract import describe_file
    from remedis.data.readers import ImageReadError

    try:
        return describe_file(path, modality_hint)
    except (ImageReadError, OSError):
        return None


def contract_flags(model: AdaptedModel, images: ImageCache) -> np.ndarray | None:
    """Per image: does it break the model's input contract (modality, channels, size, intensity)?
    What the service checks before the feature score; None when the model has no contract."""
    contract = model.input_contract
    if contract is None:
        return None
    return np.array([bool(contract.check(_source(r.image, r.meta.get("modality") or None), px.float()))
                     for r, px in zip(images.records, images.pixels)], dtype=bool)


def detector_summary(detector: OODDetector | None) -> dict | None:
    """The detector's method, threshold and acceptance rate for the report (None without one)."""
    if detector is None:
        return None
    return {"method": detector.method, "threshold": float(detector.threshold), "accept_rate": detector.accept_rate,
            "rule": "fixed method from evaluate.ood_method (never chosen on OOD test data); threshold accepts "
                    f"{detector.accept_rate:.0%} of in-distribution validation images"}


def _representation_section(model, inputs: EvalInputs, emb, sites, test: ImageCache, seed) -> dict:
    out: dict = {"embedding_distance": site_embedding_distances({s: emb[sites == s] for s in sorted(set(sites))})}
    if inputs.backbone_before is None:
        out["cka"] = None
        return out
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(test), min(len(test), inputs.cka_images), replace=False)) if len(test) else []
    x = model.preprocessing.normalize(test.pixels[torch.as_tensor(pick, dtype=torch.long)].float())
    before = layer_features(inputs.backbone_before, x)
    after = layer_features(model.classifier.backbone, x)
    matrix = cka_matrix(before, after)
    out["cka"] = {"layers": list(before), "n_images": len(pick), "matrix": matrix,
                  "diagonal": [row[i] for i, row in enumerate(matrix)]}
    return out


def _none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def load_backbone_before(checkpoint, architecture: str, in_chans: int) -> torch.nn.Module | None:
    """The backbone checkpoint adaptation started from (None for random init)."""
    if checkpoint is None:
        return None
    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import load_checkpoint, load_matching

    state, meta = load_checkpoint(checkpoint)
    if meta.get("architecture", architecture) != architecture:
        raise ValueError(f"{checkpoint}: backbone is {meta.get('architecture')!r}, the adapted model is {architecture!r}")
    net = create_backbone(architecture, in_chans=in_chans)
    load_matching(net, state, str(checkpoint))
    return net.eval()


def evaluate_folder(folder, inputs: EvalInputs, n_boot: int = 200, seed: int = 0, refit_ood: bool = False) -> dict:
    """Load an adapted model folder, evaluate it and return its report entry with hashes. The model's own
    OOD detector (fitted at adaptation) is used; with `refit_ood`, or for an older folder without one, a
    detector is fitted on `inputs.train` / `inputs.val` and stored in the folder."""
    from pathlib import Path

    from remedis.adapt.ood import OOD_WEIGHTS, fit_model_detector
    from remedis.files import file_sha256
    from remedis.models.checkpoint import read_meta

    folder = Path(folder)
    model = AdaptedModel.load(folder)
    detector = model.ood_detector
    if (refit_ood or detector is None) and inputs.train is not None and inputs.val is not None:
        detector = fit_model_detector(model, inputs.train, inputs.val, inputs.ood_method, inputs.ood_accept_rate)
        if detector is not None:
            log.info("%s: OOD detector (%s) fitted and stored", folder.name, detector.method)
            detector.save(folder)
    entry = evaluate_adapted(model, inputs, n_boot, seed, detector)
    meta = read_meta(folder)
    prov = meta.get("provenance", {})
    entry["provenance"] = {
        "weights_sha256": meta.get("weights_sha256"), "backbone_sha256": prov.get("backbone_sha256"),
        "manifest_sha256": prov.get("manifest_sha256"), "backbone_init": prov.get("backbone_init"),
        "ood_sha256": file_sha256(folder / OOD_WEIGHTS) if (folder / OOD_WEIGHTS).is_file() else None,
        "architecture": model.architecture, "validation": prov.get("validation"),
    }
    if prov.get("recipe_ablation"):
        entry["recipe_ablation"] = prov["recipe_ablation"]
    return entry


def recipe_ablation(model: AdaptedModel, variants: dict[str, dict[str, torch.Tensor]], test: ImageCache,
                    n_boot: int = 200, seed: int = 0) -> dict[str, dict]:
    """Test AUROC [patient-bootstrap CI] of the adaptation recipe's intermediate weights (`fine_tune`'s
    `variants`: linear probe, best single sweep member, soup before WiSE-FT) and of the final model, on
    `test` (the target site's test images). Reported only: every choice was made on validation.
    Paired bootstrap (the same patient resamples for every variant), so the CIs compare like with like."""
    import copy

    from remedis.metrics import auroc, patient_bootstrap_ci

    index = {c: i for i, c in enumerate(model.class_names)}
    part = test.subset(lambda r: r.label in index)
    targets = np.array([index[r.label] for r in part.records])
    patients = [r.patient_id for r in part.records]
    probe = copy.deepcopy(model)
    out = {}
    for name, state in [*variants.items(), ("final", model.classifier.state_dict())]:
        probe.classifier.load_state_dict(state)
        probs = torch.as_tensor(probe.infer(part.pixels)[0]).float().softmax(1).numpy()
        out[name] = {"auroc": auroc(targets, probs, model.positive_index),
                     "auroc_ci": patient_bootstrap_ci(targets, probs, patients,
                                                      lambda t, p: auroc(t, p, model.positive_index), n_boot, seed)}
    return out


def load_far_ood(manifests: list, preprocessing, limit: int = 256, seed: int = 0) -> dict[str, ImageCache]:
    """Images of other modalities (far-OOD), named after their manifest's folder (its folder and file name
    when two manifests share a folder); labels are ignored. Uses the test split when the manifest has one,
    at most `limit` images, chosen at random by seed. The same manifest twice is refused."""
    from pathlib import Path

    from remedis.data.dataset import load_images
    from remedis.data.manifest import read_manifest

    paths = [Path(p).resolve() for p in manifests]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"--far-ood: {repeated[0]} is given more than once")
    names = [p.parent.name for p in paths]
    for longer in ([f"{p.parent.name}/{p.stem}" for p in paths], [str(p) for p in paths]):
        names = [n if names.count(n) == 1 else longer[i] for i, n in enumerate(names)]  # unique, as short as possible
    out = {}
    for path, name in zip(paths, names):
        records = read_manifest(path).records
        test = [r for r in records if r.split == "test"] or records
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(test), min(limit, len(test)), replace=False)) if test else []
        out[name] = load_images([test[i] for i in pick], preprocessing)
    return out
