"""The evaluation report: `report.json` (source of truth, versioned schema) and a self-contained
`report.html` rendered only from it (inline CSS, plots embedded as PNG data URIs, no script, no
network), never a patient identifier.

Schema (`schema_version` 2; version 1 had only `sites`, `models[*].sites[*]` auroc/accuracy/ece and
`data_efficiency`, all kept with the same meaning):

    schema_version, title, generated_by, created (UTC ISO time)
    task            {class_names, positive_class, target_site, metric}
    sites           {site: {role: source|target|ood, test_images, test_patients}}
    models          [{name, backbone, fraction, train_images, temperature,
                      operating_point {threshold, chosen_on, positive_class},
                      sites {site: METRICS}, subgroups {column: {site: {value: METRICS}}},
                      ood {in_distribution, detector {method, threshold, accept_rate, rule},
                           sets {name: {kind: near (another site of the manifest) | far (noise, other modality), n_images,
                                        methods {msp|max_logit|energy|mahalanobis|knn: {auroc, fpr95}}}},
                           summary {near|far: {method: mean AUROC}}},
                      representation {cka {layers, matrix (before x after), diagonal} | null,
                                      embedding_distance {site: {site: distance}}},
                      recipe_ablation {linear_probe (LP-FT only), best_member, soup, final: {auroc, auroc_ci}}
                        (target-site test AUROC of the recipe's intermediate weights; optional),
                      provenance {weights_sha256, backbone_sha256, ood_sha256, ...}}]
    data_efficiency {backbone: {site: [[budget fraction, auroc], ...]}}
    label_savings   {site: {metric, baseline, baseline_images, baseline_value, method, reached_fraction,
                            reached_images, reached_value, savings}}  (point estimates against supervised-only;
                    kept for schema 2 readers: the advice uses `claim`)
    claim           the claim rule on the target site (remedis.evaluate.claims.data_efficiency_claim): the
                    smallest budget of the REMEDIS backbone non-inferior to the best 100% model of any backbone,
                    per margin, with the one-sided paired patient-bootstrap bounds (optional)
    split_shift     {model name: {val_auroc, test_auroc, test_auroc_ci, accept_rate, test_accepted, val_ece,
                                  test_ece, signs, shifted}} (remedis.evaluate.split_shift; optional)
    advice          [plain-language lines: a shifted test split first, then label budgets]
    provenance      {manifest_sha256, seed, config, ...}  (hashes only: no patient identifier)

METRICS = {n_images, n_patients, auroc, auroc_ci, auprc, auprc_ci, accuracy, accuracy_ci, sensitivity,
sensitivity_ci, specificity, specificity_ci, threshold, ece, calibration {ece, brier, reliability},
calibration_uncalibrated {...}, per_class_auroc (multi-class)}; CIs are [low, high] 95% percentile
intervals of a patient-level bootstrap, [null, null] when too few resamples had both classes.

Example:
    >>> report = build_report(models, sites, provenance)
    >>> write_report(report, "runs/quickstart")     # -> report.json, report.html
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
METHOD, BASELINES = "remedis", ("supervised", "random")


def build_report(models: list[dict], sites: dict[str, dict], provenance: dict[str, Any], title: str = "remedis report",
                 task: dict | None = None) -> dict:
    """`models`: [{"name", "backbone", "fraction", "train_images", "temperature", "sites": {site: metrics}, ...}]."""
    import remedis
    from remedis.evaluate.split_shift import shift_advice, split_shift

    target = (task or {}).get("target_site") or next((s for s, i in sites.items() if i.get("role") == "target"), None)
    savings = label_savings(models)
    shifts = {m["name"]: sh for m in models if target and "name" in m and (sh := split_shift(m, target)) is not None}
    claim = report_claim(models, target)
    models = [{k: v for k, v in m.items() if k != "_predictions"} for m in models]  # per-image data stays out
    return {
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "generated_by": f"remedis {remedis.__version__}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "task": {"metric": "auroc", **(task or {}), "target_site": target},
        "sites": sites,
        "models": models,
        "data_efficiency": data_efficiency(models),
        "label_savings": savings,
        "split_shift": shifts,
        "claim": claim,
        "advice": shift_advice(models, target) + (claim_advice(claim, target) if claim else advice_lines(savings, target)),
        "provenance": provenance,
    }


def report_claim(models: list[dict], target: str | None, method: str = METHOD, n_boot: int = 1000) -> dict | None:
    """The claim rule on the target site's test images: `method`'s budgets against every backbone's 100% model
    (its own included). None without per-image predictions, a 100% model or a budget below 100%."""
    from remedis.evaluate.claims import data_efficiency_claim

    have = [m for m in models if m.get("_predictions") is not None and not m.get("distilled")]
    ours = {m["fraction"]: m for m in have if m["backbone"] == method}
    full = {m["backbone"]: m for m in have if m["fraction"] == 1.0}
    if not target or not full or not [f for f in ours if f < 1.0]:
        return None
    first = next(iter(full.values()))["_predictions"]
    if any(len(m["_predictions"]["targets"]) != len(first["targets"]) for m in have):
        return None  # not the same test images
    claim = data_efficiency_claim({f: m["_predictions"]["probs"] for f, m in ours.items()},
                                  {f"{b}@100%": m["_predictions"]["probs"] for b, m in full.items()},
                                  first["targets"], first["patients"], n_boot=n_boot, seed=0,
                                  positive_index=first["positive_index"])
    images = {m["fraction"]: m["train_images"] for m in ours.values()}
    for row in claim["budgets"]:
        row["images"] = images.get(row["fraction"])
    return {"site": target, "method": method, **claim}


def claim_advice(claim: dict, target: str | None) -> list[str]:
    """The claim in one plain sentence: how many of the site's labels were enough, by the one rule."""
    images = {r["fraction"]: r["images"] for r in claim["budgets"]}
    head = (f"By the claim rule (non-inferior to the best model trained on all of {target}'s labels, "
            f"{claim['best_baseline']} with AUROC {claim['baseline_auroc']:.3f}; one-sided 95% paired patient bootstrap)")
    at = {m: v for m, v in claim["margins"].items()}
    strict, loose = at.get("0.02", {}), at.get("0.05", {})
    if strict.get("budget") is not None and strict["budget"] < 1.0:
        body = (f": {images[strict['budget']]} labeled images ({strict['budget']:.0%}) with the {claim['method']} backbone "
                f"are enough at a margin of 0.02 (AUROC {strict['auroc']:.3f})")
    else:
        body = f": no budget below 100% of the labels is non-inferior at a margin of 0.02 with the {claim['method']} backbone"
    if loose.get("budget") is not None and loose["budget"] < 1.0 and loose["budget"] != strict.get("budget"):
        body += f"; at 0.05, {images[loose['budget']]} ({loose['budget']:.0%}, AUROC {loose['auroc']:.3f})"
    return [head + body + "."]


