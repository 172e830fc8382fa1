import math

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from pipeline.config import LossParams, ModelParams, SwinParams
from pipeline.errors import PretrainedError
from pipeline.losses import swtformer_loss
from pipeline.models.backbone import build_backbone
from pipeline.models.swtformer import (
    HierarchicalFeatureFusion,
    argmax_seeds,
    build_model,
    max_norm,
    prototypes,
    refined_cam,
    structure_aware_seeds,
    with_background,
)

TINY_SWIN = SwinParams(patch_size=2, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=(2, 2, 2, 2))
IMG = 32
NUM_CLASSES = 3
CHANNELS = [8, 16, 32, 64]
STRIDES = [4, 8, 16, 32]


def tiny_params(**update) -> ModelParams:
    return ModelParams(**{"version": "v2", "swin": TINY_SWIN, "hff_dims": (4, 4, 8, 8), "pretrained": "none", **update})


def backbone_of(params: ModelParams):
    return build_backbone(
        params.backbone,
        IMG,
        swin=params.swin.model_dump(),
        pretrained=params.pretrained,
        drop_path_rate=params.drop_path_rate,
        final_norm=params.final_norm,
    )


def tiny_model(version: str = "v2", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(NUM_CLASSES, IMG, **tiny_params(version=version).model_dump()).eval()


# --- small functions -------------------------------------------------------------------------------------------


def test_max_norm():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 5) * 7
    x[1, 2] = 0.0
    y = max_norm(x)
    peaks = y.amax(dim=(2, 3))
    assert_close(peaks[0], torch.ones(3), atol=1e-5, rtol=0)
    assert_close(peaks[1, :2], torch.ones(2), atol=1e-5, rtol=0)
    assert torch.all(peaks <= 1.0)
    assert torch.all(y[1, 2] == 0)
    assert_close(y * (x.amax(dim=(2, 3), keepdim=True) + 1e-5), x)


def test_with_background():
    torch.manual_seed(0)
    cam = torch.rand(2, 3, 4, 4)
    out = with_background(cam)
    assert out.shape == (2, 4, 4, 4)
    assert_close(out[:, 0], 1.0 - cam.max(dim=1).values)
    assert_close(out[:, 1:], cam)


def test_with_background_of_an_image_without_classes_is_all_background():
    # an image without image-level labels (a VOC fixture image; cams on train_aug) crashed in amax before
    out = with_background(torch.rand(1, 0, 5, 6))
    assert out.shape == (1, 1, 5, 6) and bool((out == 1).all())


def test_seeds_are_one_hot_or_zero_and_respect_label_mask():
    torch.manual_seed(0)
    cam = torch.rand(2, 4, 3, 3)
    tokens = torch.randn(2, 5, 3, 3)
    label_mask = torch.ones(2, 4, 1, 1)
    label_mask[0, 2] = 0.0
    label_mask[1, 1] = 0.0
    seeds = structure_aware_seeds(cam * label_mask, tokens, label_mask)
    assert seeds.shape == cam.shape
    assert set(seeds.unique().tolist()) <= {0.0, 1.0}
    assert set(seeds.sum(dim=1).unique().tolist()) <= {0.0, 1.0}
    assert torch.all(seeds[0, 2] == 0) and torch.all(seeds[1, 1] == 0)


def test_seeds_on_unmasked_maps_win_argmax_then_get_masked():
    # the argmax is taken before masking: positions won by a masked class end all-zero
    torch.manual_seed(0)
    cam = torch.rand(1, 3, 4, 4)
    tokens = torch.randn(1, 6, 4, 4)
    full = structure_aware_seeds(cam, tokens, torch.ones(1, 3, 1, 1))
    assert torch.all(full.sum(dim=1) == 1)
    mask = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    masked = structure_aware_seeds(cam, tokens, mask)
    assert_close(masked, full * mask)


def two_group_case(strength: float = 1.0):
    # positions (0, 0), (0, 1) have token e1; positions (1, 0), (1, 1) have token e2 (orthogonal groups)
    tokens = torch.zeros(1, 2, 2, 2)
    tokens[0, 0, 0] = 1.0
    tokens[0, 1, 1] = 3.0
    fg = torch.zeros(1, 2, 2, 2)  # two classes
    fg[0, 0, 0, 0] = strength  # class 1 fires on one token of group A only
    return with_background(fg), tokens


