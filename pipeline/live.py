"""The dvclive run that a stage writes its metrics, plots and pictures to (``<results>/``)."""

from __future__ import annotations

from pathlib import Path

from dvclive import Live


def open_live(results_dir: Path | str) -> Live:
    """Open ``results_dir`` as a dvclive run, set up the way every stage uses it.

    The project's ``dvc.yaml`` declares the metrics and plots and ``dvc repro`` / ``dvc exp run`` track the runs,
    so dvclive writes no ``dvc.yaml`` of its own, saves no experiment and renders no report.

    Args:
        results_dir: The stage's results directory (``metrics.json``, ``plots/``).

    Returns:
        The run; the caller ends it with ``live.end()``.
    """
    return Live(str(results_dir), dvcyaml=None, save_dvc_exp=False, report=None)
