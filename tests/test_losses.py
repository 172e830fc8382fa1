import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.config import LossParams
from pipeline.losses import (
    ccl_literal,
    ccl_loss,
    classification_loss,
    gsc_loss,
    spatial_cosine,
    swtformer_loss,
)
from pipeline.models.swtformer import max_norm


def test_ccl_literal_known_values():
    cos = torch.tensor([0.0, 9 / 13, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.5, 26 / 169, 2 / 9], dtype=torch.float64)
    assert_close(ccl_literal(cos), expected)


def test_ccl_literal_minimum_at_nine_thirteenths():
    cos = torch.linspace(0, 1, 131, dtype=torch.float64)
    assert cos[ccl_literal(cos).argmin()].item() == pytest.approx(9 / 13, abs=0.01)


def test_classification_loss_of_zero_logits_is_ln2():
    # sigmoid(0) = 1/2 whatever the label: -log(1/2) for every class and image
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert_close(classification_loss(torch.zeros(2, 3), labels), torch.tensor(math.log(2)))


def test_classification_loss_hand_values():
    # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4; per class -[y log p + (1 - y) log(1 - p)]
    # image 1: labels (1, 1) at logits (ln 3, -ln 3) -> (ln 4/3 + ln 4) / 2 = ln(16/3) / 2
    # image 2: labels (0, 1) at logits (ln 3, 0)     -> (ln 4 + ln 2) / 2   = ln 8 / 2
    ln3 = math.log(3)
    logits = torch.tensor([[ln3, -ln3], [ln3, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    expected = (math.log(16 / 3) / 2 + math.log(8) / 2) / 2  # = ln(128/3) / 4: the mean over images
    assert classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert classification_loss(logits[:1], labels[:1]).item() == pytest.approx(math.log(16 / 3) / 2, rel=1e-6)


def test_gsc_loss():
    torch.manual_seed(0)
    cam = torch.rand(2, 3, 4, 4)
    assert gsc_loss(cam, cam.clone()).item() == 0.0
    assert_close(gsc_loss(torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)), torch.tensor(1.0))
    assert_close(gsc_loss(cam, torch.zeros_like(cam)), cam.mean())


def test_spatial_cosine_shape_and_values():
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0, 0, 0] = 1.0
    a[0, 1, 1, 1] = 2.0
    cos = spatial_cosine(a, a)
    assert cos.shape == (1, 2, 2)
    assert_close(cos[0], torch.eye(2))


def test_ccl_literal_mode_identical_maps():
    torch.manual_seed(0)
    cam = torch.rand(2, 3, 4, 4)
    present = torch.ones(2, 3)
    assert_close(ccl_loss(cam, cam.clone(), present, "literal"), torch.tensor(2 / 9))


def test_ccl_literal_mode_averages_over_present_channels_only():
    torch.manual_seed(0)
    cam = torch.rand(1, 3, 4, 4)
    cam[:, 2] = 0.0  # absent class: zero maps, cos 0, would give 0.5 if counted
    present = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(ccl_loss(cam, cam.clone(), present, "literal"), torch.tensor(2 / 9))


def orthogonal_maps() -> torch.Tensor:
    cam = torch.zeros(1, 2, 2, 2)
    cam[0, 0, 0] = 1.0  # top row
    cam[0, 1, 1] = 1.0  # bottom row
    return cam


def test_ccl_contrastive_orthogonal_identical_is_zero():
    cam = orthogonal_maps()
    loss = ccl_loss(cam, cam.clone(), torch.ones(1, 2), "contrastive")
    assert_close(loss, torch.tensor(0.0))


def test_ccl_contrastive_all_alike():
    # every cosine is 1: positives 0, negatives 0.5 * (2/3)^2 = 2/9; two of four pairs are negatives
    cam = torch.ones(1, 2, 3, 3)
    loss = ccl_loss(cam, cam.clone(), torch.ones(1, 2), "contrastive")
    assert_close(loss, torch.tensor(1 / 9))


def test_ccl_contrastive_swapped_maps():
    # CAM channel k equals R-CAM channel 1-k: positives 0.5 (1 - 0)^2, negatives 0.5 (2/3)^2 -> mean 13/36
    cam = orthogonal_maps()
    loss = ccl_loss(cam, cam.flip(1), torch.ones(1, 2), "contrastive")
    assert_close(loss, torch.tensor((0.5 + 2 / 9) / 2))


def test_ccl_contrastive_ignores_absent_channel_pairs():
    cam = torch.ones(1, 3, 2, 2)
    cam[:, 2] = 0.0
    rcam = cam.clone()
    rcam[:, 2] = 1.0  # the absent channel disagrees, but is not counted
    present = torch.tensor([[1.0, 1.0, 0.0]])
    assert_close(ccl_loss(cam, rcam, present, "contrastive"), torch.tensor(1 / 9))


def v2_outputs(batch: int = 2, classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "logits": torch.randn(batch, classes),
        "cam_bg": torch.rand(batch, classes + 1, 2, 2),
        "rcam": torch.rand(batch, classes + 1, 4, 4),
    }


def valid_mask_for(labels: torch.Tensor, size: int = 16) -> torch.Tensor:
    batch = labels.shape[0]
    channels = torch.cat([torch.ones(batch, 1), labels], dim=1)
    return channels[:, :, None, None].expand(-1, -1, size, size).contiguous()


def test_swtformer_loss_v2_terms_and_total():
    out = v2_outputs()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    params = LossParams(cls_weight=2.0, gsc_weight=3.0, ccl_weight=0.5)
    terms = swtformer_loss(out, labels, valid_mask_for(labels), **params.model_dump())
    assert set(terms) == {"cls", "gsc", "ccl", "total"}
    assert_close(terms["cls"], F.multilabel_soft_margin_loss(out["logits"], labels))
    assert_close(terms["total"], 2.0 * terms["cls"] + 3.0 * terms["gsc"] + 0.5 * terms["ccl"])
    for value in terms.values():
        assert value.ndim == 0 and torch.isfinite(value)


def test_swtformer_loss_gsc_zero_when_cam_equals_rcam():
    labels = torch.ones(1, 2)
    rcam = torch.rand(1, 3, 4, 4)
    rcam = rcam / rcam.amax(dim=(2, 3), keepdim=True)
    out = {"logits": torch.zeros(1, 2), "cam_bg": rcam.clone(), "rcam": rcam}
    terms = swtformer_loss(out, labels, valid_mask_for(labels, 4), **LossParams().model_dump())
    assert_close(terms["gsc"], torch.tensor(0.0), atol=1e-4, rtol=0)
    assert_close(terms["ccl"], torch.tensor(2 / 9), atol=1e-4, rtol=0)


def test_swtformer_loss_switches_off_terms():
    out = v2_outputs()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = valid_mask_for(labels)
    off = swtformer_loss(out, labels, mask, **LossParams(gsc=False, ccl=False).model_dump())
    assert set(off) == {"cls", "total"}
    assert_close(off["total"], off["cls"])
    only_gsc = swtformer_loss(out, labels, mask, **LossParams(ccl=False).model_dump())
    assert set(only_gsc) == {"cls", "gsc", "total"}
    only_ccl = swtformer_loss(out, labels, mask, **LossParams(gsc=False, ccl_mode="contrastive").model_dump())
    assert set(only_ccl) == {"cls", "ccl", "total"}


def test_swtformer_loss_v1_outputs_only_cls():
    out = v2_outputs()
    v1 = {"logits": out["logits"], "cam": torch.rand(2, 3, 2, 2)}
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    terms = swtformer_loss(v1, labels, valid_mask_for(labels), cls_weight=2.5)
    assert set(terms) == {"cls", "total"}
    assert_close(terms["total"], 2.5 * terms["cls"])
    assert_close(terms["cls"], classification_loss(out["logits"], labels))


def test_swtformer_loss_gradients_reach_both_maps():
    out = {k: v.requires_grad_() for k, v in v2_outputs().items()}
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = LossParams(detach_cam="none").model_dump()
    swtformer_loss(out, labels, valid_mask_for(labels), **loss)["total"].backward()
    for name in ("logits", "cam_bg", "rcam"):
        assert out[name].grad is not None and out[name].grad.abs().sum() > 0


def cam_gradient(**loss) -> torch.Tensor:
    """The gradient of the whole loss with respect to ``cam_bg`` (the CAM branch)."""
    out = {k: v.requires_grad_() for k, v in v2_outputs().items()}
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    swtformer_loss(out, labels, valid_mask_for(labels), **LossParams(**loss).model_dump())["total"].backward()
    return out["cam_bg"].grad if out["cam_bg"].grad is not None else torch.zeros_like(out["cam_bg"])


def test_detach_cam_stops_the_chosen_terms_at_the_cam():
    assert LossParams().detach_cam == "both", "the default"
    assert cam_gradient(detach_cam="both").abs().sum() == 0
    assert_close(cam_gradient(detach_cam="ccl"), cam_gradient(detach_cam="none", ccl=False))
    assert cam_gradient(detach_cam="ccl", gsc=False).abs().sum() == 0
    assert not torch.allclose(cam_gradient(detach_cam="none"), cam_gradient(detach_cam="ccl"))


def test_detach_cam_keeps_the_loss_values():
    out = v2_outputs()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = valid_mask_for(labels)
    plain = swtformer_loss(out, labels, mask, **LossParams(detach_cam="none").model_dump())
    detached = swtformer_loss(out, labels, mask, **LossParams(detach_cam="both").model_dump())
    for name in ("cls", "gsc", "ccl", "total"):
        assert_close(detached[name], plain[name])


def test_gsc_uses_max_normalised_rcam():
    labels = torch.ones(1, 1)
    rcam = torch.full((1, 2, 2, 2), 0.25)
    cam_bg = torch.ones(1, 2, 2, 2)
    out = {"logits": torch.zeros(1, 1), "cam_bg": cam_bg, "rcam": rcam}
    terms = swtformer_loss(out, labels, valid_mask_for(labels, 2), **LossParams(ccl=False).model_dump())
    assert_close(terms["gsc"], gsc_loss(cam_bg, max_norm(rcam)))
    assert terms["gsc"].item() < 1e-4
