"""Outputs replaced whole (pipeline/outputs.py): staging + swap, locks, leftovers, workers that die with the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import outputs
from pipeline.io import atomic_path, write_json
from pipeline.outputs import OutputBusyError, output_lock, remove_leftovers, replaced_dir, swap_in


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_dir(dest: Path, files: dict[str, str]) -> None:
    with replaced_dir(dest) as staging:
        for name, text in files.items():
            (staging / name).write_text(text)


def test_replaced_dir_swaps_the_whole_directory(tmp_path):
    dest = tmp_path / "out"
    write_dir(dest, {"a": "1", "b": "1"})
    write_dir(dest, {"a": "2"})  # "b" must not survive: the old directory is replaced, not merged into
    assert tree(dest) == {"a": "2"}
    assert hidden(tmp_path) == []


def test_replaced_dir_keeps_the_old_output_on_an_exception(tmp_path):
    dest = tmp_path / "out"
    write_dir(dest, {"a": "1"})
    with pytest.raises(RuntimeError), replaced_dir(dest) as staging:
        (staging / "a").write_text("half")
        raise RuntimeError("killed")
    assert tree(dest) == {"a": "1"}
    assert hidden(tmp_path) == []


def test_swap_without_rename_exchange_uses_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    dest, staging = tmp_path / "out", tmp_path / "new"
    dest.mkdir()
    (dest / "a").write_text("old")
    staging.mkdir()
    (staging / "a").write_text("new")
    swap_in(staging, dest)
    assert tree(dest) == {"a": "new"} and tree(staging) == {"a": "old"}


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dest, dead, alive = tmp_path / "out", dead_pid(), os.getpid()
    (tmp_path / f".out.staging-{dead}-ab12").mkdir()
    (tmp_path / f".out.tmp-{dead}-cd34.pt").write_text("full-size checkpoint copy")
    (tmp_path / f".out.staging-{alive}-ef56").mkdir()
    (tmp_path / f".other.tmp-{dead}-0000").write_text("another output's")
    remove_leftovers(dest)
    assert hidden(tmp_path) == [f".other.tmp-{dead}-0000", f".out.staging-{alive}-ef56"]


def test_an_interrupted_two_rename_swap_brings_the_old_output_back(tmp_path):
    old = tmp_path / f".out.old-{dead_pid()}-ab12"
    old.mkdir()
    (old / "a").write_text("old")
    remove_leftovers(tmp_path / "out")  # killed after renaming out away, before renaming the new one in
    assert tree(tmp_path / "out") == {"a": "old"}


def test_atomic_path_leaves_no_temporary_and_names_it_after_the_target(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.startswith(f".model.pt.tmp-{os.getpid()}-") and tmp.suffix == ".pt"
        tmp.write_text("partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"ok": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_lock_is_reentrant_and_removed_afterwards(tmp_path):
    dest = tmp_path / "out"
    with output_lock(dest):
        assert hidden(tmp_path) == [".out.lock"]
        with output_lock(dest), replaced_dir(dest) as staging:  # the stage already holds it
            (staging / "a").write_text("1")
    assert hidden(tmp_path) == []


HOLD = """
import sys, time
from pipeline.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_lives_and_admitted_after_it_dies(tmp_path):
    dest = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=rf"{dest}.*pid {holder.pid}"), output_lock(dest):
            pass
    finally:
        holder.kill()  # SIGKILL: the lock file stays, but the kernel released the lock
        holder.wait()
    assert hidden(tmp_path) == [".out.lock"]
    write_dir(dest, {"a": "1"})  # a stale lock does not block
    assert tree(dest) == {"a": "1"} and hidden(tmp_path) == []


def test_fault_hook_kills_the_process_at_the_chosen_commit(tmp_path):
    script = (
        "import sys; from pipeline.io import write_json\n"
        "for i in range(3):\n    write_json(f'{sys.argv[1]}/f{i}.json', i)\n"
    )
    env = {**os.environ, outputs.FAULT_ENV: "2", outputs.FAULT_LOG_ENV: str(tmp_path / "log")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=False)
    assert done.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.glob("f*.json")) == ["f0.json"]
    assert (tmp_path / "log").read_text().splitlines() == [str(tmp_path / "f0.json"), str(tmp_path / "f1.json")]


ORPHAN = """
import os, sys, time
from pipeline.parallel import map_ordered

def work(item):
    os.write(1, f"{os.getpid()}\\n".encode())  # one write: two workers' lines never interleave
    time.sleep(120)

for _ in map_ordered(work, range(2), 2):
    pass
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_pool_workers_die_with_their_parent(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(parent.stdout.readline()) for _ in range(2)]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
