"""Sharded inference stages: the split and merge rules, and WSSS_NPROC_PER_NODE's relaunch under ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import typer

from pipeline.data.datasets import index_batches, same_size_batches, size_batches
from pipeline.metrics import SeedEvaluator, threshold_grid
from pipeline.parallel import resolve_workers
from pipeline.runtime import Dist
from pipeline.shard import Shard, disagreement
from pipeline.viz import Picks
from stages import _common


@dataclass(frozen=True)
class MainOfFakeLaunch(Shard):
    """Rank 0 of a launch whose other ranks are simulated: each round they hand in their next ``chunk`` results."""

    others: list = field(default_factory=list)  # rank r >= 1: an iterator over its results
    chunk: int = 1

    def gather(self, value):
        return [value, *([item for _, item in zip(range(self.chunk), rank, strict=False)] for rank in self.others)]


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("count", [0, 1, 7, 12])
@pytest.mark.parametrize("chunk", [1, 3])
def test_merged_restores_the_one_process_order(world, count, chunk):
    units = [f"unit{i}" for i in range(count)]
    ranks = [Shard(Dist(rank, world, rank)) for rank in range(world)]
    others = [iter(shard.mine(units)) for shard in ranks[1:]]
    main = MainOfFakeLaunch(Dist(0, world, 0), others=others, chunk=chunk)
    assert list(main.merged(iter(main.mine(units)), count, chunk)) == units
    assert all(next(rest, None) is None for rest in others), "every rank's results were taken"
    assert sum(len(shard.mine(units)) for shard in ranks) == count  # empty ranks when world > count


def test_one_process_takes_every_unit_and_merges_nothing():
    shard = Shard()
    assert shard.mine([1, 2, 3]) == [1, 2, 3]
    assert list(shard.merged(iter("abc"), 3)) == ["a", "b", "c"] and shard.gather(4) == [4]


def test_merged_picks_are_those_of_one_process():
    rng = np.random.default_rng(0)
    ious = rng.choice([0.1, 0.2, 0.3, np.nan], size=40)  # ties and unscored images
    whole = Picks(3)
    for order, iou in enumerate(ious):
        whole.add(float(iou), f"image{order}")
    parts = [Picks(3) for _ in range(3)]
    for order, iou in enumerate(ious):
        parts[order % 3].add(float(iou), f"image{order}", order)
    merged = Picks.merged(parts)
    assert repr(merged.first) == repr(whole.first)  # NaN IoUs too
    assert merged.worst.items() == whole.worst.items() and len(whole.worst.items()) == 3


def test_merged_seed_counts_equal_one_process():
    rng = np.random.default_rng(1)
    grid = threshold_grid(0.9, 0.1)
    images = [(rng.random((3, 8, 8)), np.array([0, 1, 2]), rng.integers(0, 3, (8, 8))) for _ in range(5)]
    whole, parts = SeedEvaluator(3, grid), [SeedEvaluator(3, grid), SeedEvaluator(3, grid)]
    for k, (maps, keys, gt) in enumerate(images):
        whole.add(maps, keys, gt)
        parts[k % 2].add(maps, keys, gt)
    merged = SeedEvaluator.merged(parts)
    assert np.array_equal(merged.argmax_confusion, whole.argmax_confusion)
    assert np.array_equal(merged.sweep_confusions, whole.sweep_confusions)


def test_index_batches():
    assert index_batches(5, 2) == [[0, 1], [2, 3], [4]] and index_batches(0, 3) == []


def test_size_batches_bucket_by_size():
    shapes = {"a": (4, 4), "b": (4, 4), "c": (4, 4), "d": (5, 4), "e": (4, 4), "f": (4, 4), "g": (5, 4)}
    ids = list(shapes)
    assert size_batches(ids, shapes.__getitem__, 2) == [["a", "b"], ["c", "e"], ["f"], ["d", "g"]]
    assert size_batches(ids, shapes.__getitem__, 8) == [["a", "b", "c", "e", "f"], ["d", "g"]]
    one_size = {"a": (4, 4), "b": (4, 4), "c": (4, 4)}  # the synthetic benchmark: the old consecutive batches
    loaded = [group for group, _ in same_size_batches(list(one_size), lambda i: np.zeros((*one_size[i], 3)), 2)]
    assert size_batches(list(one_size), one_size.__getitem__, 2) == loaded == [["a", "b"], ["c"]]


def test_ranks_that_disagree_are_one_line():
    assert disagreement("cams", ["10 images of train", "10 images of train"]) is None
    message = disagreement("cams", ["10 images of train (x)", "10 images of train (x)", "9 images of train (y)"])
    assert message == (
        "the 3 processes of this torchrun launch disagree on cams's work: rank 0 has 10 images of train (x), rank 2 "
        "has 9 images of train (y) (start every process on the same data, params and code)"
    )


def test_pool_workers_share_the_node_under_torchrun(monkeypatch):
    alone = resolve_workers(0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers(0) == max(1, alone // 2) and resolve_workers(3) == 3


# --- WSSS_NPROC_PER_NODE ------------------------------------------------------------------------------------


@pytest.fixture
def execv(monkeypatch):
    """Record ``os.execv`` calls instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append(args))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return calls


def test_nproc_relaunches_the_stage_under_torchrun(execv, monkeypatch):
    monkeypatch.setenv(_common.NPROC_ENV, "2")
    _common.relaunch_under_torchrun(["--debug", "cams", "--params", "p.yaml"])
    (args,) = execv
    assert args[1:] == [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "stages.cli", "--debug", "cams", "--params", "p.yaml"),
    ]


@pytest.mark.parametrize(
    ("value", "argv", "env"),
    [
        ("", ["cams"], {}),
        ("1", ["cams"], {}),
        ("2", ["prepare"], {}),  # not a torchrun command
        ("2", ["cams", "--help"], {}),
        ("2", ["cams"], {"WORLD_SIZE": "2"}),  # already a torchrun child
    ],
)
def test_nproc_leaves_other_cases_alone(execv, monkeypatch, value, argv, env):
    monkeypatch.setenv(_common.NPROC_ENV, value)
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    _common.relaunch_under_torchrun(argv)
    assert execv == []


@pytest.mark.parametrize("value", ["x", "0", "-2", "1.5"])
def test_a_bad_nproc_is_one_line(execv, monkeypatch, capsys, value):
    monkeypatch.setenv(_common.NPROC_ENV, value)
    with pytest.raises(typer.Exit) as stopped:
        _common.relaunch_under_torchrun(["refine"])
    assert stopped.value.exit_code == 2 and execv == []
    assert capsys.readouterr().err == (
        f"error: WSSS_NPROC_PER_NODE={value!r}: expected the number of processes per node (1 or more)\n"
    )
