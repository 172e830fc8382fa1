from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline.checkpoint import (
    Trainables,
    load_checkpoint,
    resume,
    rng_state,
    save_checkpoint,
    save_progress,
    set_rng_state,
)
from pipeline.errors import CheckpointError, TrainingError
from pipeline.runtime import Dist, resolve_device
from pipeline.training import (
    FiniteWatch,
    Recipe,
    Run,
    Task,
    averaged_weights,
    check_weights,
    epoch_indices,
    fit,
    moving_average,
    param_groups,
    rehearsal_batch,
    warmup_decay,
)


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_warmup_decay_key_points(schedule):
    total, warmup, floor = 100, 10, 0.01
    assert warmup_decay(0, total, warmup, schedule, floor) == pytest.approx(0.1)
    assert warmup_decay(4, total, warmup, schedule, floor) == pytest.approx(0.5)
    assert warmup_decay(warmup - 1, total, warmup, schedule, floor) == pytest.approx(1.0)
    assert warmup_decay(warmup, total, warmup, schedule, floor) == pytest.approx(1.0)
    assert warmup_decay(total, total, warmup, schedule, floor) == pytest.approx(floor)
    assert warmup_decay(total + 50, total, warmup, schedule, floor) == pytest.approx(floor)
    values = [warmup_decay(s, total, warmup, schedule, floor) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert all(floor <= v <= 1 for v in values)


def test_warmup_decay_midpoints():
    # after warm-up, progress 1/2 at step 10 + 45
    assert warmup_decay(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert warmup_decay(55, 100, 10, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert warmup_decay(55, 100, 10, "poly", 0.0) == pytest.approx(0.5**0.9)


def test_warmup_decay_without_warmup():
    assert warmup_decay(0, 10, 0, "cosine", 0.0) == pytest.approx(1.0)
    assert warmup_decay(10, 10, 0, "cosine", 0.0) == pytest.approx(0.0)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups():
    model = TinyNet()
    groups = param_groups(model, [model.head], lr=0.1, head_mult=10.0, wd=0.05)
    owner = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in owner
            owner[id(param)] = group
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(owner) == {id(p) for p in trainable}
    assert id(model.frozen.weight) not in owner

    def settings(param):
        group = owner[id(param)]
        return group["lr"], group["weight_decay"]

    assert settings(model.head.weight) == (pytest.approx(1.0), 0.05)
    assert settings(model.head.bias) == (pytest.approx(1.0), 0.0)
    assert settings(model.body.weight) == (pytest.approx(0.1), 0.05)
    assert settings(model.body.bias) == (pytest.approx(0.1), 0.0)
    assert settings(model.norm.weight) == (pytest.approx(0.1), 0.0)
    assert settings(model.relative_position_bias_table) == (pytest.approx(0.1), 0.0)


def test_finite_watch_names_the_first_bad_step():
    watch = FiniteWatch(torch.device("cpu"))
    watch.add(torch.tensor(1.5), step=3)
    watch.check()
    watch.add(torch.tensor(float("inf")), step=4)
    watch.add(torch.tensor(float("nan")), step=5)  # not the first: step 4 is reported
    with pytest.raises(TrainingError, match=r"^loss became inf at step 4;"):
        watch.check()
    vector = FiniteWatch(torch.device("cpu"), name="gsc")
    vector.add(torch.tensor([0.5, float("nan"), 1.0]), step=17)
    with pytest.raises(TrainingError, match=r"^gsc became nan at step 17;"):
        vector.check()


def test_epoch_indices_single_process():
    batches = list(epoch_indices(10, seed=0, epoch=0, ddp=Dist(), batch_size=3))
    assert len(batches) == 3
    assert all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert batches == list(epoch_indices(10, seed=0, epoch=0, ddp=Dist(), batch_size=3))
    assert batches != list(epoch_indices(10, seed=0, epoch=1, ddp=Dist(), batch_size=3))
    assert batches != list(epoch_indices(10, seed=1, epoch=0, ddp=Dist(), batch_size=3))


def test_epoch_indices_exact_multiple_keeps_all():
    batches = list(epoch_indices(8, seed=0, epoch=0, ddp=Dist(), batch_size=4))
    assert sorted(i for b in batches for i in b) == list(range(8))


def test_epoch_indices_shards_cover_global_batch():
    world, batch = 2, 2
    shards = [list(epoch_indices(11, 5, 2, Dist(rank=r, world_size=world), batch)) for r in range(world)]
    global_batches = list(epoch_indices(11, 5, 2, Dist(), batch * world))
    assert len(global_batches) == 2  # 11 // 4, the partial batch is dropped
    assert all(len(s) == len(global_batches) for s in shards)
    for step, global_batch in enumerate(global_batches):
        per_rank = [set(s[step]) for s in shards]
        assert all(len(part) == batch for part in per_rank)
        assert per_rank[0].isdisjoint(per_rank[1])
        assert per_rank[0] | per_rank[1] == set(global_batch)


def test_epoch_indices_too_few_samples():
    assert list(epoch_indices(3, 0, 0, Dist(), 4)) == []


def test_dist():
    assert Dist().is_main
    assert not Dist(rank=1, world_size=2).is_main


def test_checkpoint_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 12,
        "config": "abc123",
        "history": [0.5, 0.25],
        "rng": rng_state(),
    }
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 12 and loaded["config"] == "abc123" and loaded["history"] == [0.5, 0.25]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    restored = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_load_checkpoint_missing_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "none.pt") is None


class Arbitrary:
    pass


def test_load_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"thing": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match=r"cannot be read \(UnpicklingError"):  # refused, never unpickled
        load_checkpoint(path)


