"""What every command shares: the ``--params`` option, logging, and one-line exits for every error.

User errors (:class:`pipeline.errors.UserError`) exit with 2, OS errors (disk full, read-only file system,
permissions, ...) with 1 and a hint, anything else with 1 and a pointer to ``--debug``. ``wsss --debug <command>``
or ``WSSS_DEBUG=1`` prints the full traceback instead of the one line (for bug reports). ``WSSS_NPROC_PER_NODE=N``
runs the commands that can run under ``torchrun`` in N processes (:func:`relaunch_under_torchrun`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import click
import typer

from pipeline.config import StageParams, load_sections
from pipeline.errors import ConfigError, UserError, one_line
from pipeline.outputs import claimed

EXIT_ENVIRONMENT = 1
EXIT_USAGE = 2
DEBUG_ENV = "WSSS_DEBUG"
NPROC_ENV = "WSSS_NPROC_PER_NODE"
DISTRIBUTED = ("train_cls", "cams", "train_aff", "refine", "train_seg", "evaluate")  # commands that run under torchrun
_debug = {"on": False}

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Params file; validated as a whole, only this stage's sections are read.")
]

OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write the outputs elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write the outputs elsewhere",
    errno.EROFS: "write the outputs to a writable folder, or remount it read-write",
    errno.EACCES: "fix the permissions of the path (or its folder) or choose another one",
    errno.EPERM: "fix the permissions of the path (or its folder) or choose another one",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder where a file is expected: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or lower the number of workers",
}


def relaunch_under_torchrun(argv: list[str]) -> None:
    """Under ``WSSS_NPROC_PER_NODE=N`` (N > 1), replace this process by ``torchrun`` running ``wsss <argv>`` N times.

    Only for the commands that run under ``torchrun`` (:data:`DISTRIBUTED`), and not in a process that ``torchrun``
    started (``WORLD_SIZE`` set) or for ``--help``: so ``dvc repro`` uses N processes per stage without a change to
    ``dvc.yaml`` or the params. One node (``--standalone``); several nodes: run ``torchrun`` yourself.

    Args:
        argv: The command line after the program name (``cams --params p.yaml``, ``--debug refine``).

    Raises:
        typer.Exit: Code 2 with one line if the variable is not a whole number >= 1.
    """
    value = os.environ.get(NPROC_ENV, "").strip()
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if not value or command not in DISTRIBUTED or "WORLD_SIZE" in os.environ or "--help" in argv:
        return
    if not value.isdigit() or int(value) < 1:
        with user_errors():
            raise ConfigError(f"{NPROC_ENV}={value!r}: expected the number of processes per node (1 or more)")
    if int(value) > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(value)}"]
        os.execv(sys.executable, [*launcher, "-m", "stages.cli", *argv])


def set_debug(on: bool) -> None:
    """Show full tracebacks instead of one-line errors (the global ``--debug`` option)."""
    _debug["on"] = on


def debug_enabled() -> bool:
    """``--debug`` was given or ``WSSS_DEBUG`` is set to something other than ``0``/``false``/empty."""
    return _debug["on"] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def describe_os_error(exc: OSError) -> str:
    """One line for an OS error: the path(s), the cause and a hint (e.g. ``/x: No space left ... (the disk ...)``)."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    cause = exc.strerror or one_line(exc)
    hint = OS_HINTS.get(exc.errno, "a file system error: check the path, the disk and its permissions")
    return f"{paths + ': ' if paths else ''}{cause} ({hint})"


@contextlib.contextmanager
def stage_params(path: Path, sections: tuple[str, ...], outputs: tuple[Path, ...] = ()) -> Iterator[StageParams]:
    """Configure logging, load a stage's params sections, lock its outputs; every error -> one line (module doc).

    Args:
        path: The params file.
        sections: The sections the stage reads (the same list as its ``params:`` in ``dvc.yaml``).
        outputs: What the stage writes; a second run on any of them is refused while this one lives.

    Yields:
        The validated sections.
    """
    with user_errors():
        params = load_sections(path, sections)  # bad params stop before anything is created
        with claimed(outputs):
            yield params


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Configure logging and turn every error into one ``error: ...`` line and an exit code (see module doc)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        yield
    except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise  # a deliberate exit, already reported
    except UserError as exc:
        _exit(exc, one_line(exc), EXIT_USAGE)
    except OSError as exc:
        _exit(exc, describe_os_error(exc), EXIT_ENVIRONMENT)
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, the traceback behind --debug
        _exit(exc, describe_unexpected(exc), EXIT_ENVIRONMENT)


def describe_unexpected(exc: Exception) -> str:
    """One line for an exception the code did not anticipate: out of memory, or probably a bug."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError too
        return (
            f"out of memory ({type(exc).__name__}: {one_line(exc)}): lower the batch size, the image size or the "
            "number of workers, or use a machine with more memory"
        )
    if type(exc).__name__ == "BrokenProcessPool":
        return (
            "a worker process died (killed, or out of memory?); the stage's outputs were not replaced: run it "
            "again, with fewer workers if memory is short"
        )
    return (
        f"unexpected {type(exc).__name__}: {one_line(exc)} (probably a bug: run again with `wsss --debug ...` "
        f"or {DEBUG_ENV}=1 and report the traceback)"
    )


def _exit(exc: BaseException, message: str, code: int) -> None:
    if debug_enabled():
        typer.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None
