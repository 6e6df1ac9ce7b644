"""`remedis monitor`: after go-live, what the deployed model saw and how it did, from its prediction log.

The service (and the gateway's in-process route) appends every answer to the store named by `monitor.store`
in the serving config (`remedis.monitor.store`). `remedis monitor label` attaches ground truth that came
later (a radiologist's read, a pathology result) to those predictions by their pseudonymous keys.
"""

from __future__ import annotations

from remedis.commands import command_parser

EXAMPLES = """examples:
  remedis monitor report --store sqlite:///var/lib/remedis/predictions.db --since 30d --window 1d -o monitor/
  remedis monitor compare --store sqlite:///var/lib/remedis/predictions.db --primary site-b:3 --shadow site-b:4
  remedis monitor label labels.csv --store sqlite:///var/lib/remedis/predictions.db --source pathology
  REMEDIS_MONITOR_SECRET=... remedis monitor label reads.csv --store postgresql+psycopg://remedis@db/remedis

labels.csv holds a 'label' column and either 'key' (as the service's answer returned it) or 'sop_instance_uid'
(hashed here with the site's secret, the same one the service uses: --secret-file or $REMEDIS_MONITOR_SECRET).
A file with any unknown key or label attaches nothing: fix it and send it again whole."""


def cmd_label(args) -> int:
    """`remedis monitor label`: attach the CSV's labels to logged predictions."""
    from remedis.config import ConfigError
    from remedis.monitor.labels import read_label_rows, read_secret
    from remedis.monitor.store import PredictionStore

    secret = read_secret(args.secret_file)
    try:
        with open(args.labels, newline="", encoding="utf-8") as fh:
            rows = read_label_rows(fh, secret, args.labels)
    except OSError as exc:
        raise ConfigError(f"{args.labels}: cannot read it ({type(exc).__name__})") from None
    store = PredictionStore(args.store)
    try:
        sources = {s for _, _, s in rows} - {""}
        source = args.source or (sources.pop() if len(sources) == 1 else "")
        attached, unknown = store.attach_labels([(k, v) for k, v, _ in rows], source=source)
    finally:
        store.close()
    if unknown:
        raise ConfigError(f"{args.labels}: {len(unknown)} of {len(rows)} row(s) match no logged prediction "
                          f"(first key {unknown[0]}); nothing attached")
    print(f"labels: {attached} attached to logged predictions ({args.labels}{', source ' + source if source else ''})")
    return 0


def _iso_time(text: str | None, name: str) -> str | None:
    """A date or date-time as the log's UTC ISO text (a date means 00:00 UTC); ConfigError names the option."""
    import datetime as dt

    from remedis.config import ConfigError

    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a date or time such as 2026-11-01 or 2026-11-01T08:00") from None
    t = t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)
    return t.isoformat(timespec="milliseconds")


def cmd_report(args) -> int:
    """`remedis monitor report`: the JSON and HTML report of the log's recent windows."""
    import datetime as dt
    import json
    from pathlib import Path

    from remedis.config import ConfigError
    from remedis.files import atomic_write_text
    from remedis.monitor.report import monitor_report, parse_duration, render_html
    from remedis.monitor.store import PredictionStore

    try:
        since, window = parse_duration(args.since), parse_duration(args.window)
    except ValueError as exc:
        raise ConfigError(f"--since/--window: {exc}") from None
    start = (dt.datetime.now(dt.timezone.utc) - since).isoformat(timespec="milliseconds")
    ref_bounds = [_iso_time(getattr(args, k), f"--{k.replace('_', '-')}") for k in ("reference_since", "reference_until")]
    if any(ref_bounds) and not all(ref_bounds):
        raise ConfigError("--reference-since and --reference-until: give both (the period when the model was known to be fine)")
    store = PredictionStore(args.store)
    try:
        rows = list(store.rows(since=start, role="primary", model_name=args.model))
        reference = (list(store.rows(since=ref_bounds[0], until=ref_bounds[1], role="primary", model_name=args.model))
                     if all(ref_bounds) else None)
    finally:
        store.close()
    if reference is not None and not reference:
        raise ConfigError(f"--reference-since/--reference-until: no answers logged from {ref_bounds[0]} to {ref_bounds[1]}")
    names = sorted({r["model_name"] or "" for r in rows})
    if len(names) > 1:
        raise ConfigError(f"the log holds several models in this period ({', '.join(names)}); choose one with --model")
    report = monitor_report(rows, window, args.reference_windows, reference_rows=reference)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "monitor.json", json.dumps(report, indent=1))
    atomic_write_text(out / "monitor.html", render_html(report))
    print(f"monitor: {len(rows)} answers in {len(report['windows'])} window(s) of {args.window}, "
          f"{len(report['alarms'])} alarm(s); {out / 'monitor.html'}")
    for a in report["alarms"][:10]:
        print(f"  alarm {a['window']} {a['group']}: {a['figure']} {a['value']:.3g} ({a['rule']})")
    return 0