def test_rng_state_round_trip():
    state = rng_state()
    first = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_resolve_device_cpu():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(TrainingError, match="cuda"):
            resolve_device("cuda")


def test_check_weights_names_the_first_non_finite_tensor():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    check_weights(model, "train_cls", epoch=1)
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    with pytest.raises(TrainingError, match=r"^train_cls: weight '1.running_var' became NaN in epoch 3;"):
        check_weights(model, "train_cls", epoch=3)
    with torch.no_grad():
        model[0].bias[1] = float("-inf")
    with pytest.raises(TrainingError, match=r"weight '0.bias' became infinite in epoch 2"):
        check_weights(model, "train_seg", epoch=2)


class OneWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


class Ones(torch.utils.data.Dataset):
    epoch = 0

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((1,), 10.0)


@pytest.mark.parametrize("epochs", [1, 2])
def test_fit_never_saves_non_finite_weights(tmp_path, epochs):
    # the loss (10 w = 10) is finite, the update w -= 1e38 * 10 is not: a divergence on the last step of an epoch that
    # the loss guard cannot see, was saved as the model (1 epoch) or as the checkpoint (2 epochs)
    model = OneWeight()
    saved = []
    task = Task(
        name="train_cls",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e38),
        trainset=Ones(),
        step=lambda net, batch: (net(batch), {}),
        save=saved.append,
    )
    recipe = Recipe(epochs=epochs, batch_size=1, warmup_epochs=0.0, schedule="poly", min_lr_ratio=0.0, amp=False)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingError, match=r"^train_cls: weight 'w' became infinite in epoch 1;"):
        fit(task, recipe, Run(torch.device("cpu"), Dist(), 0), tmp_path / "results", checkpoint, "digest")
    assert saved == [], "no model of non-finite weights is saved"
    assert not checkpoint.exists(), "no checkpoint of non-finite weights is written"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".pt" or p.name.startswith(".")] == []