def data_efficiency(models: list[dict]) -> dict[str, dict[str, list]]:
    """{backbone: {site: [[fraction, auroc], ...]}} sorted by fraction."""
    out: dict[str, dict[str, list]] = {}
    for m in models:
        for site, met in m["sites"].items():
            out.setdefault(m["backbone"], {}).setdefault(site, []).append([m["fraction"], met["auroc"]])
    for per_site in out.values():
        for pts in per_site.values():
            pts.sort(key=lambda p: p[0])
    return out


def label_savings(models: list[dict], metric: str = "auroc", method: str = METHOD) -> dict[str, dict]:
    """Per site: the smallest budget at which `method` reaches the baseline's full-data metric.

    The baseline is the supervised-only backbone (random init when absent) at its largest budget.
    `savings` = 1 - method images / baseline images (None when the method never reaches it)."""
    ours = sorted((m for m in models if m["backbone"] == method), key=lambda m: m["fraction"])
    baseline = next((b for b in BASELINES if any(m["backbone"] == b for m in models)), None)
    if not ours or baseline is None:
        return {}
    full = max((m for m in models if m["backbone"] == baseline), key=lambda m: m["fraction"])
    out = {}
    for site, met in full["sites"].items():
        target = met.get(metric)
        if target is None:
            continue
        reached = next((m for m in ours if (m["sites"].get(site, {}).get(metric) or -1) >= target), None)
        best = max(ours, key=lambda m: m["sites"].get(site, {}).get(metric) or -1)
        out[site] = {
            "metric": metric, "baseline": baseline, "baseline_fraction": full["fraction"],
            "baseline_images": full["train_images"], "baseline_value": target, "baseline_ci": met.get(metric + "_ci"),
            "method": method,
            "reached_fraction": reached["fraction"] if reached else None,
            "reached_images": reached["train_images"] if reached else None,
            "reached_value": reached["sites"][site][metric] if reached else None,
            "reached_ci": reached["sites"][site].get(metric + "_ci") if reached else None,
            "best_value": best["sites"].get(site, {}).get(metric), "best_images": best["train_images"],
            "savings": (1 - reached["train_images"] / full["train_images"]) if reached and full["train_images"] else None,
        }
    return out


