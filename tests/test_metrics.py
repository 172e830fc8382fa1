import numpy as np
import pytest

from pipeline.metrics import (
    SeedEvaluator,
    average_precision,
    classification_map,
    confusion_matrix,
    iou_per_class,
    iou_report,
    mean_iou,
    threshold_grid,
)


def test_confusion_matrix_skips_ignore():
    gt = np.array([[0, 1, 2], [2, 255, 255]])
    pred = np.array([[0, 1, 1], [2, 0, 2]])
    expected = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 3), expected)
    assert confusion_matrix(pred, gt, 3).dtype == np.int64


def test_iou_per_class_and_mean_by_hand():
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    # class 0: TP 5, GT 6, Pred 7 -> 5 / 8; class 1: TP 3, GT 5, Pred 4 -> 3 / 6; class 2: absent -> NaN
    iou = iou_per_class(confusion)
    np.testing.assert_allclose(iou[:2], [5 / 8, 1 / 2])
    assert np.isnan(iou[2])
    assert mean_iou(confusion) == pytest.approx((5 / 8 + 1 / 2) / 2)


def test_iou_report_names_the_metrics_and_skips_absent_classes():
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # the case above
    report = iou_report(confusion, ["background", "a", "b"], "crf")
    assert list(report) == ["crf/miou", "crf/iou/background", "crf/iou/a"], "mIoU first, then classes in order"
    assert report["crf/miou"] == mean_iou(confusion) and report["crf/iou/a"] == 0.5
    assert all(type(value) is float for value in report.values())
    assert list(iou_report(confusion, ["bg", "a", "b"], "cam", "_best")) == [
        "cam/miou_best",
        "cam/iou_best/bg",
        "cam/iou_best/a",
    ]


def test_iou_class_only_predicted_counts_as_zero():
    confusion = np.array([[2, 1], [0, 0]])
    np.testing.assert_allclose(iou_per_class(confusion), [2 / 3, 0.0])


