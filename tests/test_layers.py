"""docs/design.md §3's layer table as code: no module of src/medssl imports a layer above it."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medssl"

# part -> parts it may import directly (docs/design.md §3), closed transitively below.
TABLE: dict[str, set[str]] = {
    "config": set(),
    "schedules": {"config"},  # per-step schedules: lr, weight decay, momentum, temperatures, epoch knobs
    "training_module": set(),  # the contract the one optimiser step drives (Protocol, default hooks)
    "data": {"config"},
    "models": {"config"},
    "runs": {"config"},
    "methods": {"models", "data", "config", "schedules", "training_module"},
    "evaluate": {"models", "data"},
    "train": {"methods", "models", "data", "evaluate", "runs"},
    "results": {"runs", "config"},  # the tidy results table read from run directories
    "analysis": {"evaluate", "models", "data", "runs", "results"},
    "export": {"models", "data", "runs"},  # MONAI state dicts and bundles, read from checkpoints and run dirs
    "bench": {"train", "analysis", "runs"},
    "report": {"analysis", "runs", "results"},
    "cli": {
        "bench",
        "report",
        "train",
        "analysis",
        "evaluate",
        "export",
        "methods",
        "models",
        "data",
        "runs",
        "results",
    },
}
BASE = {"", "errors", "fileio", "version", "limits", "budget"}  # no medssl imports but errors: every layer may use them
# Known exceptions, named so that a new one fails: the corpus manifest is written through the run
# directory's atomic writer, and `medssl bench` builds its report at the end of a benchmark.
EXCEPTIONS = {("data/corpus.py", "runs"), ("bench/engine.py", "report")}


def allowed(part: str) -> set[str]:
    seen, todo = set(), [part]
    while todo:
        for below in TABLE[todo.pop()]:
            if below not in seen:
                seen.add(below)
                todo.append(below)
    return seen | {part} | BASE


def part_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else ""


def imported_parts(source: str) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "medssl" else [])
        for name in names:
            bits = name.split(".")
            if bits[0] == "medssl":
                parts.add(bits[1] if len(bits) > 1 else "")
    return parts


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        part = part_of(path, root)
        if part not in TABLE and part not in BASE:
            found.append(f"{path.relative_to(root)}: part '{part}' is not in the layer table")
            continue
        ok = BASE if part in BASE else allowed(part)
        rel = path.relative_to(root).as_posix()
        for used in imported_parts(path.read_text(encoding="utf-8")) - ok:
            if (rel, used) not in EXCEPTIONS:
                found.append(f"{rel} imports medssl.{used}, above its layer '{part or 'medssl'}'")
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    assert violations(SRC) == []


def test_an_upward_import_fails(tmp_path: Path) -> None:
    """A temporary copy of the tree with one deliberately added upward import: the check must catch it."""
    root = tmp_path / "medssl"
    for path in SRC.rglob("*.py"):
        target = root / path.relative_to(SRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (root / "methods" / "upward.py").write_text(
        textwrap.dedent("""
        def plan():
            from medssl.bench.plan import expand_plan  # a method reaching into the benchmark engine
            return expand_plan
    """),
        encoding="utf-8",
    )
    assert violations(root) == ["methods/upward.py imports medssl.bench, above its layer 'methods'"]


def design_table(path: Path) -> dict[str, set[str]]:
    """The layer table of docs/design.md §3: ``| `part` | holds | may import |`` rows."""
    rows: dict[str, set[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not (cells[0].startswith("`") and cells[0].endswith("`")):
            continue
        below = cells[2]
        rows[cells[0].strip("`")] = set() if below == "—" else {p.strip() for p in below.split(",")}
    return rows


def test_the_design_document_states_this_table() -> None:
    """The design document's table and the enforced one are the same table (cli: everything above it)."""
    documented = design_table(SRC.parents[1] / "docs" / "design.md")
    enforced = {part: set(below) for part, below in TABLE.items()}
    assert documented.pop("cli") == {"everything above"}
    enforced.pop("cli")
    assert documented == enforced
