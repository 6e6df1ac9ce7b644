"""The README stays a short guide, and its config reference cannot drift from `remedis/config.py`.

The yaml block right after the heading "## Config reference" must list every key of `RunConfig`
(and its nested dataclasses) with its true default. When a key is added, renamed or its default
changes, the failure names the keys and prints the block to paste; or print it directly:

    .venv/bin/python tests/test_readme.py

The printed block keeps the README's current one-line comments and takes a new key's comment from
its comment in `remedis/config.py` (first sentence; edit it to taste, comments are not compared).
The test also keeps the README at most MAX_LINES lines and checks its relative links.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HEADING = "## Config reference"
MAX_LINES = 410
COMMENT_COLUMN = 40

if str(ROOT) not in sys.path:  # `python tests/test_readme.py` from anywhere
    sys.path.insert(0, str(ROOT))

from remedis.config import RunConfig  # noqa: E402

# ---- the README's block ------------------------------------------------------------------------

def readme_config_block(text: str) -> str:
    """The body of the first ```yaml block after the heading HEADING (before the next `## `)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == HEADING)
    except StopIteration:
        raise AssertionError(f"README.md has no heading {HEADING!r}") from None
    body: list[str] | None = None
    for line in lines[start + 1:]:
        if body is None:
            if line.startswith("## "):
                break
            if line.strip() == "```yaml":
                body = []
        elif line.strip() == "```":
            return "\n".join(body) + "\n"
        else:
            body.append(line)
    raise AssertionError(f"README.md: no complete ```yaml block after {HEADING!r}")


def readme_comments(block: str) -> dict[str, str]:
    """dotted key -> the one-line comment after it in the README's block (block-style keys only)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        note = re.search(r"(?:^|\s)#\s?(.*)$", rest)
        if note and note.group(1).strip():
            out[dotted] = note.group(1).rstrip()
    return out


# ---- the dataclasses ---------------------------------------------------------------------------

def _sections(cls: type, prefix: str = "") -> dict[str, type]:
    """dotted path -> dataclass type, for every nested dataclass field (the YAML sections)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            out[prefix + f.name] = type(value)
            out.update(_sections(type(value), f"{prefix}{f.name}."))
    return out


SECTIONS = _sections(RunConfig)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value; recurses only into known sections, so dict-valued keys stay leaves."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in SECTIONS and isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def true_defaults() -> dict[str, object]:
    return flatten(RunConfig().to_dict())


def _normal(value: object) -> object:
    """Comparable form: bools stay bools, ints and floats compare as numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def source_comments() -> dict[str, str]:
    """dotted key -> the trailing comment of its field in remedis/config.py."""
    out: dict[str, str] = {}
    for path, cls in [("", RunConfig), *((p + ".", c) for p, c in SECTIONS.items())]:
        above: list[str] = []  # the comment lines right above a field, used when it has no trailing one
        for line in inspect.getsource(cls).splitlines():
            if re.match(r"^    #", line):
                above.append(line.strip().lstrip("#").strip())
                continue
            m = re.match(r"^    ([a-z_][\w]*): [^#]*?(?:#\s*(.+))?$", line)
            if m and (m.group(2) or above):
                out[path + m.group(1)] = _short(m.group(2) or " ".join(above))
            above = []
    return out


def _short(comment: str, limit: int = 90) -> str:
    """First sentence of a comment, cut at a word boundary near `limit` characters."""
    text = re.split(r"(?<=\.)\s(?=[A-Z])", comment.strip(), maxsplit=1)[0].rstrip(".")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


# ---- the block to paste ------------------------------------------------------------------------

def _scalar(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def render_block(comments: dict[str, str]) -> str:
    """The README's yaml block: every key in dataclass order with its default and comment."""
    lines: list[str] = []

    def emit(text: str, dotted: str) -> None:
        note = comments.get(dotted)
        if note:
            text = text.ljust(COMMENT_COLUMN - 1) + " # " + note if len(text) < COMMENT_COLUMN - 1 else f"{text}  # {note}"
        lines.append(text)

    def walk(obj: object, prefix: str, depth: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            dotted = prefix + f.name
            pad = "  " * depth
            if dataclasses.is_dataclass(value):
                emit(f"{pad}{f.name}:", dotted)
                walk(value, dotted + ".", depth + 1)
            else:
                emit(f"{pad}{f.name}: {_scalar(value)}", dotted)

    walk(RunConfig(), "", 0)
    return "\n".join(lines) + "\n"


def block_to_paste() -> str:
    try:
        current = readme_comments(readme_config_block(README.read_text()))
    except AssertionError:
        current = {}
    comments = {**source_comments(), **current}
    return "```yaml\n" + render_block(comments) + "```"


# ---- tests -------------------------------------------------------------------------------------

def test_readme_config_reference_matches_dataclasses():
    block = readme_config_block(README.read_text())
    try:
        parsed = yaml.safe_load(block) or {}
    except yaml.YAMLError as exc:
        raise AssertionError(f"README.md {HEADING!r}: the yaml block does not parse: {exc}") from None
    documented = flatten(parsed)
    defaults = true_defaults()
    missing = sorted(set(defaults) - set(documented))
    extra = sorted(set(documented) - set(defaults))
    wrong = sorted(k for k in set(defaults) & set(documented) if _normal(defaults[k]) != _normal(documented[k]))
    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append("keys missing from the README: " + ", ".join(missing))
        if extra:
            problems.append("keys in the README that RunConfig does not have: " + ", ".join(extra))
        for k in wrong:
            problems.append(f"{k}: README says {documented[k]!r}, the default is {defaults[k]!r}")
        raise AssertionError(
            f"README.md {HEADING!r} differs from remedis/config.py:\n  " + "\n  ".join(problems)
            + f"\nReplace the block under {HEADING!r} with (or run `python tests/test_readme.py`):\n\n" + block_to_paste()
        )


def test_readme_block_renders_itself():
    """The generator round-trips: what it prints parses back to the true defaults."""
    assert flatten(yaml.safe_load(render_block({}))) == true_defaults()


def test_readme_is_a_short_guide():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}): move evidence to docs/evidence.md"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.+?)\s*$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


