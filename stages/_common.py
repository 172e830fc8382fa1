"""What every stage command shares: the ``--params`` option, logging, and one-line exits for user errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import StageParams, load_sections
from pipeline.errors import UserError
from pipeline.outputs import claimed

EXIT_USAGE = 2

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Params file; validated as a whole, only this stage's sections are read.")
]


@contextlib.contextmanager
def stage_params(path: Path, sections: tuple[str, ...], outputs: tuple[Path, ...] = ()) -> Iterator[StageParams]:
    """Configure logging, load a stage's params sections, lock its outputs; user errors -> ``error: ...`` + exit 2.

    Args:
        path: The params file.
        sections: The sections the stage reads (the same list as its ``params:`` in ``dvc.yaml``).
        outputs: What the stage writes; a second run on any of them is refused while this one lives.

    Yields:
        The validated sections.
    """
    with user_errors(), claimed(outputs):
        yield load_sections(path, sections)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Configure logging and turn user errors into ``error: ...`` + exit 2 (for commands without params)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        yield
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
