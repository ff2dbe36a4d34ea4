"""The house rules that keep the project readable: rooms import one way, notebooks are committed clean."""
import ast
import json
from pathlib import Path

import clip_utils as cu

ROOT = Path(__file__).resolve().parents[1]
ROOMS = sorted((ROOT / "clip_utils").rglob("*.py"))


def _name(path: Path) -> str:
    """A room's name inside the package: `data`, or `scale.shards` for an engine room."""
    return ".".join(path.relative_to(ROOT / "clip_utils").with_suffix("").parts)


def _imports_of(path: Path) -> set[str]:
    """The rooms a room imports (`from .data import ...`, `from ..data import ...` in the engine)."""
    package = _name(path).split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {".".join(package[: len(package) - node.level + 1] + [node.module]) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level and node.module}


def test_rooms_import_one_way_without_cycles():
    graph = {_name(room): _imports_of(room) for room in ROOMS if room.stem != "__init__"}
    seen, done = set(), set()

    def visit(room, path):
        assert room not in seen - done, f"import cycle: {' -> '.join(path + [room])}"
        if room in done:
            return
        seen.add(room)
        for other in graph[room]:
            visit(other, path + [room])
        done.add(room)

    for room in graph:
        visit(room, [])
    assert not graph["config"], "config is the ground floor: it imports no other room"
    assert "data" not in graph["model"], "the image tower owns its preprocessing: model does not import data"


def test_init_only_reexports_and_every_name_resolves():
    tree = ast.parse((ROOT / "clip_utils" / "__init__.py").read_text(encoding="utf-8"))
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds  # docstring, re-exports, __all__
    assert all(hasattr(cu, name) for name in cu.__all__)
    assert len(set(cu.__all__)) == len(cu.__all__)


def test_rooms_stay_small_and_say_what_they_hold():
    for room in ROOMS:
        text = room.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 450, f"{room.name} has {len(text.splitlines())} lines: split it"
        assert ast.get_docstring(ast.parse(text)), f"{room.name} opens with no docstring"


def test_committed_notebooks_hold_no_outputs():
    notebooks = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert notebooks
    for path in notebooks:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [(i, c) for i, c in enumerate(cells) if c["cell_type"] == "code"]
        dirty = [i for i, c in code if c.get("outputs") or c.get("execution_count")]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; strip them before committing"


def test_every_chapter_ends_with_exercises_whose_solutions_share_its_setup():
    chapters = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert chapters
    for path in chapters:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        assert "".join(cells[-1]["source"]).startswith("## Exercises"), f"{path.name} does not end with Exercises"
        solutions = ROOT / "notebooks" / "solutions" / f"{path.name[:2]}_solutions.ipynb"
        assert solutions.exists(), f"{path.name}: no {solutions.relative_to(ROOT)}"
        solved = json.loads(solutions.read_text(encoding="utf-8"))["cells"]
        for k in (1, 2):  # the setup and settings cells, so a solution runs wherever its chapter runs
            assert solved[k]["source"] == cells[k]["source"], f"{solutions.name}: cell {k} differs from {path.name}'s"