def test_seeds_assign_whole_structure_group():
    cam, tokens = two_group_case()
    seeds = structure_aware_seeds(cam, tokens, torch.ones(1, 3, 1, 1))
    # group A: IoU_1 = 1 / (2 + 1 - 1) = 1/2 beats 0.5 * IoU_bg = 0.5 * 1 / (2 + 3 - 1)
    # group B: 0.5 * IoU_bg = 0.5 * 2 / (2 + 3 - 2) beats IoU_1 = IoU_2 = 0
    expected = torch.zeros(1, 3, 2, 2)
    expected[0, 1, 0] = 1.0
    expected[0, 0, 1] = 1.0
    assert_close(seeds, expected)


def test_seeds_bg_iou_scale_matters():
    # weak class-1 activation: group A has IoU_1 = 0.2 / 2 = 0.1 and IoU_bg = 1.8 / (2 + 3.8 - 1.8) = 0.45
    cam, tokens = two_group_case(strength=0.2)
    seeds = structure_aware_seeds(cam, tokens, torch.ones(1, 3, 1, 1), bg_iou_scale=0.5)
    assert torch.all(seeds[0, 0] == 1)  # 0.225 > 0.1: background everywhere
    seeds = structure_aware_seeds(cam, tokens, torch.ones(1, 3, 1, 1), bg_iou_scale=0.2)
    assert torch.all(seeds[0, 1, 0] == 1) and torch.all(seeds[0, 0, 1] == 1)  # 0.09 < 0.1


def test_seeds_label_mask_removes_class():
    cam, tokens = two_group_case()
    mask = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    seeds = structure_aware_seeds(cam * mask, tokens, mask)
    assert torch.all(seeds[0, 1] == 0)
    assert torch.all(seeds[0, :, 1].sum(dim=0) == 1)


def test_argmax_seeds_hand_case():
    # two positions, K = 3 (bg, a, b); class b is absent from the label, so it never wins
    cam = torch.tensor([[0.2, 0.7], [0.5, 0.1], [0.9, 0.9]]).reshape(1, 3, 1, 2)
    mask = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 3, 1, 1)
    seeds = argmax_seeds(cam, mask)
    assert seeds[0, :, 0].tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


def test_argmax_seeds_spatial_mask_zeroes_padding():
    cam = torch.rand(1, 3, 2, 2)
    mask = torch.ones(1, 3, 2, 2)
    mask[..., 1] = 0.0  # the right column is padding
    seeds = argmax_seeds(cam, mask)
    assert torch.all(seeds[..., 1] == 0)
    assert torch.all(seeds[..., 0].sum(dim=1) == 1)


def test_prototypes_mean_times_seed_fraction():
    torch.manual_seed(0)
    features = torch.randn(1, 5, 4, 4)
    seeds = torch.zeros(1, 3, 4, 4)
    seeds[0, 0, :2] = 1.0  # 8 positions
    seeds[0, 1, 2:, :1] = 1.0  # 2 positions
    protos = prototypes(seeds, features)
    assert protos.shape == (1, 3, 5)
    for k, count in ((0, 8), (1, 2)):
        where = seeds[0, k].bool()
        mean = features[0][:, where].mean(dim=1)
        assert_close(protos[0, k], mean * count / 16)
    assert torch.all(protos[0, 2] == 0)


def test_prototypes_resize_seeds_nearest():
    torch.manual_seed(0)
    features = torch.randn(1, 3, 4, 4)
    seeds = torch.zeros(1, 2, 2, 2)
    seeds[0, 1, 0, 1] = 1.0  # top-right cell -> top-right 2x2 block of the feature grid
    protos = prototypes(seeds, features)
    assert_close(protos[0, 1], features[0, :, :2, 2:].sum(dim=(1, 2)) / 16)
    assert torch.all(protos[0, 0] == 0)


def test_refined_cam_range_and_peak():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 3, 3)
    protos = torch.randn(2, 4, 6)
    protos[:, 3] = 0.0
    features[0, :, 1, 2] = 2.5 * protos[0, 1]
    rcam = refined_cam(features, protos)
    assert rcam.shape == (2, 4, 3, 3)
    assert rcam.min() >= 0 and rcam.max() <= 1 + 1e-6
    assert_close(rcam[0, 1, 1, 2], torch.tensor(1.0))
    assert torch.all(rcam[:, 3] == 0)
    features[1, :, 0, 0] = -protos[1, 2]
    assert refined_cam(features, protos)[1, 2, 0, 0] == 0