def cmd_compare(args) -> int:
    """`remedis monitor compare`: a shadow version against the primary on the same images."""
    import datetime as dt
    import json
    from pathlib import Path

    from remedis.config import ConfigError
    from remedis.files import atomic_write_text
    from remedis.monitor.report import compare_versions, parse_duration
    from remedis.monitor.store import PredictionStore

    try:
        start = (dt.datetime.now(dt.timezone.utc) - parse_duration(args.since)).isoformat(timespec="milliseconds")
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    store = PredictionStore(args.store)
    try:
        rows = list(store.rows(since=start))
    finally:
        store.close()
    try:
        result = compare_versions(rows, args.primary, args.shadow)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(result, indent=1))
    pos, ood = result["positive_rate"], result["ood_rate"]
    print(f"compare: {result['paired_images']} images answered by both; decisions agree on {result['decision_agreement']:.1%}")
    print(f"  positive rate {pos['primary']:.3f} -> {pos['shadow']:.3f}; OOD-flag rate {ood['primary']:.3f} -> {ood['shadow']:.3f}")
    lab = result.get("labeled")
    if lab and "auroc_difference" in lab:
        lo, hi = lab["auroc_difference_ci"]
        ci = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else ""
        print(f"  labeled {lab['n']}: AUROC {lab['auroc_primary']:.3f} -> {lab['auroc_shadow']:.3f} "
              f"(difference {lab['auroc_difference']:+.3f}{ci}, paired bootstrap 95% CI)")
    return 0


def register(sub) -> None:
    """Add `remedis monitor` to the command line."""
    m = command_parser(sub, "monitor", "after go-live: the prediction log and labels that come later",
                       "After go-live: work with the deployed model's prediction log (monitor.store in the serving "
                       "config).", EXAMPLES)
    msub = m.add_subparsers(dest="monitor_command", required=True)
    s = command_parser(msub, "label", "attach ground truth to logged predictions",
                       "Attach ground truth (a read, a pathology result) to logged predictions by key or SOP Instance "
                       "UID; all rows or none.", EXAMPLES)
    s.add_argument("labels", help="CSV with label and key or sop_instance_uid (optional source)")
    s.add_argument("--store", required=True, help="the prediction log: sqlite:///path.db or postgresql+psycopg://...")
    s.add_argument("--secret-file", default=None, help="the site's secret (else $REMEDIS_MONITOR_SECRET); for UIDs")
    s.add_argument("--source", default="", help="where the labels come from, e.g. pathology, radiologist")
    s.set_defaults(func=cmd_label)
    r = command_parser(msub, "report", "what the model saw and how it did, per window and device",
                       "The monitoring report (JSON + HTML) of the prediction log: volume, OOD-flag and positive "
                       "rates with CIs, drift tests against a reference period, estimated performance from the "
                       "calibrated probabilities, measured performance where labels came, and alarms with their rules.",
                       EXAMPLES)
    r.add_argument("--store", required=True, help="the prediction log: sqlite:///path.db or postgresql+psycopg://...")
    r.add_argument("--since", default="30d", help="how far back (30m, 12h, 30d, 2w; default 30d)")
    r.add_argument("--window", default="1d", help="window length (default 1d; 1w for a quiet site)")
    r.add_argument("--reference-windows", type=int, default=1,
                   help="the first windows pooled as the reference, when the model was known to be fine (default 1)")
    r.add_argument("--reference-since", default=None,
                   help="with --reference-until: an explicit reference period (UTC date or time, e.g. the first month "
                        "after go-live); every window is then tested against it (recommended once the log is long)")
    r.add_argument("--reference-until", default=None, help="the end of the explicit reference period (exclusive)")
    r.add_argument("--model", default=None, help="the model name, when the log holds several")
    r.add_argument("--output", "-o", required=True, help="folder for monitor.json and monitor.html")
    r.set_defaults(func=cmd_report)
    c = command_parser(msub, "compare", "a shadow version against the primary on the same traffic",
                       "A shadow version against the primary on the images both answered: decision agreement, the "
                       "change in positive and OOD-flag rates, and with labels the paired AUROC difference with its "
                       "bootstrap CI: the evidence to promote it or not.", EXAMPLES)
    c.add_argument("--store", required=True, help="the prediction log")
    c.add_argument("--primary", required=True, help="the primary as name:version (or :version)")
    c.add_argument("--shadow", required=True, help="the candidate as name:version (or :version)")
    c.add_argument("--since", default="30d", help="how far back (default 30d)")
    c.add_argument("--output", "-o", default=None, help="also write the comparison as JSON")
    c.set_defaults(func=cmd_compare)
