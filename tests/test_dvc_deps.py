"""Exact invalidation: the code deps of every ``dvc.yaml`` stage are exactly the project modules its command runs.

What ``wsss <stage>`` executes: ``stages/cli.py`` (which imports every stage wrapper to register its options and
calls one), the stage's wrapper ``stages/<stage>.py``, and every project module those import, transitively,
function-local imports included (a library function may import lazily; any of them may run). The other stages'
wrappers are imported by ``stages/cli.py`` but their ``main`` never runs, so their own imports are not followed.
A package ``__init__.py`` that holds only a docstring runs no code and is left out.

A stage's code deps (its ``deps:`` under ``pipeline/`` and ``stages/``) must cover that closure, and hold nothing
else: a file dep is in the closure, a folder dep has every module under it in the closure.
"""

from __future__ import annotations

import ast

import pytest
import yaml
from conftest import REPO, default_params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGE_NAMES = sorted(DVC["stages"])
PACKAGES = ("pipeline", "stages")
DISPATCHER = "stages/cli.py"
SHARED = "stages/_common.py"


def module_path(name: str) -> str | None:
    """``pipeline.models.files`` -> ``pipeline/models/files.py`` (or a package's ``__init__.py``), None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def imported_modules(path: str, module_level_only: bool = False) -> set[str]:
    """The project modules one file imports (as repository paths), the packages on the way included."""
    tree = ast.parse((REPO / path).read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports (the closure check reads them)"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import training`
    paths = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            found = module_path(".".join(parts[:end]))
            if found is not None:
                paths.add(found)
    return paths


def runs_code(path: str) -> bool:
    """False for a package ``__init__.py`` holding only a docstring."""
    body = ast.parse((REPO / path).read_text()).body
    return not (path.endswith("__init__.py") and all(isinstance(n, ast.Expr) for n in body))


def import_closure(stage: str) -> set[str]:
    """Every project file that ``wsss <stage>`` may execute (see the module docstring)."""
    wrappers = {path.relative_to(REPO).as_posix() for path in (REPO / "stages").glob("*.py")} - {DISPATCHER, SHARED}
    own = f"stages/{stage}.py"
    seen: set[str] = set()
    todo = [DISPATCHER, own]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path in wrappers and path != own:
            continue  # registered by the dispatcher, never called
        todo.extend(imported_modules(path, module_level_only=path == DISPATCHER) - seen)
    return {path for path in seen if runs_code(path) and (path not in wrappers or path == own)}


def code_deps(stage: str) -> list[str]:
    return [d for d in DVC["stages"][stage]["deps"] if d.split("/")[0] in PACKAGES]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def modules_under(dep: str) -> set[str]:
    root = REPO / dep
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    return {f.relative_to(REPO).as_posix() for f in files if runs_code(f.relative_to(REPO).as_posix())}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_module_the_stage_runs_is_a_dep(stage):
    missing = sorted(p for p in import_closure(stage) if not covered(p, code_deps(stage)))
    assert not missing, f"dvc.yaml stage '{stage}' runs these modules but does not depend on them: {missing}"


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_no_code_dep_the_stage_does_not_run(stage):
    closure = import_closure(stage)
    extra = {dep: sorted(modules_under(dep) - closure) for dep in code_deps(stage)}
    extra = {dep: files for dep, files in extra.items() if files}
    assert not extra, f"dvc.yaml stage '{stage}' depends on modules it never runs (re-runs for nothing): {extra}"


def test_closure_follows_function_local_imports_and_packages():
    # stages/cams.py imports the library inside main(); the closure must reach through it to the model files
    closure = import_closure("cams")
    assert {"stages/cams.py", "stages/_common.py", "pipeline/config.py", "pipeline/cams.py"} <= closure
    assert "pipeline/models/files.py" in closure  # cams -> models.swtformer -> models.files
    assert "pipeline/train_cls.py" not in closure  # inference does not import the training driver
    assert "stages/train_cls.py" not in closure  # registered by the dispatcher, never run


def test_closure_check_fails_on_a_missing_dep():
    deps = code_deps("train_cls")
    assert all(covered(p, deps) for p in import_closure("train_cls"))
    without_metrics = [d for d in deps if d != "pipeline/metrics.py"]
    assert not all(covered(p, without_metrics) for p in import_closure("train_cls"))


def test_module_paths():
    assert module_path("pipeline.training") == "pipeline/training.py"
    assert module_path("pipeline.models") == "pipeline/models/__init__.py"
    assert module_path("pipeline.models.no_such_module") is None
    assert module_path("numpy") is None
    assert not runs_code("pipeline/models/__init__.py") and runs_code("pipeline/training.py")


def test_the_default_pretrained_weights_are_a_dep_of_train_cls():
    """Re-writing the shipped weights (``wsss pretrain``) re-runs the classifier: they are its starting point."""
    weights = default_params().model.pretrained
    assert (REPO / weights).is_file()
    assert weights in DVC["stages"]["train_cls"]["deps"]
