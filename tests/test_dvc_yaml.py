"""``dvc.yaml`` agrees with the code: each stage reads exactly the params sections it declares, and more."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest
import yaml
from conftest import REPO, default_params

from pipeline import config
from pipeline.config import Params, StageParams
from stages.cli import STAGES

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGE_NAMES = sorted(DVC["stages"])
# attributes of StageParams that are not sections
STAGE_PARAMS_API = {"digest", "sections", "leaf"}


def declared(name: str) -> set[str]:
    entries = DVC["stages"][name].get("params", [])
    assert all(isinstance(e, str) for e in entries), f"{name}: params entries must be section names: {entries}"
    return set(entries)


def test_every_cli_stage_is_a_dvc_stage():
    assert set(STAGES) == set(STAGE_NAMES)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_sections_match_dvc_params(name):
    module = importlib.import_module(f"stages.{name}")
    assert isinstance(module.SECTIONS, tuple)
    assert len(set(module.SECTIONS)) == len(module.SECTIONS), "no duplicates"
    assert set(module.SECTIONS) == declared(name)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_declared_sections_exist(name):
    sections = {entry for entry in declared(name) if "." not in entry}
    assert sections <= set(config.SECTIONS)
    assert set(config.SECTIONS) == set(Params.model_fields)
    StageParams(default_params(), tuple(declared(name)))  # every declared section.key exists


def test_a_stage_may_declare_one_key_of_another_section():
    params = StageParams(default_params(), ("seed", "refine.method"))
    assert params.leaf("refine.method") == default_params().refine.method
    with pytest.raises(AttributeError, match="did not declare params section 'refine'"):
        _ = params.refine
    with pytest.raises(AttributeError, match="did not declare the params key 'refine.crf'"):
        params.leaf("refine.crf")
    with pytest.raises(KeyError, match="unknown params key 'refine.no_such_key'"):
        StageParams(default_params(), ("refine.no_such_key",))
    base = default_params()
    other = base.model_copy(update={"refine": base.refine.model_copy(update={"workers": 3})})
    switched = base.model_copy(update={"refine": base.refine.model_copy(update={"method": "psa"})})
    assert StageParams(other, params.sections).digest() == params.digest()  # the section's other keys don't count
    assert StageParams(switched, params.sections).digest() != params.digest()


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_cmd_runs_the_stage(name):
    cmd = " ".join(DVC["stages"][name]["cmd"].split())
    assert cmd == f"wsss {name}" or cmd.startswith(f"wsss {name} ")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_cmd_options_exist(name):
    # every --option in the dvc.yaml command is an option of the stage (typer would reject it at run time)
    options = {"--" + p.replace("_", "-") for p in inspect.signature(STAGES[name].main).parameters}
    used = {word for word in DVC["stages"][name]["cmd"].split() if word.startswith("--")}
    assert used <= options


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_deps_exist(name):
    outs = {o for stage in DVC["stages"].values() for o in _declared(stage, "outs")}
    for dep in DVC["stages"][name].get("deps", []):
        assert dep in outs or (REPO / dep).exists(), f"{name}: dependency {dep} is neither in the repo nor an out"
    own = f"stages/{name}.py"
    assert own in DVC["stages"][name]["deps"], f"{name} must depend on its own module {own}"


def _declared(stage: dict, kind: str) -> dict[str, dict]:
    """A stage's ``outs`` or ``metrics`` as ``{path: options}`` (an entry is a path or ``{path: options}``)."""
    entries = {}
    for entry in stage.get(kind, []):
        path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        entries[path] = options or {}
    return entries


def _outs_cover(path: str) -> bool:
    for stage in DVC["stages"].values():
        for out in {**_declared(stage, "outs"), **_declared(stage, "metrics")}:
            if path == out or path.startswith(out.rstrip("/") + "/"):
                return True
    return False


@pytest.mark.parametrize("name", [n for n in STAGE_NAMES if n != "prepare"])
def test_metrics_are_tracked_by_git(name):
    # a fresh clone shows the committed run's metrics (`dvc metrics show`) only if git, not DVC's cache, holds them
    metrics = _declared(DVC["stages"][name], "metrics")
    assert metrics == {f"results/{name}/metrics.json": {"cache": False}}


def test_small_results_in_git_large_ones_in_the_cache():
    for name, stage in DVC["stages"].items():
        for path, options in _declared(stage, "outs").items():
            large = path.startswith(("data/", "models/")) or path.endswith("/images")
            assert options.get("cache", True) is large, f"{name}: {path} cache={options.get('cache', True)}"


def test_top_level_plots_are_outs():
    paths = []
    for plot in DVC["plots"]:
        if isinstance(plot, str):
            paths.append(plot)
            continue
        ((title, spec),) = plot.items()
        y = (spec or {}).get("y")
        paths.extend(y if isinstance(y, dict) else [title])
    assert len(paths) >= 6
    for path in paths:
        assert _outs_cover(path), path


