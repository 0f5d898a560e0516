"""The shape of the code, checked: layers that only point down, no import cycle, every workdir path spelled in
one module, no environment variable read for behaviour, no print below the orchestration layer, every
package installed and every module documented in docs/architecture.md.

Imports are read from the source (every ``import`` statement, inside functions and ``TYPE_CHECKING`` blocks
too), so a lazy import cannot hide an upward dependency or a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import from its own layer and the layers below it, never above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["autoseg.version", "autoseg.errors", "autoseg.artifacts", "autoseg.claims"]),
    ("schema", ["autoseg.schema"]),
    ("workdir", ["autoseg.workdir"]),
    ("building blocks", ["autoseg.io", "autoseg.dataset", "autoseg.parallel", "autoseg.device", "autoseg.distributed",
                         "autoseg.nets", "autoseg.losses", "autoseg.regions", "autoseg.instances", "autoseg.normalize",
                         "autoseg.resample",
                         "autoseg.augment",
                         "autoseg.loader", "autoseg.sliding_window", "autoseg.metrics", "autoseg.lesionwise", "autoseg.postprocess",
                         "autoseg.checkpoint", "autoseg.trainlog", "autoseg.crossval", "autoseg.synth"]),
    ("stages", ["autoseg.validate", "autoseg.fingerprint", "autoseg.plan", "autoseg.planners", "autoseg.preprocess",
                "autoseg.train", "autoseg.ensemble", "autoseg.predict_inputs", "autoseg.quality", "autoseg.inference",
                "autoseg.detected_instances", "autoseg.oof",
                "autoseg.select", "autoseg.predict", "autoseg.evaluate", "autoseg.report", "autoseg.bundle",
                "autoseg.export", "autoseg.msd", "autoseg.dicom", "autoseg.finetune"]),
    ("orchestration", ["autoseg.workflow", "autoseg.workers", "autoseg.search", "autoseg.status", "autoseg.benchmark", "autoseg.demo"]),
    ("command line", ["autoseg.cli", "autoseg.__main__"]),
    ("public surface", ["autoseg"]),
]
BELOW_ORCHESTRATION = {name for layer, names in LAYERS[:5] for name in names}
ENVIRONMENT_READERS = {
    "autoseg.cli": "the command line: the documented cache folder (AUTOSEG_CACHE_DIR) and its process defaults",
    "autoseg.distributed": "torchrun's protocol: RANK, LOCAL_RANK, WORLD_SIZE describe the process group",
}


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (the built-in planners install as autoseg.planners)."""
    files = {}
    for path in sorted((ROOT / "autoseg").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "planners").glob("*.py")):
        files["autoseg.planners" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The autoseg modules ``name`` imports, wherever in the file the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # an attribute of a module, or a third-party name
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    """Every module after the modules it imports (a topological order; there is one when there is no cycle)."""
    order: list[str] = []
    done: set[str] = set()

    def place(v: str) -> None:
        if v in done:
            return
        done.add(v)
        for w in sorted(graph[v]):
            place(w)
        order.append(v)

    for v in sorted(graph):
        place(v)
    return order


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_every_module_imports_only_its_own_layer_and_those_below():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    """Imported one by one, each after what it imports: a cycle or a module that needs a later one's side effect
    fails here."""
    order = [m for m in dependency_order(import_graph()) if m != "autoseg.__main__"]  # __main__ runs the CLI
    script = f"import importlib\nfor m in {order!r}:\n    importlib.import_module(m)\nprint(len({order!r}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(order))


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("autoseg.cli") > layer_of("autoseg.workflow") > layer_of("autoseg.train") > layer_of("autoseg.nets")


def _constants(tree: ast.AST) -> list[ast.Constant]:
    """String constants that are not docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


# the bundle's plans member is the same artifact as a workdir's plans.json, inside a zip (its own name there)
BUNDLE_MEMBER_NAMES = {("autoseg.bundle.layout", "plans.json")}


def _path_parts(tree: ast.AST) -> set[int]:
    """Constants used as a piece of a path: an operand of ``/``."""
    return {id(side) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
            for side in (n.left, n.right)}


def spelled_workdir_names(tree: ast.AST, files: set[str], folders: set[str]) -> list[ast.Constant]:
    """A workdir file name anywhere, or a workdir folder name joined into a path (``x / "runs"``, ``"runs/..."``);
    a folder name that is an ordinary word elsewhere (a "search" option) is not a path."""
    joined = _path_parts(tree)
    return [c for c in _constants(tree) if c.value in files or (c.value in folders and id(c) in joined)
            or any(f"{d}/" in c.value or f"/{d}" in c.value for d in folders)]


def test_no_module_but_the_workdir_spells_a_workdir_file_or_folder_name():
    from autoseg import workdir

    names = {v for k, v in vars(workdir).items() if k.isupper() and isinstance(v, str)}
    files, folders = {n for n in names if "." in n}, {n for n in names if "." not in n}
    assert {"plans.json", "selection.json", "checkpoint_final.pt", "log.csv"} <= files
    assert {"runs", "preprocessed", "validation", "search"} <= folders
    found = [f"{name}:{c.lineno}: {c.value!r}" for name, path in module_files().items() if name != "autoseg.workdir"
             for c in spelled_workdir_names(ast.parse(path.read_text()), files, folders)
             if (name, c.value) not in BUNDLE_MEMBER_NAMES]
    assert found == []
    sample = ast.parse('a = work / "runs" / "x"\nb = {"search": 1}\nc = "plans.json"\nd = "runs/x"')
    assert sorted(c.value for c in spelled_workdir_names(sample, files, folders)) == ["plans.json", "runs", "runs/x"]


def test_only_the_command_line_and_torchrun_protocol_read_the_environment():
    readers = set()
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.add(name)
    assert readers == set(ENVIRONMENT_READERS)


def test_no_library_module_below_the_orchestration_layer_prints():
    printing = [f"{name}:{node.lineno}" for name, path in module_files().items() if name in BELOW_ORCHESTRATION
                or layer_of(name) < layer_of("autoseg.workflow")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert printing == []


def test_the_public_surface_resolves_every_name():
    import autoseg

    assert all(getattr(autoseg, name) is not None for name in autoseg.__all__)


def test_pyproject_installs_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert listed == packages


def test_docs_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [name for name in module_files() if f"`{name}`" not in text and name != "autoseg.__main__"]
    assert missing == []


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_docs_link_nothing_outside_the_repository(doc):
    import re

    text = (ROOT / doc).read_text()
    assert "../" not in text and "shared/DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert not target.startswith(("/", "http")) and (ROOT / Path(doc).parent / target).exists(), target
