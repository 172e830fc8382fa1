"""Running a comparison grid: a scratch clone of the commit, seeds one after another, unchanged stages shared.

``dvc exp run --temp`` runs every experiment in a fresh copy of the project, and DVC's run cache cannot restore a
stage whose outputs are tracked by git (the ``cache: false`` metrics): each run repeated the whole DAG. The grid
runs instead in one scratch clone of the committed project, ``.dvc/tmp/compare/<commit>``, as workspace
experiments in seed-major order. Every run sets each key that any variant overrides (to the committed value where
its variant does not), so its params are exactly its variant's, and DVC skips the stages whose params and deps did
not change since the previous run in that workspace: variants that differ only in ``refine`` re-run refine and
what follows, not the classifier. Each finished run is pushed to the project (``dvc exp push origin``), where
``dvc exp show`` lists it; a run that already exists there is not repeated, so a killed grid resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.compare import Grid, experiment_name, experiments, format_value
from pipeline.errors import ConfigError

SCRATCH = Path(".dvc/tmp/compare")


def param_value(params: dict, key: str) -> Any:
    """``params["a"]["b"]`` for ``key`` ``a.b``.

    Raises:
        ConfigError: If params.yaml has no such key (a variant could not be undone by the next run).
    """
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"grid key {key!r} is not in params.yaml: every overridden key needs a committed value")
        value = value[part]
    return value


def run_overrides(grid: Grid, variant: str, seed: int, params: dict) -> dict[str, Any]:
    """The ``-S`` set of one run: the seed, then every key any variant sets (this variant's or the committed value).

    Args:
        grid: The grid.
        variant: The variant to run.
        seed: Its seed.
        params: The committed ``params.yaml``.
    """
    keys = dict.fromkeys(key for overrides in grid.variants.values() for key in overrides)
    chosen = grid.variants[variant]
    return {"seed": seed, **{key: chosen[key] if key in chosen else param_value(params, key) for key in keys}}


def exp_run_command(grid: Grid, variant: str, seed: int, params: dict) -> list[str]:
    """The ``dvc exp run`` command line of one run (a workspace experiment of the scratch clone)."""
    command = ["dvc", "exp", "run", "-n", experiment_name(grid, variant, seed)]
    for key, value in run_overrides(grid, variant, seed, params).items():
        command += ["-S", f"{key}={format_value(value)}"]
    target = grid.target_of(variant)
    return command + ([target] if target else [])


def run_order(grid: Grid) -> list[tuple[int, str]]:
    """``(seed, variant)`` pairs, seed-major: the variants of one seed share its data and unchanged stages."""
    return [(seed, variant) for seed in grid.seeds for variant in grid.variants]


def _git(*args: str, cwd: Path | str = ".") -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def commit_of(rev: str) -> str:
    """The full commit hash of a revision (``HEAD``, a branch, a short hash).

    Raises:
        ConfigError: If git does not know the revision.
    """
    result = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"{rev!r} is not a commit of this repository")
    return result.stdout.strip()


def require_committed() -> str:
    """The commit the grid runs: the scratch clone holds committed files only.

    Returns:
        The HEAD commit.

    Raises:
        ConfigError: If a tracked file has uncommitted changes (they would not be part of the runs).
    """
    changed = _git("status", "--porcelain", "--untracked-files=no")
    if changed:
        first = changed.splitlines()[0].split(maxsplit=1)[-1]  # "XY path" (the output is stripped)
        raise ConfigError(f"uncommitted changes ({first}, ...): a grid runs the committed project; commit them first")
    return commit_of("HEAD")


def scratch_clone(commit: str) -> Path:
    """The grid's workspace: a clone of ``commit`` sharing the project's git objects and DVC cache (made once)."""
    path = SCRATCH / commit[:12]
    if not (path / ".git").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _git("clone", "--quiet", "--shared", "--no-checkout", ".", str(path))
        _git("checkout", "--quiet", "--detach", commit, cwd=path)
        cache = Path(".dvc/cache").resolve()
        subprocess.run(["dvc", "config", "--local", "cache.dir", str(cache)], cwd=path, check=True)
    return path


def run_context(commit: str) -> dict[str, Any]:
    """Where this command's runs ran: the commit, the CPU cores and OMP_NUM_THREADS (both change the trajectory)."""
    return {
        "commit": commit[:12],
        "cpu_cores": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def dvc_json(*args: str, cwd: Path | str = ".") -> list[dict]:
    """``dvc <args> --json`` parsed.

    Raises:
        ConfigError: If dvc fails (its last error line).
    """
    result = subprocess.run(["dvc", *args, "--json"], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"`dvc {' '.join(args)}` failed: {last}")
    return json.loads(result.stdout)


def run_grid(grid: Grid, params: dict, echo: Callable[[str], None] = print) -> list[str]:
    """Run the grid's experiments that do not exist yet, in the scratch clone, one after the other.

    Args:
        grid: The grid.
        params: The committed ``params.yaml``.
        echo: Where progress lines go.

    Returns:
        The names of the runs that failed (the others are in the project's ``dvc exp show``).
    """
    commit = require_committed()
    for seed, variant in run_order(grid):
        run_overrides(grid, variant, seed, params)  # every key is checked before the first run
    done = experiments(dvc_json("exp", "show"))
    workspace = scratch_clone(commit)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(workspace.resolve()), os.environ.get("PYTHONPATH")])),
    }
    order, failed = run_order(grid), []
    for index, (seed, variant) in enumerate(order, 1):
        name, command = experiment_name(grid, variant, seed), exp_run_command(grid, variant, seed, params)
        if name in done:
            echo(f"[{index}/{len(order)}] {name}: already run, kept")
            continue
        echo(f"[{index}/{len(order)}] {name}: {' '.join(command)}   (in {workspace})")
        start = time.monotonic()
        push = ["dvc", "exp", "push", "--quiet", "--no-cache", "origin", name]
        ok = all(subprocess.run(step, cwd=workspace, env=env, check=False).returncode == 0 for step in (command, push))
        echo(f"[{index}/{len(order)}] {name}: {'done' if ok else 'FAILED'} in {time.monotonic() - start:.0f} s")
        if not ok:
            failed.append(name)
    return failed
