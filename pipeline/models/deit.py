"""A DeiT/ViT classifier with an MCTformer-style patch-token CAM head (``model.arch: deit``).

The image-level scores come from the class token (a linear head, as DeiT); a convolution over the patch-token
grid gives a per-class logit map whose global average is a second set of scores and whose ReLU is the CAM
(MCTformer-V2's patch head; AReAM's DeiT baseline). Both are trained with the multi-label soft-margin loss
(:func:`pipeline.losses.deit_loss`). The ViT is timm's ``VisionTransformer`` with ``dynamic_img_size=True`` (the
positional embedding is interpolated for other input sizes); inputs are zero-padded to a multiple of the patch
size and the token grid is cropped back, as for the Swin backbone.

Attention maps: every block's attention is a :class:`RecordingAttention`. It runs timm's fused kernel unless
attention is asked for (``forward(x, attention=True)``); then it computes ``softmax(q k^T / sqrt(d))``
explicitly and keeps both the scaled logits and the probabilities, which AReAM (pre-softmax logits) and
WegFormer (probabilities, with gradients) need.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.aream import fused_affinity, reactivate
from pipeline.config import is_vit_name
from pipeline.errors import ModelError, one_line
from pipeline.models.backbone import ConvStemPatchEmbed
from pipeline.models.padding import crop_to_input, pad_to_multiple
from pipeline.models.pretrained import load_pretrained
from pipeline.models.swtformer import Features, max_norm


class RecordingAttention(Attention):
    """timm's ``Attention`` that, when :attr:`record` is set, computes attention explicitly and keeps it.

    With ``record`` off the module is timm's (fused ``scaled_dot_product_attention`` where timm uses it). With
    it on, :attr:`recorded` holds ``(logits, probs)`` of the last call: the scaled pre-softmax logits
    ``q k^T / sqrt(d)`` and their row softmax, both (B, heads, T, T) and part of the autograd graph.
    """

    record: bool = False
    recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """(B, T, D) tokens -> (B, T, D); records the attention when :attr:`record` is set."""
        if not self.record:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("recording attention supports unmasked self-attention only")
        b, t, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, T, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
        probs = logits.softmax(dim=-1)
        self.recorded = (logits, probs)
        out = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(b, t, self.attn_dim)  # (B, T, heads * d)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class DeiTClassifier(nn.Module):
    """Class-token classification plus a patch-token CAM head on a timm ViT.

    Args:
        vit: A timm ``VisionTransformer`` built with ``dynamic_img_size=True``, ``num_classes=0`` and
            :class:`RecordingAttention` in every block.
        num_classes: Number of foreground classes C.
        head_kernel: Kernel of the patch-token CAM convolution (1 or 3; MCTformer: 3).
        final_norm: Apply the ViT's final LayerNorm to the tokens the heads read.
    """

    version = "deit"
    """What :func:`pipeline.cams.generate_cams` checks: no R-CAM (that is SWTformer-V2's)."""

    def __init__(self, vit: VisionTransformer, num_classes: int, head_kernel: int = 3, final_norm: bool = True) -> None:
        super().__init__()
        self.vit = vit
        self.final_norm = final_norm
        self.patch_size = vit.patch_embed.patch_size[0]
        self.attentions = [block.attn for block in vit.blocks]
        if not all(isinstance(a, RecordingAttention) for a in self.attentions) or vit.cls_token is None:
            raise ValueError("the ViT needs a class token and RecordingAttention in every block (see build_deit)")
        dim = vit.embed_dim
        self.cls_head = nn.Linear(dim, num_classes)
        self.cam_head = nn.Conv2d(dim, num_classes, head_kernel, padding=head_kernel // 2, bias=head_kernel == 3)

    def new_modules(self) -> list[nn.Module]:
        """The layers trained from scratch (they get the head learning rate)."""
        return [self.cls_head, self.cam_head]

    @contextmanager
    def _recording(self, on: bool) -> Iterator[None]:
        for attention in self.attentions:
            attention.record, attention.recorded = on, None
        try:
            yield
        finally:
            for attention in self.attentions:
                attention.record = False

    def encode(self, x: torch.Tensor, attention: bool = False) -> dict[str, Any]:
        """Run the ViT on (B, 3, H, W) images of any size.

        Returns:
            ``prefix`` (B, P, D) class (and other prefix) tokens; ``tokens`` (B, D, ceil(H/p), ceil(W/p)) patch
            tokens; with ``attention``, ``attention_logits`` and ``attention`` (probabilities): one
            (B, heads, T, T) tensor per block, T = P + the padded grid's token count, prefix tokens first.
        """
        size = x.shape[-2:]
        with self._recording(attention):
            ((tokens, prefix),) = self.vit.forward_intermediates(
                pad_to_multiple(x, self.patch_size),
                indices=1,
                return_prefix_tokens=True,
                norm=self.final_norm,
                intermediates_only=True,
            )
            out = {"prefix": prefix, "tokens": crop_to_input(tokens, size, self.patch_size)}
            if attention:
                out["attention_logits"] = [a.recorded[0] for a in self.attentions]
                out["attention"] = [a.recorded[1] for a in self.attentions]
                for a in self.attentions:
                    a.recorded = None
        return out

    def features(self, x: torch.Tensor) -> Features:
        """The patch-token path only (what ``cams`` fuses across flips): CAM head logits and tokens."""
        tokens = self.encode(x)["tokens"]  # (B, D, h, w)
        return Features(self.cam_head(tokens), tokens, None)

    def reactivated(self, x: torch.Tensor, stage: int = 3, steps: int = 1) -> tuple[Features, torch.Tensor]:
        """AReAM's inference: the patch-token path and its CAM re-activated by the mean attention of all blocks.

        ``stage`` and ``steps`` are SWTformer's (:meth:`pipeline.models.swtformer.SWTformer.reactivated`): a ViT's
        attention is global, one step of every block, as published.

        Returns:
            :meth:`features`' output and the (B, C, h, w) re-activated CAM ``cam'_m = sum_n A_mn cam_n`` of the
            max-normalised CAM, ``A`` the head and block mean of the patch x patch softmax attention
            (:func:`pipeline.aream.fused_affinity`).
        """
        enc = self.encode(x, attention=True)
        tokens = enc["tokens"]  # (B, D, h, w): the padded grid, as the attention's
        feats = Features(self.cam_head(tokens), tokens, None)
        affinity = fused_affinity(enc["attention"], enc["prefix"].shape[1])  # (B, N, N)
        return feats, reactivate(max_norm(F.relu(feats.logit_map)), affinity)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits from the class token: (B, 3, H, W) -> (B, C)."""
        return self.cls_head(self.encode(x)["prefix"][:, 0])

    def maps(
        self, feats: Features, label_mask: torch.Tensor | None = None, seed_locating: str = "cam"
    ) -> dict[str, torch.Tensor]:
        """``patch_logits`` (B, C) = GAP of the CAM head; ``cam`` (B, C, h, w) = max-normalised ReLU of it.

        ``label_mask`` and ``seed_locating`` are accepted for the caller's sake (SWTformer's signature) and unused.
        """
        return {"patch_logits": feats.logit_map.mean(dim=(2, 3)), "cam": max_norm(F.relu(feats.logit_map))}

    def forward(
        self, x: torch.Tensor, label_mask: torch.Tensor | None = None, attention: bool = False
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Full forward pass.

        Returns:
            ``logits`` (B, C) from the class token, ``patch_logits`` (B, C), ``cam`` (B, C, h, w); with
            ``attention`` also the per-block ``attention_logits`` and ``attention`` (see :meth:`encode`).
        """
        enc = self.encode(x, attention)
        out = {"logits": self.cls_head(enc["prefix"][:, 0])}  # (B, C)
        out |= self.maps(Features(self.cam_head(enc["tokens"]), enc["tokens"], None))
        if attention:
            out |= {"attention_logits": enc["attention_logits"], "attention": enc["attention"]}
        return out


def build_deit(
    num_classes: int,
    img_size: int,
    vit: Mapping[str, Any],
    *,
    drop_path_rate: float = 0.0,
    final_norm: bool = True,
    head_kernel: int = 3,
) -> DeiTClassifier:
    """Build the DeiT classifier from ``model.vit``.

    ``vit["name"] == "small"`` builds the CPU-sized ViT of ``patch_size``, ``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_ratio`` and ``conv_stem`` at ``img_size``; any other name is a timm ViT/DeiT built at its
    own default size (so pretrained positional embeddings fit; other sizes are interpolated at run time).
    ``vit["pretrained"]`` is resolved by :func:`pipeline.models.pretrained.load_pretrained` into the ViT.

    Raises:
        ModelError: If the name is not a timm ViT/DeiT with a class token and plain attention blocks.
        PretrainedError: If the pretrained weights cannot be loaded.
    """
    name = vit["name"]
    common = {"num_classes": 0, "drop_path_rate": drop_path_rate, "dynamic_img_size": True}
    if name == "small":
        stem = ConvStemPatchEmbed if vit["conv_stem"] else PatchEmbed
        sizes = {k: vit[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
        model = VisionTransformer(img_size=img_size, **sizes, **common, embed_layer=stem, attn_layer=RecordingAttention)
    elif is_vit_name(name):
        try:
            model = timm.create_model(name, pretrained=False, **common, attn_layer=RecordingAttention)
        except TypeError as exc:
            raise ModelError(f"model.vit.name: cannot build {name!r} as a plain ViT ({one_line(exc)})") from None
    else:
        raise ModelError(f"model.vit.name: {name!r} is not a timm ViT/DeiT (e.g. deit_small_patch16_224)")
    if getattr(model, "cls_token", None) is None:
        raise ModelError(f"model.vit.name: {name!r} has no class token; the DeiT classifier reads one")
    if not all(isinstance(block.attn, RecordingAttention) for block in model.blocks):
        raise ModelError(f"model.vit.name: {name!r} does not use timm's plain Attention in every block")
    load_pretrained(model, vit["pretrained"], "model.vit.pretrained")
    return DeiTClassifier(model, num_classes, head_kernel=head_kernel, final_norm=final_norm)
