"""Dense CRF: snapping to colour edges, normalisation, label restriction shapes, input errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import CrfParams
from pipeline.refinement.crf import dense_crf, normalise_probs

SIZE = 32
EDGE = 16  # the colour edge: columns < EDGE are red, the rest blue


def two_colour_image() -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:, :EDGE] = (200, 30, 30)
    image[:, EDGE:] = (30, 30, 200)
    return image


def blurry_seed(centre: float, width: float = 3.0) -> np.ndarray:
    """(2, H, W): background on the left, class 1 on the right, a soft ramp whose midpoint is off the edge."""
    x = np.arange(SIZE, dtype=np.float32)
    fg = 1.0 / (1.0 + np.exp(-(x - centre) / width))  # (W,)
    fg = np.broadcast_to(0.2 + 0.6 * fg, (SIZE, SIZE))  # never fully confident
    return np.stack([1.0 - fg, fg]).astype(np.float32)


def boundary_column(labels: np.ndarray) -> float:
    """Mean over rows of the first column labelled 1."""
    return float(np.mean([np.argmax(row == 1) for row in labels]))


PARAMS = CrfParams(iterations=10, bilateral_sxy=20, bilateral_srgb=13)


@pytest.mark.parametrize("centre", [11.0, 21.0])
def test_crf_snaps_a_blurry_seed_to_the_colour_edge(centre):
    seed = blurry_seed(centre)
    assert abs(boundary_column(seed.argmax(0)) - centre) <= 1  # the seed's boundary is off the edge
    posterior = dense_crf(two_colour_image(), seed, **PARAMS.model_dump())
    assert posterior.shape == seed.shape and posterior.dtype == np.float32
    np.testing.assert_allclose(posterior.sum(0), 1.0, atol=1e-4)
    assert boundary_column(posterior.argmax(0)) == EDGE


def test_without_pairwise_terms_the_posterior_is_the_normalised_unary():
    seed = blurry_seed(11.0)
    params = CrfParams(gauss_compat=0, bilateral_compat=0, iterations=5)
    np.testing.assert_allclose(dense_crf(two_colour_image(), seed, **params.model_dump()), seed, atol=1e-5)


def test_unnormalised_scores_give_the_normalised_result():
    seed = blurry_seed(11.0)
    scaled = seed * np.linspace(0.5, 3.0, SIZE, dtype=np.float32)[None, None, :]  # per-pixel scale
    a = dense_crf(two_colour_image(), seed, **PARAMS.model_dump())
    b = dense_crf(two_colour_image(), scaled, **PARAMS.model_dump())
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_restricted_label_set_with_three_labels():
    # three labels: bg + two classes, the third class is nowhere likely -> never chosen
    seed = blurry_seed(11.0)
    probs = np.concatenate([seed, np.full((1, SIZE, SIZE), 0.01, np.float32)])
    labels = dense_crf(two_colour_image(), probs, **PARAMS.model_dump()).argmax(0)
    assert set(np.unique(labels)) == {0, 1}


def test_single_label_is_certain():
    out = dense_crf(two_colour_image(), np.full((1, SIZE, SIZE), 0.3, np.float32), **PARAMS.model_dump())
    np.testing.assert_array_equal(out, np.ones((1, SIZE, SIZE), np.float32))


def test_normalise_probs_handles_negatives_and_zeros():
    probs = np.array([[[2.0, 0.0]], [[-1.0, 0.0]], [[2.0, 0.0]]], np.float32)  # (3, 1, 2)
    out = normalise_probs(probs)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(out[:, 0, 1], [1 / 3] * 3)


@pytest.mark.parametrize(
    ("image", "probs"),
    [
        (np.zeros((SIZE, SIZE, 3), np.float32), np.ones((2, SIZE, SIZE), np.float32)),  # float image
        (np.zeros((SIZE, SIZE + 1, 3), np.uint8), np.ones((2, SIZE, SIZE), np.float32)),  # size mismatch
        (np.zeros((SIZE, SIZE, 3), np.uint8), np.ones((SIZE, SIZE), np.float32)),  # 2-D probs
    ],
)
def test_bad_inputs_raise(image, probs):
    with pytest.raises(ValueError):
        dense_crf(image, probs, **PARAMS.model_dump())


@pytest.mark.parametrize("bad", [{"iterations": 0}, {"gauss_sxy": 0}, {"bilateral_compat": -1}, {"bogus": 1}])
def test_crf_params_validation(bad):
    with pytest.raises(ValueError):
        CrfParams(**bad)