def test_hff_shape_normalisation_and_detach():
    hff = HierarchicalFeatureFusion(CHANNELS, STRIDES, (4, 4, 8, 8), detach_inputs=True)
    stages = [torch.randn(2, c, 64 // s, 48 // s, requires_grad=True) for c, s in zip(CHANNELS, STRIDES, strict=True)]
    out = hff(stages)
    assert out.shape == (2, 24, 4, 3)
    assert hff.out_channels == 24
    assert_close(out[:, 4:8].norm(dim=1), torch.ones(2, 4, 3))  # stage 2 block, no resampling
    out.sum().backward()
    assert all(s.grad is None for s in stages)
    assert hff.projections[0].weight.grad is not None


def test_hff_without_detach_reaches_inputs():
    hff = HierarchicalFeatureFusion(CHANNELS, STRIDES, (4, 4, 8, 8), detach_inputs=False)
    stages = [torch.randn(1, c, 32 // s, 32 // s, requires_grad=True) for c, s in zip(CHANNELS, STRIDES, strict=True)]
    hff(stages).square().sum().backward()
    assert all(s.grad is not None for s in stages)


# --- backbone and model ----------------------------------------------------------------------------------------


def test_backbone_odd_input_sizes_nchw():
    backbone = backbone_of(tiny_params()).eval()
    assert backbone.strides == [2, 4, 8, 16]
    assert backbone.channels == [8, 16, 32, 64]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 37, 29))
    assert len(maps) == 4
    for m, c, s in zip(maps, backbone.channels, backbone.strides, strict=True):
        assert m.shape == (1, c, math.ceil(37 / s), math.ceil(29 / s))


def test_backbone_eval_uses_fused_attention_with_the_same_result():
    backbone = backbone_of(tiny_params(swin=TINY_SWIN.model_copy(update={"depths": (2, 2, 2, 2)})))
    x = torch.randn(2, 3, 40, 36)  # the second block of each stage attends in shifted windows, under a mask
    assert backbone.attentions and not any(a.fused_attn for a in backbone.attentions)
    with torch.no_grad():
        explicit = backbone.eval().train()(x)  # training mode, no dropout: the explicit path
        fused = backbone.eval()(x)
    assert all(a.fused_attn for a in backbone.attentions)
    for a, b in zip(explicit, fused, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    backbone.train()
    assert not any(a.fused_attn for a in backbone.attentions)


def test_v2_forward_shapes():
    model = tiny_model("v2")
    x = torch.randn(2, 3, IMG, IMG)
    mask = torch.ones(2, NUM_CLASSES + 1, 1, 1)
    with torch.no_grad():
        out = model(x, mask)
    k = NUM_CLASSES + 1
    assert out["logits"].shape == (2, NUM_CLASSES)
    assert out["cam"].shape == (2, NUM_CLASSES, 2, 2)
    assert out["cam_bg"].shape == (2, k, 2, 2)
    assert out["seeds"].shape == (2, k, 2, 2)
    assert out["rcam"].shape == (2, k, 4, 4)
    assert out["cam"].min() >= 0 and out["cam"].max() <= 1
    assert out["rcam"].min() >= 0 and out["rcam"].max() <= 1 + 1e-6
    assert set(out["seeds"].sum(dim=1).unique().tolist()) <= {0.0, 1.0}


def test_v2_forward_with_spatial_label_mask():
    model = tiny_model("v2")
    mask = torch.ones(1, NUM_CLASSES + 1, IMG, IMG)
    mask[:, 2] = 0.0
    with torch.no_grad():
        out = model(torch.randn(1, 3, IMG, IMG), mask)
    assert torch.all(out["seeds"][:, 2] == 0)
    assert torch.all(out["rcam"][:, 2] == 0)


def test_v2_cam_seed_locating_is_the_argmax_of_cam_with_background():
    model = tiny_model("v2")
    mask = torch.ones(2, NUM_CLASSES + 1, 1, 1)
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, IMG, IMG))
        out = model.maps(feats, mask, seed_locating="cam")
        structure = model.maps(feats, mask)
    assert_close(out["seeds"], argmax_seeds(out["cam_bg"], mask))
    assert_close(out["cam"], structure["cam"])  # only the seeds (and so R-CAM) depend on the choice
    with pytest.raises(ValueError, match="seed_locating"), torch.no_grad():
        model.maps(feats, mask, seed_locating="other")


def test_v1_forward_shapes_and_values():
    model = tiny_model("v1")
    assert model.hff is None
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        out = model(x)
        logit_map = model.cam_head(model.backbone(x)[-1])  # (B, C, h, w): the CAM head on the last stage
    assert set(out) == {"logits", "cam"}
    assert out["logits"].shape == (2, NUM_CLASSES)
    assert out["cam"].shape == (2, NUM_CLASSES, 2, 2)
    # logits = global average of the logit map; cam = ReLU(logit map) / (its spatial max + 1e-5)
    assert_close(out["logits"], logit_map.mean(dim=(2, 3)))
    positive = logit_map.clamp_min(0)
    assert_close(out["cam"], positive / (positive.amax(dim=(2, 3), keepdim=True) + 1e-5))
    assert (out["cam"] == 0).any() and (logit_map < 0).any(), "the ReLU is exercised"


def test_classify_equals_logits():
    model = tiny_model("v2")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert_close(model.classify(x), model(x, torch.ones(2, NUM_CLASSES + 1, 1, 1))["logits"])


def test_v2_without_label_mask_raises():
    model = tiny_model("v2")
    with pytest.raises(ValueError, match="label mask"), torch.no_grad():
        model(torch.randn(1, 3, IMG, IMG))


def test_new_modules():
    v2, v1 = tiny_model("v2"), tiny_model("v1")
    assert [id(m) for m in v2.new_modules()] == [id(v2.cam_head), id(v2.hff)]
    assert [id(m) for m in v1.new_modules()] == [id(v1.cam_head)]
    assert not any(m is v2.backbone for m in v2.new_modules())


# --- gradients: every parameter trains (DDP's find_unused_parameters in train_cls relies on it) ----------------


def training_step_model(version: str = "v2", **loss: bool) -> torch.nn.Module:
    """A tiny SWTformer after one backward of the training loss (``swtformer_loss``) on a random batch.

    ``loss`` switches terms of the ``loss`` section (default: GSC and CCL on). The model and the loss are built
    here only, so that a change of their signatures touches this helper alone.
    """
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, IMG, **tiny_params(version=version).model_dump()).train()
    images = torch.randn(2, 3, IMG, IMG)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    valid = torch.ones(2, 1, IMG, IMG)
    mask = torch.cat([valid, valid * labels[:, :, None, None]], dim=1)  # (B, K, H, W): background + classes
    out = model(images, mask)
    swtformer_loss(out, labels, mask, **LossParams(**loss).model_dump())["total"].backward()
    return model