def advice_lines(savings: dict[str, dict], target_site: str | None) -> list[str]:
    """A plain sentence on how many target-site labels the metric level needs (the labels are the
    target site's, so the advice is for it; every site when no target is known)."""
    order = [target_site] if target_site in savings else sorted(savings)
    lines = []
    for site in order:
        s = savings[site]
        m = s["metric"].upper()
        if s["reached_images"] is not None and s["reached_images"] >= s["baseline_images"]:
            lines.append(
                f"To reach {m} {s['baseline_value']:.3f} at {site} (the {s['baseline']} baseline with all "
                f"{s['baseline_images']} labeled images), the {s['method']} backbone needed as many labels "
                f"({s['reached_images']}): no label saving at the budgets tried.")
        elif s["reached_images"] is not None:
            overlap = _overlap(s["baseline_ci"], s["reached_ci"])
            lines.append(
                f"To reach {m} {s['baseline_value']:.3f} at {site} (the {s['baseline']} baseline with all "
                f"{s['baseline_images']} labeled images), about {s['reached_images']} labeled images are enough with "
                f"the {s['method']} backbone ({s['savings']:.0%} fewer labels)"
                + ("; the confidence intervals overlap, so treat the saving as indicative." if overlap else "."))
        else:
            lines.append(
                f"The {s['method']} backbone did not reach the {s['baseline']} baseline's full-data {m} "
                f"{s['baseline_value']:.3f} at {site} within the budgets tried (best {s['best_value'] or float('nan'):.3f} "
                f"with {s['best_images']} labeled images): plan for at least {s['baseline_images']} labeled images "
                f"or more pretraining.")
    return lines


def _overlap(a, b) -> bool:
    return bool(a and b and a[0] is not None and b[0] is not None and a[0] <= b[1] and b[0] <= a[1])


def write_report(report: dict, folder: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.html into `output`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "report.json", folder / "report.html"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False))
    tmp.replace(json_path)
    # Render from the JSON text just written, so the page shows exactly report.json's numbers.
    page = render_html(json.loads(json_path.read_text()))
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(html_path)
    return json_path, html_path


# ----------------------------------------------------------------------------------------- HTML

