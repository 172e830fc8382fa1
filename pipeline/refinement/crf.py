"""Dense CRF (pydensecrf) over class probabilities, for pseudo labels and for test-time post-processing."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from pipeline.config import CrfParams

PROB_FLOOR = 1e-5  # probabilities are clipped here before -log (pydensecrf's default)


def normalise_probs(probs: np.ndarray) -> np.ndarray:
    """Clip negative scores to 0 and divide by the per-pixel sum: (K, H, W) -> (K, H, W) float32.

    A pixel whose scores are all zero becomes uniform.
    """
    p = np.clip(np.asarray(probs, dtype=np.float32), 0, None)  # (K, H, W)
    total = p.sum(0, keepdims=True)  # (1, H, W)
    uniform = np.float32(1.0 / p.shape[0])
    return np.where(total > 0, p / np.maximum(total, np.finfo(np.float32).tiny), uniform).astype(np.float32)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """Fully connected CRF with Gaussian + bilateral kernels (Kraehenbuehl & Koltun), mean-field inference.

    The unary is ``-log(clip(p, 1e-5, 1))`` of the per-pixel normalised probabilities. Normalising only adds a
    per-pixel constant to the unary, which mean-field inference ignores, so un-normalised score stacks (PSA's
    ``[(1 - max M)^a ; M_c]``) give the same posterior up to the clipping.

    Args:
        image: (H, W, 3) uint8 RGB image.
        probs: (K, H, W) class scores, K >= 1; negative values are treated as 0.
        params: Iterations and kernel parameters.

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
    if params.gauss_compat > 0:
        crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    if params.bilateral_compat > 0:
        crf.addPairwiseBilateral(
            sxy=params.bilateral_sxy,
            srgb=params.bilateral_srgb,
            rgbim=np.ascontiguousarray(image),
            compat=params.bilateral_compat,
        )
    posterior = np.asarray(crf.inference(params.iterations), dtype=np.float32)  # (K, H*W)
    return posterior.reshape(k, h, w)
