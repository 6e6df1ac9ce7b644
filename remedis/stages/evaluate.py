"""The evaluation stage: adapted model folders and a site's test images -> report entries (per-site metrics
with patient-bootstrap CIs, calibration, OOD detection, CKA) -> `report.json` + `report.html`.

Example:
    >>> inputs = eval_inputs(cfg.evaluate, cfg.adapt.operating_sensitivity, test, "site-B", roles, val)
    >>> entries = evaluate_models(models, inputs, n_boot=200, seed=0)
    >>> write_site_report(entries, site_table(test, roles), task, "site-B", provenance, Path("runs/x"))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from remedis.config import EvaluateConfig
from remedis.data.dataset import ImageCache
from remedis.evaluate.evaluation import EvalInputs, evaluate_folder
from remedis.evaluate.report import build_report, write_report
from remedis.stages.data import Task

log = logging.getLogger("remedis")


def eval_inputs(evaluate: EvaluateConfig, operating_sensitivity: float, test: ImageCache, target_site: str,
                roles: dict[str, str], val: ImageCache, far_ood: dict[str, ImageCache] | None = None) -> EvalInputs:
    """What every model's evaluation shares, from the `evaluate` section and the operating sensitivity."""
    ev = evaluate
    return EvalInputs(test=test, target_site=target_site, roles=roles, val=val, far_ood=far_ood or {},
                      subgroups=list(ev.subgroups), ood_method=ev.ood_method, ood_accept_rate=ev.ood_accept_rate,
                      operating_sensitivity=operating_sensitivity, noise_images=ev.noise_images,
                      cka_images=ev.cka_images)


def site_table(test: ImageCache, roles: dict[str, str]) -> dict[str, dict]:
    """The report's site table: role, test images and test patients per site (counts, never identifiers)."""
    return {s: {"role": roles[s], "test_images": sum(r.site == s for r in test.records),
                "test_patients": len({r.patient_id for r in test.records if r.site == s})} for s in sorted(roles)}


@dataclass
class ModelToEvaluate:
    """One adapted model folder and how the report names it."""

    folder: Path
    name: str
    backbone: str
    fraction: float
    train_images: int
    train: ImageCache | None = None  # its budget of the target site (OOD methods' state)
    backbone_before: Any = None  # the backbone checkpoint it started from, loaded (CKA), or None
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_models(models: Sequence[ModelToEvaluate], inputs: EvalInputs, n_boot: int, seed: int,
                    refit_ood: bool = False) -> list[dict]:
    """One full evaluation per model (per-site metrics with CIs, calibration, OOD, CKA): report entries."""
    entries = []
    for m in models:
        log.info("[evaluate] %s: metrics with CIs, calibration, OOD detection, CKA", m.name)
        own = replace(inputs, train=m.train if m.train is not None else inputs.train, backbone_before=m.backbone_before)
        entry = evaluate_folder(m.folder, own, n_boot=n_boot, seed=seed, refit_ood=refit_ood)
        entries.append({"name": m.name, "folder": Path(m.folder).name, "backbone": m.backbone, "fraction": m.fraction,
                        "train_images": m.train_images, **m.extra, **entry})
    return entries


def write_site_report(entries: list[dict], sites: dict[str, dict], task: Task, target_site: str, provenance: dict,
                      output: Path, title: str | None = None) -> tuple[Path, Path]:
    """Build the site's report from the entries and write `output/report.json` and `output/report.html`; a shifted
    test split (`remedis.evaluate.split_shift`) is also logged as a warning."""
    report = build_report(entries, sites, provenance, title=title or f"remedis report: adaptation to {target_site}",
                          task=task.to_dict(target_site))
    if any(s.get("shifted") for s in report.get("split_shift", {}).values()):
        log.warning("%s", report["advice"][0])
    return write_report(report, output)