def test_threshold_grid_inclusive():
    grid = threshold_grid(0.6, 0.1)
    np.testing.assert_allclose(grid, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    fine = threshold_grid(0.6, 0.01)
    assert len(fine) == 61
    assert fine[0] == 0.0 and fine[-1] == 0.6
    assert 0.29 in fine
    np.testing.assert_array_equal(threshold_grid(1.0, 0.25), [0.0, 0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize(
    ("max_threshold", "step", "last", "length"),
    [
        (0.55, 0.1, 0.5, 6),  # max between two steps: the grid stops below it
        (0.75, 0.1, 0.7, 8),
        (0.3, 0.1, 0.3, 4),  # 0.3 / 0.1 = 2.9999999999999996 in floats: 0.3 is still reached
        (0.6, 0.07, 0.56, 9),
        (0.05, 0.1, 0.0, 1),  # max below one step: only 0
    ],
)
def test_threshold_grid_values_when_max_is_not_on_the_grid(max_threshold, step, last, length):
    grid = threshold_grid(max_threshold, step)
    assert len(grid) == length
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(last, abs=1e-12)
    np.testing.assert_allclose(grid, np.arange(length) * step, atol=1e-12)
    assert grid[-1] <= max_threshold


def test_seed_evaluator_argmax_protocol():
    keys = np.array([0, 2, 5])
    maps = np.array(
        [
            [[0.9, 0.1, 0.1, 0.1]],  # background
            [[0.1, 0.8, 0.2, 0.7]],  # class 2
            [[0.0, 0.3, 0.9, 0.2]],  # class 5
        ],
        dtype=np.float16,
    )  # (3, 1, 4): argmax -> [0, 2, 5, 2]
    gt = np.array([[0, 2, 5, 5]], dtype=np.uint8)
    evaluator = SeedEvaluator(6, threshold_grid(0.6, 0.1))
    evaluator.add(maps, keys, gt)
    expected = np.zeros((6, 6), np.int64)
    expected[0, 0] = expected[2, 2] = expected[5, 5] = expected[5, 2] = 1
    np.testing.assert_array_equal(evaluator.argmax_confusion, expected)
    summary = evaluator.summary()
    # IoU: bg 1, class 2: 1 / 2, class 5: 1 / 2
    assert summary["miou_argmax"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(summary["iou_argmax"][[0, 2, 5]], [1.0, 0.5, 0.5])


def test_seed_evaluator_argmax_tie_goes_to_background():
    maps = np.array([[[0.5, 0.5]], [[0.5, 0.5]]], dtype=np.float32)
    evaluator = SeedEvaluator(2, np.array([0.0]))
    evaluator.add(maps, np.array([0, 1]), np.array([[0, 1]]))
    np.testing.assert_array_equal(evaluator.argmax_confusion, [[1, 0], [1, 0]])


def test_seed_evaluator_sweep_finds_unique_best_threshold():
    # pixel 0: fg score 0.35, GT class 3 (right only for t < 0.35)
    # pixel 1: fg score 0.25, GT background (right only for t >= 0.25)
    # so t = 0.3 is the only grid value that gets both right
    keys = np.array([0, 3])
    maps = np.array([[[0.9, 0.9]], [[0.35, 0.25]]], dtype=np.float32)  # background channel ignored by the sweep
    gt = np.array([[3, 0]])
    evaluator = SeedEvaluator(4, threshold_grid(0.6, 0.1))
    evaluator.add(maps, keys, gt)
    summary = evaluator.summary()
    assert summary["best_threshold"] == pytest.approx(0.3)
    assert summary["miou_best"] == pytest.approx(1.0)
    sweep = summary["sweep"]
    assert len(sweep) == 7
    assert np.argmax(sweep) == 3
    assert np.sum(sweep == sweep.max()) == 1
    assert sweep[2] == pytest.approx(0.25) and sweep[4] == pytest.approx(0.25)
    # the argmax protocol predicts background everywhere (bg 0.9 wins)
    assert summary["miou_argmax"] == pytest.approx(0.25)


def test_seed_evaluator_sweep_tie_goes_to_background():
    keys = np.array([0, 1])
    maps = np.array([[[0.0, 0.0]], [[0.5, 0.75]]], dtype=np.float32)
    gt = np.array([[0, 1]])
    evaluator = SeedEvaluator(2, np.array([0.25, 0.5, 0.75]))
    evaluator.add(maps, keys, gt)
    # t = 0.5: score 0.5 is a tie -> background (right), 0.75 > 0.5 -> class 1 (right)
    np.testing.assert_array_equal(evaluator.sweep_confusions[1], [[1, 0], [0, 1]])
    # t = 0.75: both tie or lose -> background
    np.testing.assert_array_equal(evaluator.sweep_confusions[2], [[1, 0], [1, 0]])
    # t = 0.25: both foreground
    np.testing.assert_array_equal(evaluator.sweep_confusions[0], [[0, 1], [0, 1]])
    assert evaluator.summary()["best_threshold"] == 0.5


def test_seed_evaluator_background_only_image():
    maps = np.full((1, 2, 2), 0.2, np.float32)
    gt = np.array([[0, 0], [0, 255]])
    evaluator = SeedEvaluator(3, np.array([0.0, 0.5]))
    evaluator.add(maps, np.array([0]), gt)
    for confusion in evaluator.sweep_confusions:
        np.testing.assert_array_equal(confusion, [[3, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert evaluator.argmax_confusion[0, 0] == 3


def test_seed_evaluator_accumulates_images():
    evaluator = SeedEvaluator(2, np.array([0.5]))
    maps = np.array([[[0.0]], [[1.0]]], np.float32)
    evaluator.add(maps, np.array([0, 1]), np.array([[1]]))
    evaluator.add(maps, np.array([0, 1]), np.array([[0]]))
    np.testing.assert_array_equal(evaluator.argmax_confusion, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(evaluator.sweep_confusions[0], [[0, 1], [0, 1]])


def test_average_precision_by_hand():
    # ranks: + - + -  -> (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 1])) == pytest.approx(1.0)
    assert average_precision(np.array([0.9, 0.1]), np.array([0, 1])) == pytest.approx(0.5)


def test_average_precision_ties_are_order_independent():
    # thresholds 0.9: P 1, R 1/3; 0.5: P 2/3, R 2/3; 0.1: P 3/4, R 1 -> (1 + 2/3 + 3/4) / 3
    expected = (1 + 2 / 3 + 3 / 4) / 3
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    assert average_precision(scores, np.array([1, 1, 0, 1])) == pytest.approx(expected)
    assert average_precision(scores, np.array([1, 0, 1, 1])) == pytest.approx(expected)
    # all tied: precision = prevalence
    assert average_precision(np.full(4, 0.3), np.array([0, 1, 0, 0])) == pytest.approx(0.25)


def test_average_precision_no_positive_is_nan():
    assert np.isnan(average_precision(np.array([0.2, 0.8]), np.array([0, 0])))


def test_classification_map_classwise_vs_samplewise():
    scores = np.array([[0.9, 0.2], [0.4, 0.8], [0.1, 0.3], [0.5, 0.6]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0 ranks 0.9(+) 0.5(-) 0.4(-) 0.1(+) -> (1 + 2/4) / 2 = 0.75; class 1: 0.8(+) first -> 1
    # images: 1, 1, 1/2 (positive ranked second), last image has no positive (skipped)
    result = classification_map(scores, targets)
    assert result["map_classwise"] == pytest.approx((0.75 + 1.0) / 2)
    assert result["map_samplewise"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_classification_map_skips_class_without_positives():
    scores = np.array([[0.9, 0.2, 0.5], [0.4, 0.8, 0.1]])
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    result = classification_map(scores, targets)
    assert result["map_classwise"] == pytest.approx(1.0)
    assert result["map_samplewise"] == pytest.approx(1.0)


def test_seed_evaluator_sweep_equals_one_confusion_per_threshold():
    rng = np.random.default_rng(0)
    grid = threshold_grid(0.6, 0.01)
    evaluator = SeedEvaluator(5, grid)
    expected = np.zeros_like(evaluator.sweep_confusions)
    for _ in range(3):
        keys = np.array([0, 2, 4])
        maps = rng.random((3, 16, 16)).astype(np.float32)
        maps[1, 0, :4] = grid[:4]  # scores exactly on thresholds: a tie is background
        gt = rng.choice([0, 2, 4, 255], size=(16, 16)).astype(np.uint8)
        evaluator.add(maps, keys, gt)
        fg_score, fg_label = maps[1:].max(0), keys[1:][maps[1:].argmax(0)]
        for i, t in enumerate(grid):
            expected[i] += confusion_matrix(np.where(fg_score > t, fg_label, 0), gt, 5)
    np.testing.assert_array_equal(evaluator.sweep_confusions, expected)