def test_every_v2_parameter_gets_a_finite_gradient_from_the_training_loss():
    assert LossParams().gsc and LossParams().ccl, "the default losses"
    model = training_step_model("v2")
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: an all-zero gradient"
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"backbone", "cam_head", "hff"}


@pytest.mark.parametrize(
    ("version", "gsc", "ccl"),
    [("v1", True, True), ("v2", True, False), ("v2", False, True), ("v2", False, False)],
)
def test_only_hff_is_unused_and_only_without_gsc_and_ccl(version, gsc, ccl):
    # train_cls: find_unused_parameters = (version == "v2" and not (gsc or ccl)); this is that rule
    model = training_step_model(version, gsc=gsc, ccl=ccl)
    unused = {name for name, p in model.named_parameters() if p.grad is None}
    expected = {name for name, _ in model.named_parameters() if name.startswith("hff.")}
    assert unused == (expected if version == "v2" and not (gsc or ccl) else set())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(PretrainedError, match="not found"):
        backbone_of(tiny_params(pretrained=str(tmp_path / "nope.safetensors")))


def test_pretrained_without_matching_weights(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(path))
    with pytest.raises(PretrainedError, match="no weights"):
        backbone_of(tiny_params(pretrained=str(path)))


def test_pretrained_safetensors_really_load(tmp_path):
    torch.manual_seed(1)
    source = backbone_of(tiny_params()).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(2)
    fresh = backbone_of(tiny_params()).eval()
    torch.manual_seed(2)
    loaded = backbone_of(tiny_params(pretrained=str(path))).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        want, got, before = source(x)[-1], loaded(x)[-1], fresh(x)[-1]
    assert not torch.allclose(before, want)
    assert_close(got, want)


def test_pretrained_pth_checkpoint_with_model_key(tmp_path):
    torch.manual_seed(1)
    source = backbone_of(tiny_params()).eval()
    path = tmp_path / "weights.pth"
    torch.save({"model": source.model.state_dict()}, path)
    torch.manual_seed(2)
    loaded = backbone_of(tiny_params(pretrained=str(path))).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert_close(loaded(x)[0], source(x)[0])


def test_pretrained_shape_mismatch_is_pretrained_error(tmp_path):
    other = backbone_of(tiny_params(swin=TINY_SWIN.model_copy(update={"embed_dim": 16})))
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(PretrainedError) as info:
        backbone_of(tiny_params(pretrained=str(path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_corrupt_file_is_pretrained_error(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"garbage")
    with pytest.raises(PretrainedError, match="broken"):
        backbone_of(tiny_params(pretrained=str(path)))