def _fmt(value, ci=None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None:
        text += f' <span class="ci">[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]</span>'
    return text


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _efficiency_plot(report: dict) -> str:
    plt = _plt()
    eff = report["data_efficiency"]
    sites = list(report["sites"])
    fig, axes = plt.subplots(1, len(sites), figsize=(3.8 * len(sites), 3.2), squeeze=False, sharey=True)
    for ax, site in zip(axes[0], sites):
        for backbone, per_site in sorted(eff.items()):
            pts = [(f, a) for f, a in per_site.get(site, []) if a is not None]
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=backbone)
        sav = report.get("label_savings", {}).get(site)
        if sav:
            ax.axhline(sav["baseline_value"], color="gray", ls="--", lw=1, label=f"{sav['baseline']} full data")
            if sav["reached_fraction"] is not None:
                ax.plot([sav["reached_fraction"] * 100], [sav["reached_value"]], marker="*", ms=14, color="crimson",
                        ls="none", label="label savings point")
        ax.set_xscale("log")
        ax.set_title(f"{site} ({report['sites'][site].get('role', '')})")
        ax.set_xlabel("target-site labels used (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUROC")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _reliability_plot(report: dict, site: str) -> str | None:
    models = [m for m in report["models"] if m["sites"].get(site, {}).get("calibration", {}).get("reliability")]
    if not models:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(2.9 * len(models), 3.0), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":")
        for key, label, style in (("calibration_uncalibrated", "before (T=1)", "s--"), ("calibration", "after T", "o-")):
            rel = (m["sites"][site].get(key) or {}).get("reliability")
            if rel:
                pts = [(c, a) for c, a in zip(rel["confidence"], rel["accuracy"]) if c is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=label)
        ax.set_title(m["name"], fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _cka_plot(report: dict) -> str | None:
    models = [m for m in report["models"] if (m.get("representation") or {}).get("cka")]
    if not models:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        cka = m["representation"]["cka"]
        im = ax.imshow([[v if v is not None else float("nan") for v in row] for row in cka["matrix"]],
                       vmin=0, vmax=1, cmap="viridis", origin="lower")
        short = [n.split(".")[-1] if n != "embedding" else "emb" for n in cka["layers"]]
        ax.set_xticks(range(len(short)), [f"{i}" for i in range(len(short))], fontsize=7)
        ax.set_yticks(range(len(short)), [f"{i}" for i in range(len(short))], fontsize=7)
        ax.set_xlabel("after adaptation (layer)", fontsize=8)
        ax.set_ylabel("backbone checkpoint (layer)", fontsize=8)
        ax.set_title(m["name"], fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="linear CKA")
    return _png(fig)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;\
color:#1d2330;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}
h3{font-size:1rem;margin-top:1.2rem}table{border-collapse:collapse;width:100%;font-size:.85rem;margin:.4rem 0}
th,td{border:1px solid #dde;padding:.3rem .45rem;text-align:right}th:first-child,td:first-child{text-align:left}
thead th{background:#f2f4f8}.ci{color:#667;font-size:.78rem}.meta{color:#556;font-size:.85rem}
img{max-width:100%;display:block;margin:.5rem 0}code{background:#f2f4f8;padding:0 .2rem;font-size:.85em;word-break:break-all}
.advice{background:#eef6ee;border-left:4px solid #3a8a3a;padding:.6rem .9rem;margin:.6rem 0}
.note{color:#556;font-size:.85rem}nav a{margin-right:.8rem;font-size:.9rem;color:#2a55a0}"""


def render_html(report: dict) -> str:  # long: the page's sections in reading order
    """The self-contained report page from report.json alone (inline figures, no script, no network request)."""
    esc = html.escape
    sites = list(report["sites"])
    models = report["models"]
    head = "".join(f"<th>{esc(s)}<br><span class='ci'>{esc(report['sites'][s].get('role', ''))}</span></th>" for s in sites)

    def metric_table(metric: str) -> str:
        rows = []
        for m in models:
            cells = "".join(f"<td>{_fmt(m['sites'].get(s, {}).get(metric), m['sites'].get(s, {}).get(metric + '_ci'))}</td>"
                            for s in sites)
            rows.append(f"<tr><td>{esc(m['name'])}</td><td>{m['train_images']}</td>{cells}</tr>")
        return f"<table><thead><tr><th>model</th><th>labels</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    parts = [f"<h1>{esc(report['title'])}</h1>",
             (f"<p class='meta'>{esc(report['generated_by'])} &middot; {esc(report['created'])} &middot; "
              f"report schema v{report['schema_version']} &middot; numbers from <code>report.json</code></p>"),
             ("<nav><a href='#sites'>sites</a><a href='#metrics'>metrics</a><a href='#efficiency'>data efficiency</a>"
              "<a href='#calibration'>calibration</a><a href='#ood'>OOD detection</a><a href='#shift'>representation shift</a>"
              "<a href='#provenance'>provenance</a></nav>")]
    parts.append(_provenance_header(report))
    task = report.get("task", {})
    site_rows = "".join(
        f"<tr><td>{esc(s)}</td><td>{esc(i.get('role', ''))}</td>"
        f"<td>{i.get('test_images', '')}</td><td>{i.get('test_patients', '')}</td></tr>"
        for s, i in report["sites"].items())
    parts.append(f"<h2 id='sites'>Sites (held-out test split)</h2><p class='note'>Classes: {esc(', '.join(task.get('class_names', [])))}"
                 f"; positive class: {esc(str(task.get('positive_class', '')))}; adapted to "
                 f"<b>{esc(str(task.get('target_site')))}</b>.</p>"
                 f"<table><thead><tr><th>site</th><th>role</th><th>images</th><th>patients</th></tr></thead><tbody>{site_rows}</tbody></table>")

    parts.append("<h2 id='metrics'>Per-site metrics <span class='ci'>[95% CI, patient-level bootstrap]</span></h2>")
    binary = len(task.get("class_names", [])) <= 2
    for metric, label in (("auroc", "AUROC" + ("" if binary else " (macro one-vs-rest)")), ("auprc", "AUPRC"),
                          ("accuracy", "Accuracy"), ("sensitivity", "Sensitivity at the operating point"),
                          ("specificity", "Specificity at the operating point")):
        if any(metric in m["sites"].get(s, {}) for m in models for s in sites):
            parts.append(f"<h3>{label}</h3>{metric_table(metric)}")
    ops = "".join(f"<tr><td>{esc(m['name'])}</td><td>{_fmt((m.get('operating_point') or {}).get('threshold'))}</td>"
                  f"<td>{esc(str((m.get('operating_point') or {}).get('chosen_on', '')))}</td></tr>" for m in models)
    if binary:
        parts.append("<h3>Operating points</h3><p class='note'>Threshold on the calibrated positive-class probability.</p>"
                     f"<table><thead><tr><th>model</th><th>threshold</th><th>chosen on</th></tr></thead><tbody>{ops}</tbody></table>")
    parts.append(_per_class(models, sites))
    parts.append(_recipe_ablation(models, task.get("target_site")))
    parts.append(_subgroups(models))

    parts.append(f"<h2 id='efficiency'>Data efficiency</h2><img alt='AUROC against target-site label budget, per site' "
                 f"src='{_efficiency_plot(report)}'>")
    for line in report.get("advice", []):
        parts.append(f"<p class='advice'>{esc(line)}</p>")
    parts.append(_savings_table(report))

    parts.append(_calibration(report, sites))
    parts.append(_ood(report))
    parts.append(_representation(report))
    prov = report["provenance"]
    prov_lines = "".join(f"<li><code>{esc(str(k))}</code>: {esc(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</li>"
                         for k, v in prov.items() if k != "config")
    cfg = esc(json.dumps(prov.get("config", {}), indent=1)) if prov.get("config") else ""
    parts.append(f"<h2 id='provenance'>Provenance</h2><ul class='meta'>{prov_lines}</ul>"
                 + (f"<details><summary>config</summary><pre class='meta'>{cfg}</pre></details>" if cfg else ""))
    body = "\n".join(p for p in parts if p)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{esc(report['title'])}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _provenance_header(report: dict) -> str:
    esc = html.escape
    prov = report["provenance"]
    def cell(value) -> str:
        return f"<td><code>{esc(str(value)[:16])}</code></td>" if value else "<td>&ndash;</td>"

    rows = "".join(f"<tr><td>{esc(m['name'])}</td>" + "".join(
        cell((m.get("provenance") or {}).get(k)) for k in ("weights_sha256", "backbone_sha256", "ood_sha256")) + "</tr>"
        for m in report["models"])
    manifest = esc(str(prov.get("manifest_sha256", ""))[:16])
    return (f"<p class='meta'>Manifest <code>{manifest}</code> &middot; seed {esc(str(prov.get('seed', '')))}</p>"
            f"<table class='meta'><thead><tr><th>model</th><th>weights sha256</th><th>backbone sha256</th>"
            f"<th>OOD detector sha256</th></tr></thead><tbody>{rows}</tbody></table>")


def _per_class(models, sites) -> str:
    esc = html.escape
    if not any("per_class_auroc" in m["sites"].get(s, {}) for m in models for s in sites):
        return ""
    out = ["<h3>AUROC per class (one-vs-rest)</h3>"]
    for m in models:
        classes = sorted({c for s in sites for c in m["sites"].get(s, {}).get("per_class_auroc", {})})
        rows = "".join(f"<tr><td>{esc(c)}</td>" + "".join(
            _per_class_cell(m["sites"][s], c) for s in sites) + "</tr>" for c in classes)
        out.append(f"<p class='note'>{esc(m['name'])}</p><table><thead><tr><th>class</th>"
                   + "".join(f"<th>{esc(s)}</th>" for s in sites) + f"</tr></thead><tbody>{rows}</tbody></table>")
    return "".join(out)


def _per_class_cell(site_metrics: dict, cls: str) -> str:
    per_class = site_metrics.get("per_class_auroc", {}).get(cls, {})
    return f"<td>{_fmt(per_class.get('auroc'), per_class.get('auroc_ci'))}</td>"


RECIPE_STEPS = (("linear_probe", "linear probe"), ("best_member", "best single sweep member"),
                ("soup", "soup"), ("final", "soup + WiSE-FT (final)"))


def _recipe_ablation(models, target_site) -> str:
    esc = html.escape
    rows = [m for m in models if m.get("recipe_ablation")]
    if not rows:
        return ""
    steps = [(k, label) for k, label in RECIPE_STEPS if any(k in m["recipe_ablation"] for m in rows)]
    body = "".join(f"<tr><td>{esc(m['name'])}</td>" + "".join(
        f"<td>{_fmt(m['recipe_ablation'].get(k, {}).get('auroc'), m['recipe_ablation'].get(k, {}).get('auroc_ci'))}</td>"
        for k, _ in steps) + "</tr>" for m in rows)
    return (f"<h3>What each step of the adaptation recipe adds</h3><p class='note'>{esc(str(target_site))} test AUROC of "
            "the recipe's intermediate weights (every choice was made on validation; these are reported, never "
            "used). Paired patient bootstrap.</p><table><thead><tr><th>model</th>"
            + "".join(f"<th>{esc(label)}</th>" for _, label in steps) + f"</tr></thead><tbody>{body}</tbody></table>")


def _subgroups(models) -> str:
    esc = html.escape
    out = []
    for m in models:
        for column, per_site in (m.get("subgroups") or {}).items():
            rows = []
            for site, per_value in per_site.items():
                for value, met in per_value.items():
                    rows.append(f"<tr><td>{esc(site)}</td><td>{esc(value)}</td><td>{met['n_images']}</td>"
                                f"<td>{_fmt(met.get('auroc'), met.get('auroc_ci'))}</td>"
                                f"<td>{_fmt(met.get('accuracy'), met.get('accuracy_ci'))}</td>"
                                f"<td>{_fmt(met.get('sensitivity'), met.get('sensitivity_ci'))}</td>"
                                f"<td>{_fmt(met.get('specificity'), met.get('specificity_ci'))}</td></tr>")
            out.append(f"<h3>{esc(m['name'])}: by <code>{esc(column)}</code></h3><table><thead><tr><th>site</th><th>{esc(column)}</th>"
                       f"<th>images</th><th>AUROC</th><th>accuracy</th><th>sensitivity</th><th>specificity</th></tr></thead>"
                       f"<tbody>{''.join(rows)}</tbody></table>")
    return ("<h2 id='subgroups'>Subgroups</h2>" + "".join(out)) if out else ""


def _savings_table(report: dict) -> str:
    esc = html.escape
    sav = report.get("label_savings") or {}
    if not sav:
        return ""
    rows = []
    for site, s in sav.items():
        saved = "&ndash;" if s["savings"] is None else f"{s['savings']:.0%}"
        needed = s["reached_images"] if s["reached_images"] is not None else "not reached"
        rows.append(f"<tr><td>{esc(site)}</td><td>{esc(s['baseline'])} @ {s['baseline_images']}</td>"
                    f"<td>{_fmt(s['baseline_value'], s['baseline_ci'])}</td><td>{needed}</td>"
                    f"<td>{_fmt(s['reached_value'], s['reached_ci'])}</td><td>{saved}</td></tr>")
    rows = "".join(rows)
    return ("<h3>Label savings</h3><p class='note'>Smallest REMEDIS budget whose test AUROC reaches the baseline's "
            "full-data AUROC.</p><table><thead><tr><th>site</th><th>baseline (labels)</th><th>baseline AUROC</th>"
            f"<th>REMEDIS labels needed</th><th>REMEDIS AUROC</th><th>labels saved</th></tr></thead><tbody>{rows}</tbody></table>")


def _calibration(report: dict, sites: list[str]) -> str:
    esc = html.escape
    rows = []
    for m in report["models"]:
        for s in sites:
            met = m["sites"].get(s, {})
            before, after = met.get("calibration_uncalibrated") or {}, met.get("calibration") or {}
            rows.append(f"<tr><td>{esc(m['name'])}</td><td>{esc(s)}</td><td>{m['temperature']:.3f}</td>"
                        f"<td>{_fmt(before.get('ece'))}</td><td>{_fmt(after.get('ece', met.get('ece')))}</td>"
                        f"<td>{_fmt(before.get('brier'))}</td><td>{_fmt(after.get('brier'))}</td></tr>")
    target = report.get("task", {}).get("target_site") or sites[0]
    plot = _reliability_plot(report, target)
    img = f"<img alt='reliability diagrams at {esc(target)}, before and after temperature scaling' src='{plot}'>" if plot else ""
    return ("<h2 id='calibration'>Calibration</h2><p class='note'>ECE with 15 equal-width confidence bins; Brier score on the "
            "positive class. Temperature T is fitted on the target site's validation split.</p>"
            "<table><thead><tr><th>model</th><th>site</th><th>T</th><th>ECE before</th><th>ECE after</th><th>Brier before</th>"
            f"<th>Brier after</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<h3>Reliability diagrams at {esc(target)}</h3>{img}")


def _ood(report: dict) -> str:
    esc = html.escape
    out = [("<h2 id='ood'>OOD detection</h2><p class='note'>In-distribution: the target site's test images. "
           "AUROC of telling each set apart from them (1 = perfect) and FPR at 95% TPR (share of that set still "
           "accepted when 95% of in-distribution images are accepted; 0 = perfect). near = another site of the same "
           "modality (source or ood role), far = synthetic noise or another modality.</p>")]
    any_ood = False
    for m in report["models"]:
        ood = m.get("ood") or {}
        if not ood.get("sets"):
            continue
        any_ood = True
        methods = list(next(iter(ood["sets"].values()))["methods"])
        det = ood.get("detector")
        head = "".join(f"<th>{esc(s)}<br><span class='ci'>{esc(v['kind'])}, {v['n_images']} img</span></th>"
                       for s, v in ood["sets"].items())
        rows = "".join(f"<tr><td>{esc(meth)}{' &#9733;' if det and det['method'] == meth else ''}</td>" + "".join(
            f"<td>{_fmt(v['methods'][meth]['auroc'])} "
            f"<span class='ci'>FPR95 {_fmt(v['methods'][meth]['fpr95'], digits=2)}</span></td>"
            for v in ood["sets"].values()) + "</tr>" for meth in methods)
        det_line = "No detector stored."
        if det:
            det_line = (f"Stored detector (&#9733;): <b>{esc(det['method'])}</b>, threshold {det['threshold']:.4g}, accepts "
                        f"{det['accept_rate']:.0%} of validation images; on test it accepted "
                        f"{_fmt(det.get('test_accepted_in_distribution'), digits=2)} of in-distribution images.")
        out.append(f"<h3>{esc(m['name'])}</h3><p class='note'>{det_line}</p><table><thead><tr><th>score</th>{head}</tr></thead>"
                   f"<tbody>{rows}</tbody></table>")
    return "".join(out) if any_ood else out[0] + "<p class='note'>Not evaluated.</p>"


def _representation(report: dict) -> str:
    esc = html.escape
    out = ["<h2 id='shift'>Representation shift</h2>"]
    plot = _cka_plot(report)
    models = [m for m in report["models"] if (m.get("representation") or {}).get("cka")]
    if plot:
        layers = models[0]["representation"]["cka"]["layers"]
        legend = ", ".join(f"{i} = {esc(n)}" for i, n in enumerate(layers))
        rows = "".join(f"<tr><td>{esc(m['name'])}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in m["representation"]["cka"]["diagonal"])
                       + "</tr>" for m in models)
        out.append("<p class='note'>Linear CKA between the backbone checkpoint before adaptation (rows) and the adapted "
                   f"backbone (columns), on test images; 1 = unchanged up to rotation and scale. Layers: {legend}.</p>"
                   f"<img alt='CKA heatmaps, backbone before vs after adaptation' src='{plot}'>"
                   "<table><thead><tr><th>model</th>" + "".join(f"<th>{i}</th>" for i in range(len(layers)))
                   + f"</tr></thead><tbody>{rows}</tbody></table>")
    for m in report["models"]:
        dist = (m.get("representation") or {}).get("embedding_distance")
        if dist:
            names = list(dist)
            rows = "".join(f"<tr><td>{esc(a)}</td>" + "".join(f"<td>{_fmt(dist[a].get(b))}</td>" for b in names) + "</tr>" for a in names)
            out.append(f"<h3>{esc(m['name'])}: distance between site centres (normalised embeddings)</h3>"
                       "<table><thead><tr><th></th>" + "".join(f"<th>{esc(b)}</th>" for b in names)
                       + f"</tr></thead><tbody>{rows}</tbody></table>")
    return "".join(out) if len(out) > 1 else ""
