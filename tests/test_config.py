from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.config import SECTIONS, LossParams, Params, StageParams, load_params, load_sections, parse_params
from pipeline.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def write_params(tmp_path: Path, raw: object, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    return message


def test_defaults_validate():
    params = parse_params({})
    assert params == Params()
    assert parse_params(None) == Params()
    assert SECTIONS == (
        "seed",
        "data",
        "model",
        "train_cls",
        "loss",
        "cams",
        "train_aff",
        "refine",
        "train_seg",
        "evaluate",
    )


def test_repo_params_file_is_the_typed_defaults():
    # one source of truth: a value edited in one place only (or in the wrong section) fails here
    assert load_params(REPO_PARAMS) == Params()


def test_values_are_read(tmp_path):
    path = write_params(tmp_path, {"seed": 3, "loss": {"ccl": False}, "model": {"hff_dims": [1, 2, 3, 4]}})
    params = load_params(path)
    assert params.seed == 3
    assert params.loss.ccl is False
    assert params.loss.gsc is True
    assert params.model.hff_dims == (1, 2, 3, 4)


def test_unknown_top_level_key(tmp_path):
    path = write_params(tmp_path, {"bogus": 1})
    message = config_error(path)
    assert "'bogus'" in message
    assert "cams, data, evaluate, loss, model, refine, seed, train_aff, train_cls, train_seg" in message


def test_unknown_nested_key(tmp_path):
    path = write_params(tmp_path, {"loss": {"cclx": True}})
    message = config_error(path)
    assert "'loss.cclx'" in message
    assert ", ".join(sorted(LossParams.model_fields)) in message
    assert "ccl_mode" in message


def test_unknown_deeply_nested_key(tmp_path):
    path = write_params(tmp_path, {"data": {"synthetic": {"image_sise": 64}}})
    message = config_error(path)
    assert "'data.synthetic.image_sise'" in message
    assert "image_size" in message
    assert "min_visible_pixels" in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = write_params(tmp_path, {"train_cls": {"epochs": "abc"}})
    message = config_error(path)
    assert "train_cls.epochs" in message
    assert '"abc"' in message


def test_out_of_range_names_key_and_value(tmp_path):
    path = write_params(tmp_path, {"train_cls": {"lr": -1}})
    message = config_error(path)
    assert "train_cls.lr = -1" in message
    assert "greater than 0" in message


def test_bad_literal_names_allowed_values(tmp_path):
    path = write_params(tmp_path, {"loss": {"ccl_mode": "fancy"}})
    message = config_error(path)
    assert "loss.ccl_mode" in message
    assert "fancy" in message
    assert "literal" in message and "contrastive" in message


def test_cross_field_check(tmp_path):
    path = write_params(tmp_path, {"train_cls": {"epochs": 2, "warmup_epochs": 5}})
    message = config_error(path)
    assert "train_cls" in message
    assert "warmup_epochs must be smaller than epochs" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert "not found" in message


def test_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\nloss: {")
    message = config_error(path)
    assert "not valid YAML" in message


def test_not_a_mapping(tmp_path):
    path = write_params(tmp_path, [1, 2, 3])
    message = config_error(path)
    assert "mapping" in message


def test_params_are_frozen():
    params = Params()
    with pytest.raises(ValidationError):
        params.seed = 5


def test_stage_params_exposes_only_declared_sections(tmp_path):
    path = write_params(tmp_path, {"seed": 7})
    stage = load_sections(path, ("seed", "loss"))
    assert stage.seed == 7
    assert stage.loss == LossParams()
    with pytest.raises(AttributeError, match="model"):
        _ = stage.model
    assert set(stage.as_dict()) == {"seed", "loss"}
    assert stage.as_dict()["loss"]["ccl_mode"] == "literal"


def test_stage_params_rejects_unknown_section():
    with pytest.raises(KeyError):
        StageParams(Params(), ("seed", "refinement"))


def test_load_sections_validates_whole_file(tmp_path):
    path = write_params(tmp_path, {"model": {"bad": 1}})
    with pytest.raises(ConfigError, match="model.bad"):
        load_sections(path, ("seed",))


def test_digest_is_stable_and_tracks_declared_sections(tmp_path):
    sections = ("model", "loss")
    base = load_sections(write_params(tmp_path, {"seed": 0}, "a.yaml"), sections).digest()
    again = load_sections(write_params(tmp_path, {"seed": 0}, "b.yaml"), sections).digest()
    assert base == again
    assert StageParams(Params(), sections).digest() == base
    undeclared = load_sections(write_params(tmp_path, {"seed": 9, "cams": {"flip": False}}, "c.yaml"), sections)
    assert undeclared.digest() == base
    declared = load_sections(write_params(tmp_path, {"loss": {"ccl": False}}, "d.yaml"), sections)
    assert declared.digest() != base
    nested = load_sections(write_params(tmp_path, {"model": {"swin": {"embed_dim": 32}}}, "e.yaml"), sections)
    assert nested.digest() != base