def test_fit_saves_finite_weights(tmp_path):
    model = OneWeight()
    saved = []
    task = Task(
        "train_cls", model, torch.optim.SGD(model.parameters(), lr=0.1), Ones(), lambda n, b: (n(b), {}), saved.append
    )
    recipe = Recipe(epochs=2, batch_size=1, warmup_epochs=0.0, schedule="poly", min_lr_ratio=0.0, amp=False)
    fit(task, recipe, Run(torch.device("cpu"), Dist(), 0), tmp_path / "results", tmp_path / "ckpt.pt", "digest")
    assert saved == [model] and torch.isfinite(model.w).all() and not (tmp_path / "ckpt.pt").exists()


def test_fit_validates_and_saves_the_moving_average(tmp_path):
    # loss 10 w, SGD lr 0.1 at a constant schedule: w = 1 -> 0 -> -1 -> -2 over three one-step epochs; the average
    # (decay 0.5) starts at the first step's weights: 0, then 0.5 * 0 + 0.5 * -1 = -0.5, then 0.5 * -0.5 + 0.5 * -2
    model, saved, seen = OneWeight(), [], []
    task = Task(
        "train_cls", model, torch.optim.SGD(model.parameters(), lr=0.1), Ones(), lambda n, b: (n(b), {}), saved.append
    )
    task.validate = lambda epoch: seen.append(model.w.item()) or {}
    recipe = Recipe(epochs=3, batch_size=1, warmup_epochs=0.0, schedule="cosine", min_lr_ratio=1.0, amp=False)
    fit(task, replace(recipe, ema_decay=0.5), Run(torch.device("cpu"), Dist(), 0), tmp_path / "r", tmp_path / "c", "d")
    assert seen == pytest.approx([0.0, -0.5, -1.25], abs=1e-6), "training goes on from its weights, not the average"
    assert saved == [model] and model.w.item() == pytest.approx(-1.25, abs=1e-6)


def test_moving_average_off_and_the_swap_restores_the_weights():
    model = OneWeight()
    assert moving_average(model, 0.0) is None
    ema = moving_average(model, 0.9)
    ema.update_parameters(model)  # the first update copies: 1
    with torch.no_grad():
        model.w.fill_(3.0)
    ema.update_parameters(model)  # 0.9 * 1 + 0.1 * 3
    with averaged_weights(model, ema):
        assert model.w.item() == pytest.approx(1.2)
    assert model.w.item() == 3.0
    with averaged_weights(model, None):
        assert model.w.item() == 3.0


def test_the_checkpoint_keeps_the_moving_average(tmp_path):
    def trainables(value: float) -> Trainables:
        model = OneWeight()
        with torch.no_grad():
            model.w.fill_(value)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        ema = moving_average(model, 0.5)
        ema.update_parameters(model)
        return Trainables(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), ema)

    save_progress(tmp_path / "c.pt", "d", trainables(2.0), epoch=1, history=[])
    restored = trainables(5.0)
    assert resume(tmp_path / "c.pt", "d", restored)["epoch"] == 1
    assert (restored.model.w.item(), restored.ema.module.w.item()) == (2.0, 2.0)


def test_a_rehearsal_cuts_the_batch_to_the_subset_and_nothing_else_does(caplog):
    assert rehearsal_batch("train_cls", 16, 100, None) == 16
    assert rehearsal_batch("train_cls", 16, 8, None) == 16, "without data.subset fit() still refuses the batch"
    assert rehearsal_batch("train_cls", 16, 16, 16) == 16
    with caplog.at_level("WARNING"):
        assert rehearsal_batch("train_seg", 16, 8, 8) == 8
    assert "train_seg: data.subset leaves 8 training images: batch_size 16 cut to 8" in caplog.text


def test_recipe_of_a_section_with_overrides():
    class Section:
        epochs, batch_size, warmup_epochs, schedule, min_lr_ratio, amp = 3, 16, 0.5, "poly", 0.0, True

    assert Recipe.of(Section()).batch_size == 16
    recipe = Recipe.of(Section(), batch_size=4)
    assert (recipe.batch_size, recipe.epochs, recipe.grad_clip) == (4, 3, 0.0)