def _strip_fences(markdown: str) -> str:
    """Markdown without fenced blocks (their `# comment` lines are not headings)."""
    return re.sub(r"(?ms)^\s*```.*?^\s*```", "", markdown)


def test_readme_links_resolve():
    """Relative links in README.md and docs/evidence.md point at files (and headings) that exist."""
    for doc in (README, ROOT / "docs" / "evidence.md"):
        text = re.sub(r"`[^`\n]*`", "", _strip_fences(doc.read_text()))  # no links inside code
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve() if target else doc
            assert path.exists(), f"{doc.name} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(_strip_fences(path.read_text())), \
                    f"{doc.name} links to {target}#{anchor}: no such heading in {path.name}"


if __name__ == "__main__":
    print(block_to_paste())


# ---- "Does it work?": every number from a results JSON ------------------------------------------

RESULTS = ROOT / "benchmarks" / "results"


def _numbers(value, out: set[float], max_list: int = 20) -> None:
    """Every number in a JSON value, skipping long lists (per-image predictions, which would match anything);
    a short list of numbers (one per seed) also gives its length, mean and sample sd; keys give their numbers."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out.add(float(value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _numbers(str(k), out, max_list)  # keys name budgets and sizes ("remedis@0.25", "10%")
            _numbers(v, out, max_list)
    elif isinstance(value, list) and len(value) <= max_list:
        for v in value:
            _numbers(v, out, max_list)
        numeric = [float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if 2 <= len(numeric) == len(value):  # per-seed values: their count, mean and sd are figures too
            out.add(float(len(numeric)))
            out.add(sum(numeric) / len(numeric))
            out.add(statistics.stdev(numeric))
    elif isinstance(value, str):
        out.update(float(x) for x in re.findall(r"\d+(?:\.\d+)?", value))


def test_every_number_in_does_it_work_comes_from_a_results_json():
    """The README's "Does it work?" section names its result files; each number it prints (AUROCs, counts,
    budgets, sizes) must occur in one of them, a decimal as the JSON's value (or a mean or sd of per-seed
    values) rounded to the digits shown, a percentage also as a fraction."""
    import json

    text = README.read_text()
    section = text.split("## Does it work?", 1)[1].split("\n## ", 1)[0]
    files = sorted(set(re.findall(r"benchmarks/results/([\w.+-]+\.json)", section)))
    assert files, "the section names no benchmarks/results/*.json"
    values: set[float] = set()
    for name in files:
        assert (RESULTS / name).is_file(), f"{name} is named but not in benchmarks/results"
        _numbers(json.loads((RESULTS / name).read_text()), values)
    prose = re.sub(r"`[^`]*`|\]\([^)]*\)|\S+\.(?:json|md|yaml|py)\b", " ", section)  # paths and code are not figures
    missing = []
    for number, percent in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)(%?)", prose):
        digits = len(number.split(".")[1]) if "." in number else 0
        x = float(number)
        candidates = {x} | ({x / 100} if percent else set())
        if not any(round(v, max(digits, 2 if c < 1 and percent else digits)) == c for v in values for c in candidates):
            missing.append(number + percent)
    assert not missing, f"numbers in 'Does it work?' not found in {files}: {missing}"
