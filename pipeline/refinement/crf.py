"""Dense CRF (pydensecrf) over class probabilities, for pseudo labels and for test-time post-processing."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

PROB_FLOOR = 1e-5  # probabilities are clipped here before -log (pydensecrf's default)


def normalise_probs(probs: np.ndarray) -> np.ndarray:
    """Clip negative scores to 0 and divide by the per-pixel sum: (K, H, W) -> (K, H, W) float32.

    A pixel whose scores are all zero becomes uniform.
    """
    p = np.clip(np.asarray(probs, dtype=np.float32), 0, None)  # (K, H, W)
    total = p.sum(0, keepdims=True)  # (1, H, W)
    uniform = np.float32(1.0 / p.shape[0])
    return np.where(total > 0, p / np.maximum(total, np.finfo(np.float32).tiny), uniform).astype(np.float32)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int = 10,
    gauss_sxy: float = 3.0,
    gauss_compat: float = 3.0,
    bilateral_sxy: float = 40.0,
    bilateral_srgb: float = 8.0,
    bilateral_compat: float = 4.0,
) -> np.ndarray:
    """Fully connected CRF with Gaussian + bilateral kernels (Kraehenbuehl & Koltun), mean-field inference.

    The unary is ``-log(clip(p, 1e-5, 1))`` of the per-pixel normalised probabilities. Normalising only adds a
    per-pixel constant to the unary, which mean-field inference ignores, so un-normalised score stacks (PSA's
    ``[(1 - max M)^a ; M_c]``) give the same posterior up to the clipping.

    Args:
        image: (H, W, 3) uint8 RGB image.
        probs: (K, H, W) class scores, K >= 1; negative values are treated as 0.
        iterations: Mean-field iterations.
        gauss_sxy: Spatial std of the Gaussian (smoothness) kernel, in pixels.
        gauss_compat: Its Potts weight (0 drops the kernel).
        bilateral_sxy: Spatial std of the bilateral (appearance) kernel, in pixels.
        bilateral_srgb: Its colour std.
        bilateral_compat: Its Potts weight (0 drops the kernel).

    Returns:
        (K, H, W) float32 posterior marginals (sum to 1 over K).

    Raises:
        ValueError: If the shapes or the image dtype do not fit.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"probs must be (K, H, W) with K >= 1, got shape {probs.shape}")
    k, h, w = probs.shape
    image = np.asarray(image)
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be ({h}, {w}, 3) uint8 to match probs, got {image.shape} {image.dtype}")
    if k == 1:
        return np.ones((1, h, w), np.float32)
    crf = dcrf.DenseCRF2D(w, h, k)  # width first
    unary = unary_from_softmax(normalise_probs(probs), clip=PROB_FLOOR)  # (K, H*W)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    if gauss_compat > 0:
        crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    if bilateral_compat > 0:
        crf.addPairwiseBilateral(
            sxy=bilateral_sxy,
            srgb=bilateral_srgb,
            rgbim=np.ascontiguousarray(image),
            compat=bilateral_compat,
        )
    posterior = np.asarray(crf.inference(iterations), dtype=np.float32)  # (K, H*W)
    return posterior.reshape(k, h, w)
