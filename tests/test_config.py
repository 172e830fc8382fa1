from pathlib import Path

import pytest
import yaml
from conftest import default_params, default_params_dict
from pydantic import ValidationError

from pipeline.config import (
    REQUIRED_SECTIONS,
    SECTIONS,
    LossParams,
    Params,
    StageParams,
    load_params,
    load_sections,
    parse_params,
)
from pipeline.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def write_params(tmp_path: Path, raw: object, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def write_full(tmp_path: Path, name: str = "params.yaml", **overrides: object) -> Path:
    """A complete params file: every section at its defaults, with per-section overrides merged in."""
    return write_params(tmp_path, default_params_dict(**overrides), name)


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    return message


def test_defaults_validate():
    params = parse_params({name: {} for name in SECTIONS} | {"seed": 0})
    assert params == default_params()
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
        "pretrain",
    )


def test_repo_params_file_is_the_typed_defaults():
    # one source of truth: a value edited in one place only (or in the wrong section) fails here
    assert load_params(REPO_PARAMS) == default_params()


def test_top_level_sections_have_no_defaults():
    assert [name for name, field in Params.model_fields.items() if not field.is_required()] == ["pretrain"]
    with pytest.raises(ValidationError):
        Params()


@pytest.mark.parametrize("section", REQUIRED_SECTIONS)
def test_params_file_without_a_section_is_refused(tmp_path, section):
    raw = default_params_dict()
    del raw[section]
    path = write_params(tmp_path, raw, "partial.yaml")
    message = config_error(path)
    assert message == (
        f"{path}: section '{section}' is missing (every params file needs: "
        "seed, data, model, train_cls, loss, cams, train_aff, refine, train_seg, evaluate)"
    )


