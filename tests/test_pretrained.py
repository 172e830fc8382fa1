"""``model.pretrained``: local files, timm tags from the cache, and fast one-line errors without network."""

from __future__ import annotations

import socket
import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.testing import assert_close
from typer.testing import CliRunner

from pipeline.errors import PretrainedError
from pipeline.models import pretrained
from pipeline.models.pretrained import is_weights_file, load_pretrained, read_state_dict, save_state_dict
from stages.cli import app

TAG = "test_vit.r160_in1k"  # a tiny timm model that has a pretrained tag


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=0).eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 3, 32, 32))


@pytest.fixture
def not_cached(monkeypatch):
    """Pretend nothing is in the local hub caches."""
    monkeypatch.setattr(pretrained, "_cached_weights", lambda cfg: None)


def test_spec_kinds():
    assert is_weights_file("w.safetensors") and is_weights_file("models/w") and is_weights_file("x.pth")
    assert not is_weights_file("swin_tiny_patch4_window7_224.ms_in1k")


def test_local_file_changes_the_outputs(tmp_path):
    source, target = tiny(1), tiny(2)
    path = save_state_dict(source.state_dict(), tmp_path / "w.safetensors")
    before = outputs(target)
    load_pretrained(target, str(path))
    assert not torch.allclose(before, outputs(source))
    assert_close(outputs(target), outputs(source))


def test_pth_checkpoint_nested_under_state_dict(tmp_path):
    source, target = tiny(1), tiny(2)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    load_pretrained(target, tmp_path / "ckpt.pth")
    assert_close(outputs(target), outputs(source))


def test_file_holding_no_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(PretrainedError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"weight": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(PretrainedError, match="holds a dict of non-tensors, not a state dict of tensors"):
        read_state_dict(tmp_path / "mixed.pth")


def test_none_keeps_the_initialisation():
    model = tiny(1)
    before = outputs(model)
    load_pretrained(model, "none")
    assert_close(outputs(model), before)


def test_tag_from_the_local_cache(tmp_path, monkeypatch):
    source, target = tiny(1), tiny(2)
    cached = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(cached))
    monkeypatch.setattr(pretrained, "_cached_weights", lambda cfg: str(cached))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache works offline
    load_pretrained(target, TAG)
    assert_close(outputs(target), outputs(source))


def test_tag_offline_fails_at_once_saying_how_to_pass_a_file(not_cached, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", pytest.fail)  # no network access is even attempted
    start = time.perf_counter()
    with pytest.raises(PretrainedError) as info:
        load_pretrained(tiny(1), TAG)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot get timm weights '{TAG}' (not cached and HF_HUB_OFFLINE is set)" in message
    assert "set model.pretrained to a local .safetensors/.pth file" in message
    assert f"wsss download-weights {TAG}" in message


def test_tag_without_network_fails_after_the_short_probe(not_cached, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probed = []

    def unreachable(address, timeout):
        probed.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(PretrainedError, match=r"not cached and huggingface\.co is unreachable"):
        load_pretrained(tiny(1), TAG)
    assert probed == [(("huggingface.co", 443), pretrained.PROBE_TIMEOUT)] and pretrained.PROBE_TIMEOUT <= 5


def test_unknown_tag():
    with pytest.raises(PretrainedError, match="neither 'none', a weights file, nor a timm pretrained tag"):
        load_pretrained(tiny(1), "no_such_model.in1k")


def test_cli_download_weights_offline_exits_2(not_cached, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["download-weights", TAG, "--out", str(tmp_path / "w.safetensors")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.pretrained: cannot get timm weights")
    assert not (tmp_path / "w.safetensors").exists()


def test_cli_download_weights_saves_a_loadable_file(monkeypatch, tmp_path):
    source = tiny(1)
    monkeypatch.setattr(pretrained, "timm_state_dict", lambda tag: source.state_dict())
    out = tmp_path / "w.safetensors"
    result = CliRunner().invoke(app, ["download-weights", TAG, "--out", str(out)])
    assert result.exit_code == 0, result.output
    target = tiny(2)
    load_pretrained(target, str(out))
    assert_close(outputs(target), outputs(source))
