"""The evaluation report: `report.json` (source of truth, versioned schema) and a self-contained
`report.html` (inline CSS, plots embedded as PNG data URIs, no network), never a patient identifier.

Example:
    >>> report = build_report(evaluations, sites, provenance)
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

SCHEMA_VERSION = 1


def build_report(models: list[dict], sites: dict[str, dict], provenance: dict[str, Any], title: str = "remedis report") -> dict:
    """`models`: [{"name", "backbone", "fraction", "train_images", "temperature", "sites": {site: metrics}}]."""
    import remedis

    return {
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "generated_by": f"remedis {remedis.__version__}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sites": sites,
        "models": models,
        "data_efficiency": data_efficiency(models),
        "provenance": provenance,
    }


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


def write_report(report: dict, folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "report.json", folder / "report.html"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False))
    tmp.replace(json_path)
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(render_html(report))
    tmp.replace(html_path)
    return json_path, html_path


def _fmt(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    text = f"{value:.3f}"
    if ci and ci[0] is not None:
        text += f' <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>'
    return text


def _efficiency_plot(report: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eff = report["data_efficiency"]
    sites = list(report["sites"])
    fig, axes = plt.subplots(1, len(sites), figsize=(4 * len(sites), 3.2), squeeze=False, sharey=True)
    for ax, site in zip(axes[0], sites):
        for backbone, per_site in sorted(eff.items()):
            pts = [(f, a) for f, a in per_site.get(site, []) if a is not None]
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=backbone)
        ax.set_xscale("log")
        ax.set_title(f"{site} ({report['sites'][site].get('role', '')})")
        ax.set_xlabel("target-site labels used (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUROC")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #dde;padding:.35rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f2f4f8}.ci{color:#667;font-size:.8rem}
.meta{color:#556;font-size:.85rem}img{max-width:100%}code{background:#f2f4f8;padding:0 .2rem}"""


def render_html(report: dict) -> str:
    esc = html.escape
    sites = list(report["sites"])
    head = "".join(f"<th>{esc(s)}<br><span class='ci'>{esc(report['sites'][s].get('role', ''))}</span></th>" for s in sites)

    def table(metric: str) -> str:
        rows = []
        for m in report["models"]:
            cells = "".join(f"<td>{_fmt(m['sites'].get(s, {}).get(metric), m['sites'].get(s, {}).get(metric + '_ci'))}</td>" for s in sites)
            rows.append(f"<tr><td>{esc(m['name'])}</td><td>{m['train_images']}</td>{cells}</tr>")
        return f"<table><thead><tr><th>model</th><th>labels</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    site_rows = "".join(
        f"<tr><td>{esc(s)}</td><td>{esc(info.get('role', ''))}</td><td>{info.get('test_images', '')}</td><td>{info.get('test_patients', '')}</td></tr>"
        for s, info in report["sites"].items()
    )
    calib = "".join(
        f"<tr><td>{esc(m['name'])}</td><td>{m['temperature']:.3f}</td>"
        + "".join(f"<td>{_fmt(m['sites'].get(s, {}).get('ece'))}</td>" for s in sites) + "</tr>"
        for m in report["models"]
    )
    prov = report["provenance"]
    prov_lines = "".join(f"<li><code>{esc(str(k))}</code>: {esc(str(v))}</li>" for k, v in prov.items() if k != "config")
    plot = _efficiency_plot(report)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(report['title'])}</title><style>{CSS}</style></head><body>
<h1>{esc(report['title'])}</h1>
<p class="meta">{esc(report['generated_by'])} &middot; {esc(report['created'])} &middot; schema v{report['schema_version']}</p>
<h2>Sites (held-out test split)</h2>
<table><thead><tr><th>site</th><th>role</th><th>images</th><th>patients</th></tr></thead><tbody>{site_rows}</tbody></table>
<h2>AUROC per site <span class="ci">[95% CI, patient-level bootstrap]</span></h2>
{table('auroc')}
<h2>Data efficiency</h2>
<img alt="AUROC against target-site label budget, per site" src="data:image/png;base64,{plot}">
<h2>Accuracy per site</h2>
{table('accuracy')}
<h2>Calibration (ECE, 15 bins, after temperature scaling)</h2>
<table><thead><tr><th>model</th><th>temperature</th>{''.join(f'<th>{esc(s)}</th>' for s in sites)}</tr></thead><tbody>{calib}</tbody></table>
<h2>Provenance</h2><ul class="meta">{prov_lines}</ul>
</body></html>
"""