def test_every_missing_section_is_named_in_one_line(tmp_path):
    path = write_params(tmp_path, {"seed": 0, "data": {}, "loss": {"cclx": True}}, "partial.yaml")
    message = config_error(path)  # the missing sections come before other errors
    assert message.startswith(
        f"{path}: sections 'model', 'train_cls', 'cams', 'train_aff', 'refine', 'train_seg', 'evaluate' are missing"
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_params_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    message = config_error(path)
    assert "sections 'seed', 'data', 'model'" in message and "are missing" in message


def test_an_empty_section_takes_the_section_defaults(tmp_path):
    path = write_params(tmp_path, {name: {} for name in SECTIONS} | {"seed": 0, "cams": None})
    assert "cams" in config_error(path), "a null section is not an empty one"
    path = write_params(tmp_path, {name: {} for name in SECTIONS} | {"seed": 0})
    assert load_params(path) == default_params()


def test_pretrain_section_may_be_left_out(tmp_path):
    raw = default_params_dict()
    del raw["pretrain"]
    assert load_params(write_params(tmp_path, raw, "no_pretrain.yaml")) == default_params()


def test_values_are_read(tmp_path):
    path = write_full(tmp_path, seed=3, loss={"ccl": False}, model={"hff_dims": [1, 2, 3, 4]})
    params = load_params(path)
    assert params.seed == 3
    assert params.loss.ccl is False
    assert params.loss.gsc is True
    assert params.model.hff_dims == (1, 2, 3, 4)


def test_unknown_top_level_key(tmp_path):
    path = write_params(tmp_path, default_params_dict(bogus=1))
    message = config_error(path)
    assert "'bogus'" in message
    assert "cams, data, evaluate, loss, model, pretrain, refine, seed, train_aff, train_cls, train_seg" in message


def test_unknown_nested_key(tmp_path):
    path = write_full(tmp_path, loss={"cclx": True})
    message = config_error(path)
    assert "'loss.cclx'" in message
    assert ", ".join(sorted(LossParams.model_fields)) in message
    assert "ccl_mode" in message


def test_unknown_deeply_nested_key(tmp_path):
    path = write_full(tmp_path, data={"synthetic": {"image_sise": 64}})
    message = config_error(path)
    assert "'data.synthetic.image_sise'" in message
    assert "image_size" in message
    assert "min_visible_pixels" in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = write_full(tmp_path, train_cls={"epochs": "abc"})
    message = config_error(path)
    assert "train_cls.epochs" in message
    assert '"abc"' in message


def test_out_of_range_names_key_and_value(tmp_path):
    path = write_full(tmp_path, train_cls={"lr": -1})
    message = config_error(path)
    assert "train_cls.lr = -1" in message
    assert "greater than 0" in message


def test_bad_literal_names_allowed_values(tmp_path):
    path = write_full(tmp_path, loss={"ccl_mode": "fancy"})
    message = config_error(path)
    assert "loss.ccl_mode" in message
    assert "fancy" in message
    assert "literal" in message and "contrastive" in message


def test_cross_field_check(tmp_path):
    path = write_full(tmp_path, train_cls={"epochs": 2, "warmup_epochs": 5})
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
    params = default_params()
    with pytest.raises(ValidationError):
        params.seed = 5


def test_stage_params_exposes_only_declared_sections(tmp_path):
    path = write_full(tmp_path, seed=7)
    stage = load_sections(path, ("seed", "loss"))
    assert stage.seed == 7
    assert stage.loss == LossParams()
    with pytest.raises(AttributeError, match="model"):
        _ = stage.model


def test_stage_params_rejects_unknown_section():
    with pytest.raises(KeyError):
        StageParams(default_params(), ("seed", "refinement"))


def test_load_sections_validates_whole_file(tmp_path):
    path = write_full(tmp_path, model={"bad": 1})
    with pytest.raises(ConfigError, match="model.bad"):
        load_sections(path, ("seed",))


def test_digest_is_stable_and_tracks_declared_sections(tmp_path):
    sections = ("model", "loss")
    base = load_sections(write_full(tmp_path, "a.yaml"), sections).digest()
    again = load_sections(write_full(tmp_path, "b.yaml"), sections).digest()
    assert base == again
    assert StageParams(default_params(), sections).digest() == base
    undeclared = load_sections(write_full(tmp_path, "c.yaml", seed=9, cams={"flip": False}), sections)
    assert undeclared.digest() == base
    declared = load_sections(write_full(tmp_path, "d.yaml", loss={"ccl": False}), sections)
    assert declared.digest() != base
    nested = load_sections(write_full(tmp_path, "e.yaml", model={"swin": {"embed_dim": 32}}), sections)
    assert nested.digest() != base


def test_shared_keys_sit_flat_in_each_section():
    # Runtime / AmpRuntime / Schedule are mixins: their keys are the section's own, as in params.yaml
    fields = {name: set(Params.model_fields[name].annotation.model_fields) for name in SECTIONS if name != "seed"}
    schedule = {"epochs", "lr", "head_lr_mult", "weight_decay", "warmup_epochs", "schedule", "min_lr_ratio"}
    for name in ("train_cls", "cams", "train_aff", "train_seg", "evaluate"):
        assert {"device", "threads", "amp"} <= fields[name], name
    for name in ("train_cls", "train_aff", "train_seg"):
        assert schedule <= fields[name], name
    for name in ("data", "model", "loss", "refine"):
        assert not fields[name] & ({"device", "threads", "amp"} | schedule), name


def test_schedule_defaults_differ_per_section():
    params = default_params()
    schedules = {
        name: {key: getattr(getattr(params, name), key) for key in ("lr", "head_lr_mult", "weight_decay", "schedule")}
        for name in ("train_cls", "train_aff", "train_seg")
    }
    assert schedules["train_cls"] == {"lr": 5e-4, "head_lr_mult": 10.0, "weight_decay": 0.05, "schedule": "cosine"}
    assert schedules["train_aff"] == {"lr": 1e-3, "head_lr_mult": 10.0, "weight_decay": 1e-4, "schedule": "poly"}
    assert schedules["train_seg"] == {"lr": 2e-3, "head_lr_mult": 1.0, "weight_decay": 1e-4, "schedule": "poly"}
    warmups = [getattr(params, name).warmup_epochs for name in ("train_cls", "train_aff", "train_seg")]
    assert warmups == [1.0, 0.5, 1.0]
    assert [getattr(params, name).epochs for name in ("train_cls", "train_aff", "train_seg")] == [48, 3, 24]


@pytest.mark.parametrize("section", ["train_cls", "train_aff", "train_seg"])
def test_warmup_shorter_than_training_in_every_training_section(tmp_path, section):
    path = write_full(tmp_path, **{section: {"epochs": 2, "warmup_epochs": 2}})
    message = config_error(path)
    assert message.startswith(f"{path}: {section} = ") and message.endswith(
        "is invalid: warmup_epochs must be smaller than epochs"
    )
    assert load_params(write_full(tmp_path, "ok.yaml", **{section: {"epochs": 2, "warmup_epochs": 1.5}}))


@pytest.mark.parametrize(("section", "key", "value"), [("cams", "device", "tpu"), ("evaluate", "threads", -1)])
def test_shared_keys_are_validated_in_place(tmp_path, section, key, value):
    message = config_error(write_full(tmp_path, **{section: {key: value}}))
    assert f"{section}.{key} = " in message


# --- strict types, finite numbers, non-empty lists, bounds, duplicate keys ------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train_cls": {"epochs": "2"}}, "train_cls.epochs"),
        ({"train_cls": {"epochs": True}}, "train_cls.epochs"),
        ({"train_cls": {"lr": "0.1"}}, "train_cls.lr"),
        ({"train_cls": {"lr": True}}, "train_cls.lr"),
        ({"seed": "3"}, "seed"),
        ({"model": {"hff_dims": ["4", 4, 8, 8]}}, "model.hff_dims.0"),
        ({"data": {"mean": [0.5, False, 0.5]}}, "data.mean.1"),
        ({"train_cls": {"resize_long": [80.0, 112]}}, "train_cls.resize_long.0"),
        ({"model": {"head_kernel": True}}, "model.head_kernel"),
        ({"train_seg": {"output_stride": 8.0}}, "train_seg.output_stride"),
        ({"train_cls": {"amp": 1}}, "train_cls.amp"),
    ],
)
def test_no_string_or_bool_where_a_number_is_expected(tmp_path, overrides, key):
    path = write_full(tmp_path, **overrides)
    message = config_error(path)
    assert message.startswith(f"{path}: {key} = "), message
    assert "is invalid: Input should be a valid" in message or "is invalid: Input should be an integer" in message


