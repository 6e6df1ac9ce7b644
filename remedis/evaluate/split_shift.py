"""Does the target site's test split look like the images the model was tuned on?

Public datasets often ship their own test split, made at another time, on other devices or from other
patients than their train split. A model then scores well on validation (drawn like train) and worse on
test, its OOD detector (set to accept a share of validation images) rejects many test images, and its
calibration (fitted on validation) is off on test. Each sign alone can be noise or a weak model; two of
them together say the test split comes from a different population, and every test figure of the report
describes that population rather than the one the model was tuned on. `split_shift` reads the three signs
from a model's report entry; `shift_advice` says it in plain words with the numbers.

The signs (thresholds in `SIGNS`):
    auroc        validation AUROC above the test AUROC's 95% CI (and by at least 0.05)
    ood          the detector accepts at least 10 points fewer test images than it was set to accept
    calibration  test ECE at least 0.15 and at least 0.05 above the validation ECE

Example:
    >>> shift = split_shift(entry, "BUSI")
    >>> shift["signs"], shift["shifted"]
    (['auroc', 'ood'], True)
"""

from __future__ import annotations

from typing import Any

SIGNS = {"auroc_gap": 0.05, "acceptance_gap": 0.10, "test_ece": 0.15, "ece_gap": 0.05}
MIN_SIGNS = 2


def split_shift(entry: dict[str, Any], target_site: str) -> dict[str, Any] | None:
    """The three signs of a shifted test split in one model's report entry (None without validation figures).

    Args:
        entry: a report model entry (`sites`, `validation`, `ood.detector`).
        target_site: the site the model was adapted to.

    Returns:
        {val_auroc, test_auroc, test_auroc_ci, accept_rate, test_accepted, val_ece, test_ece, signs, shifted}.
    """
    val, test = entry.get("validation") or {}, (entry.get("sites") or {}).get(target_site) or {}
    if val.get("auroc") is None or test.get("auroc") is None:
        return None
    detector = (entry.get("ood") or {}).get("detector") or {}
    ci = test.get("auroc_ci") or [None, None]
    test_ece = test.get("ece")
    out = {"val_auroc": val["auroc"], "test_auroc": test["auroc"], "test_auroc_ci": ci,
           "accept_rate": detector.get("accept_rate"), "test_accepted": detector.get("test_accepted_in_distribution"),
           "val_ece": val.get("ece"), "test_ece": test_ece, "signs": []}
    gap = val["auroc"] - test["auroc"]
    if gap >= SIGNS["auroc_gap"] and (ci[1] is None or val["auroc"] > ci[1]):
        out["signs"].append("auroc")
    if out["accept_rate"] is not None and out["test_accepted"] is not None \
            and out["accept_rate"] - out["test_accepted"] >= SIGNS["acceptance_gap"]:
        out["signs"].append("ood")
    if test_ece is not None and test_ece >= SIGNS["test_ece"] and test_ece - (val.get("ece") or 0.0) >= SIGNS["ece_gap"]:
        out["signs"].append("calibration")
    out["shifted"] = len(out["signs"]) >= MIN_SIGNS
    return out


def shift_advice(models: list[dict[str, Any]], target_site: str | None) -> list[str]:
    """A plain-language warning when the target site's test split looks shifted, with the figures of the model
    trained on the most labels among those that show it (empty when none does)."""
    if not target_site:
        return []
    found = [(m, s) for m in models if (s := split_shift(m, target_site)) and s["shifted"]]
    judged = sum(split_shift(m, target_site) is not None for m in models)
    if not found:
        return []
    model, s = max(found, key=lambda f: (f[0].get("train_images") or 0, f[0].get("fraction") or 0))
    ci = s["test_auroc_ci"]
    parts = [f"validation AUROC {s['val_auroc']:.2f} but test AUROC {s['test_auroc']:.2f}"
             + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else "")]
    if s["test_accepted"] is not None and s["accept_rate"] is not None:
        parts.append(f"the OOD detector, set to accept {s['accept_rate']:.0%} of validation images, accepts "
                     f"{s['test_accepted']:.0%} of the test images")
    if s["test_ece"] is not None:
        parts.append(f"calibration error (ECE) {s['test_ece']:.2f} on test"
                     + (f" against {s['val_ece']:.2f} on validation" if s["val_ece"] is not None else ""))
    return [f"The test images of {target_site} look unlike its train and validation images ({len(found)} of {judged} "
            f"models show it). {model.get('name', 'The model')} ({model.get('train_images')} labeled images): "
            + "; ".join(parts) + ". The test figures in this report then describe a different population from the one "
            "the model was tuned on: check how the test split was made (dates, devices, a public dataset's own split) "
            "before trusting them, and split by patient if the test images should be like the others."]