def test_undeclared_section_raises_at_access():
    params = StageParams(default_params(), ("cams",))
    assert params.cams.shard_size == default_params().cams.shard_size
    with pytest.raises(AttributeError, match="did not declare params section 'model'"):
        _ = params.model
    with pytest.raises(AttributeError):
        _ = params.train_cls.epochs
    with pytest.raises(KeyError):
        StageParams(default_params(), ("cams", "no_such_section"))


def test_digest_depends_only_on_declared_sections():
    # a checkpoint stays valid when an undeclared section changes, and not when a declared one does
    base = default_params()
    changed_other = base.model_copy(update={"cams": base.cams.model_copy(update={"shard_size": 3})})
    changed_own = base.model_copy(update={"loss": base.loss.model_copy(update={"ccl": False})})
    sections = importlib.import_module("stages.train_cls").SECTIONS
    digest = StageParams(base, sections).digest()
    assert StageParams(changed_other, sections).digest() == digest
    assert StageParams(changed_own, sections).digest() != digest


# --- static check: the code a stage runs reads only the sections it declares --------------------------------


def _attributes_of(source: str, name: str) -> set[str]:
    """Every ``<name>.<attr>`` in ``source``."""
    tree = ast.parse(textwrap.dedent(source))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name
    }


def _params_variable(module) -> str:
    """The name bound by ``with stage_params(...) as <name>`` in the stage's ``main``."""
    return _params_variable_of(module.main)


def _params_variable_of(function) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "stage_params":
                    return item.optional_vars.id
    raise AssertionError(f"{function.__qualname__} does not use `with stage_params(...) as p`")


def _library_calls(module) -> list:
    """The ``pipeline.*`` functions that the stage's ``main`` calls."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(module.main)))
    names = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    scope = {**vars(module), **_local_imports(tree)}
    callees = [scope.get(n) for n in sorted(names)]
    return [c for c in callees if inspect.isfunction(c) and c.__module__.startswith("pipeline.")]


def _local_imports(tree: ast.AST) -> dict[str, object]:
    """Names bound by ``from module import name`` inside a function (stages import the library lazily)."""
    return {
        alias.asname or alias.name: getattr(importlib.import_module(node.module), alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }


def _called_with_params(module) -> dict[str, object]:
    """Library functions that ``main`` hands the whole StageParams object to, mapped to their parameter name."""
    return _calls_passing(module.main, _params_variable(module))


def _calls_passing(function, variable: str) -> dict[str, object]:
    """Functions that ``function`` calls with its local ``variable`` as an argument -> that parameter's name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    scope = {**function.__globals__, **_local_imports(tree)}
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.func.id == "stage_params":
            continue
        callee = scope.get(node.func.id)
        if not inspect.isfunction(callee):
            continue
        signature = list(inspect.signature(callee).parameters)
        for position, arg in enumerate(node.args):
            if isinstance(arg, ast.Name) and arg.id == variable:
                found[signature[position]] = callee
        for keyword in node.keywords:
            if isinstance(keyword.value, ast.Name) and keyword.value.id == variable:
                found[keyword.arg] = callee
    return found


def _sections_read(function, variable: str, seen: set | None = None) -> set[str]:
    """Attributes read from ``variable`` in ``function`` and, recursively, in the functions it hands it to."""
    seen = set() if seen is None else seen
    if function in seen:
        return set()
    seen.add(function)
    read = _attributes_of(inspect.getsource(function), variable) - STAGE_PARAMS_API
    for argument, callee in _calls_passing(function, variable).items():
        read |= _sections_read(callee, argument, seen)
    return read


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_module_reads_only_declared_sections(name):
    module = importlib.import_module(f"stages.{name}")
    read = _attributes_of(inspect.getsource(module.main), _params_variable(module)) - STAGE_PARAMS_API
    assert read or _called_with_params(module), f"stages/{name}.py uses no params section?"
    assert read <= set(module.SECTIONS), f"stages/{name}.py reads undeclared sections {read - set(module.SECTIONS)}"


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_library_functions_read_only_declared_sections(name):
    module = importlib.import_module(f"stages.{name}")
    read = _sections_read(module.main, _params_variable(module))
    assert read, f"stages/{name}.py uses no params section?"
    assert read <= set(module.SECTIONS), f"the code of stage {name} reads undeclared {read - set(module.SECTIONS)}"


def _helper_reading_model(params):
    return params.model.version


def _fake_stage_main(params):
    with stage_params(params, ("cams",)) as p:  # noqa: F821 - never run, only parsed
        return p.cams, _helper_reading_model(p)


def test_static_checker_catches_an_undeclared_read():
    # the recursive check sees a section read two calls away from the stage's main
    assert _params_variable_of(_fake_stage_main) == "p"
    assert _sections_read(_fake_stage_main, "p") == {"cams", "model"}


def test_static_checker_follows_train_classifier_helpers():
    from pipeline import train_cls

    assert train_cls._meta in _calls_passing(train_cls.train_classifier, "params").values()
    assert _sections_read(train_cls._meta, "params") == {"model", "train_cls", "data", "loss"}