def test_an_integer_is_a_float_and_5e_4_is_a_number(tmp_path):
    params = load_params(write_full(tmp_path, train_cls={"lr": 1}, data={"mean": [0, 0, 1]}))
    assert params.train_cls.lr == 1.0 and isinstance(params.train_cls.lr, float)
    assert params.data.mean == (0.0, 0.0, 1.0)
    path = tmp_path / "exp.yaml"  # PyYAML (YAML 1.1) reads 5e-4 as a string; DVC (YAML 1.2) as a float
    path.write_text(yaml.safe_dump(default_params_dict()).replace("lr: 0.0005\n", "lr: 5e-4\n", 1))
    assert "lr: 5e-4" in path.read_text()
    assert load_params(path).train_cls.lr == 5e-4


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train_cls": {"lr": float("inf")}}, "train_cls.lr"),
        ({"train_seg": {"head_lr_mult": float("inf")}}, "train_seg.head_lr_mult"),
        ({"train_aff": {"weight_decay": float("inf")}}, "train_aff.weight_decay"),
        ({"data": {"mean": [0.5, float("nan"), 0.5]}}, "data.mean.1"),
        ({"data": {"mean": [float("-inf"), 0.5, 0.5]}}, "data.mean.0"),
        ({"data": {"std": [0.2, 0.2, float("inf")]}}, "data.std.2"),
        ({"data": {"synthetic": {"noise_std": float("inf")}}}, "data.synthetic.noise_std"),
        ({"loss": {"ccl_weight": float("inf")}}, "loss.ccl_weight"),
        ({"cams": {"scales": [1.0, float("inf")]}}, "cams.scales.1"),
        ({"train_cls": {"grad_clip": float("inf")}}, "train_cls.grad_clip"),
        ({"refine": {"crf": {"bilateral_sxy": float("inf")}}}, "refine.crf.bilateral_sxy"),
        ({"train_aff": {"labels": {"bg_alpha": float("inf")}}}, "train_aff.labels.bg_alpha"),
    ],
)
def test_every_float_is_finite(tmp_path, overrides, key):
    path = write_full(tmp_path, **overrides)
    message = config_error(path)
    assert message.startswith(f"{path}: {key} = ") and message.endswith("is invalid: Input should be a finite number")


@pytest.mark.parametrize("section", ["cams", "evaluate"])
def test_scales_must_not_be_empty(tmp_path, section):
    path = write_full(tmp_path, **{section: {"scales": []}})
    message = config_error(path)
    assert message.startswith(f"{path}: {section}.scales = [] is invalid: ") and "at least 1 item" in message


def test_sweep_step_has_a_floor(tmp_path):
    message = config_error(write_full(tmp_path, cams={"sweep": {"step": 1e-9}}))  # was a 4.5 GiB allocation
    assert "cams.sweep.step = 1e-09 is invalid: Input should be greater than or equal to 0.001" in message
    assert load_params(write_full(tmp_path, "ok.yaml", cams={"sweep": {"step": 0.001}})).cams.sweep.step == 0.001


@pytest.mark.parametrize("seed", [2**32, 2**64, -1])
def test_seed_fits_numpy_and_torch_seeding(tmp_path, seed):
    message = config_error(write_full(tmp_path, seed=seed))
    assert f"seed = {seed} is invalid: " in message
    assert load_params(write_full(tmp_path, "ok.yaml", seed=2**32 - 1)).seed == 2**32 - 1


@pytest.mark.parametrize(("where", "key"), [("", "seed"), ("  ", "epochs")])
def test_duplicate_keys_are_refused(tmp_path, where, key):
    text = yaml.safe_dump(default_params_dict(), sort_keys=False)
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"{where}{key}:"))
    lines.insert(first + 1, f"{where}{key}: 5")  # yaml.safe_load would silently keep this one
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    message = config_error(path)
    assert message == f"{path}: key '{key}' appears twice in one mapping (lines {first + 1} and {first + 2}); keep one"


def test_a_params_file_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 0\n# caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=r"params.yaml: not UTF-8 text \(byte 13\)") as info:
        load_params(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -3, True, 1.5, "8", [8]])
def test_data_subset_is_a_positive_integer_or_null(tmp_path, value):
    message = config_error(write_full(tmp_path, data={"subset": value}))
    assert "data.subset" in message
    assert load_params(write_full(tmp_path, "ok.yaml", data={"subset": 8})).data.subset == 8
    assert load_params(write_full(tmp_path, "all.yaml", data={"subset": None})).data.subset is None
