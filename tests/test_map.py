"""Mean average precision (notebook 09): hand-worked examples and a pycocotools cross-check."""
import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from coco_reference import coco_ap  # noqa: E402
from ssd_helpers import (average_precision, class_precision_recall,  # noqa: E402
                      evaluate_map, match_detections, mean_average_precision,
                      plot_pr_curve, precision_recall)

TOL = 1e-4


# ---------------------------------------------------------------- helpers --

def gt_rows(*rows):
    """(m, 5) ground-truth tensor from (class, xmin, ymin, xmax, ymax) tuples."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def det_rows(*rows):
    """(k, 6) detection tensor from (class, score, xmin, ymin, xmax, ymax)."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def _random_box(rng, pixel_grid):
    """One (xmin, ymin, xmax, ymax) box, normalised or on an integer grid."""
    if pixel_grid:
        x, y = rng.integers(0, 30, size=2)
        w, h = rng.integers(2, 14, size=2)
    else:
        x, y = rng.uniform(0, 0.8, size=2)
        w, h = rng.uniform(0.05, 0.4, size=2)
    return [x, y, x + w, y + h]


def _jitter(rng, box, pixel_grid):
    """A detection near a ground-truth box (still a box of positive size)."""
    x1, y1, x2, y2 = box
    if pixel_grid:
        noise = rng.integers(-1, 2, size=4)
        min_size = 1
    else:
        size = np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
        noise = rng.normal(0, 0.08, size=4) * size
        min_size = 1e-3
    x1, y1, x2, y2 = np.add(box, noise)
    x1, x2 = min(x1, x2), max(x2, x1, min(x1, x2) + min_size)
    y1, y2 = min(y1, y2), max(y2, y1, min(y1, y2) + min_size)
    return [x1, y1, x2, y2]


def _score(rng):
    """A random score; often rounded to one decimal to create exact ties."""
    s = rng.uniform(0.05, 1.0)
    return round(s, 1) if rng.random() < 0.4 else s


def _image(rng, num_classes, pixel_grid):
    """Ground-truth and detection rows (lists) for one random image."""
    gts = [[rng.integers(num_classes)] + _random_box(rng, pixel_grid)
           for _ in range(rng.integers(0, 7))]
    if gts and rng.random() < 0.15:  # a duplicated object: IoU ties
        gts.append(list(gts[rng.integers(len(gts))]))
    dets = []
    for g in gts:
        for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed / found / twice
            cls = g[0] if rng.random() < 0.9 else rng.integers(num_classes)
            dets.append([cls, _score(rng)] + _jitter(rng, g[1:], pixel_grid))
    for _ in range(rng.integers(0, 4)):  # false positives
        dets.append([rng.integers(num_classes), _score(rng)]
                    + _random_box(rng, pixel_grid))
    if dets and rng.random() < 0.3:  # an exact duplicate detection
        dets.append(list(dets[rng.integers(len(dets))]))
    if rng.random() < 0.1:  # an image without detections
        dets = []
    return gts, dets


def _pad(rows, width, length, rng):
    """(length, width) float32 tensor: rows, then class -1 junk rows."""
    junk = rng.uniform(0, 1, size=(length - len(rows), width))
    junk[:, 0] = -1
    out = np.concatenate([np.asarray(rows, dtype=np.float64).reshape(-1, width),
                          junk])
    return torch.tensor(out, dtype=torch.float32)


def random_dataset(seed, num_images=40, num_classes=3, pixel_grid=False,
                   batched_tensor=False):
    """Seeded random detections and ground truth in the project formats.

    Returns (detections, ground_truths): 3-D tensors (batch, 20, 6) and
    (batch, 10, 5) if batched_tensor, else lists with ragged padding.
    """
    rng = np.random.default_rng(seed)
    images = [_image(rng, num_classes, pixel_grid) for _ in range(num_images)]
    if batched_tensor:
        dets = torch.stack([_pad(d, 6, 20, rng) for _, d in images])
        gts = torch.stack([_pad(g, 5, 10, rng) for g, _ in images])
    else:
        dets = [_pad(d, 6, len(d) + rng.integers(0, 4), rng) for _, d in images]
        gts = [_pad(g, 5, len(g) + rng.integers(0, 4), rng) for g, _ in images]
    return dets, gts


# ----------------------------------------------- cross-check: pycocotools --

CASES = [  # (seed, num_images, num_classes, pixel_grid, batched_tensor)
    (0, 40, 3, False, False), (1, 20, 1, False, True), (2, 50, 2, False, False),
    (3, 30, 3, False, True), (4, 45, 1, False, False), (5, 40, 3, True, False),
    (6, 50, 2, True, True), (7, 25, 3, True, False),
]


@pytest.mark.parametrize("seed,num_images,num_classes,pixel_grid,batched", CASES)
def test_matches_pycocotools(seed, num_images, num_classes, pixel_grid, batched):
    dets, gts = random_dataset(seed, num_images, num_classes, pixel_grid, batched)
    ours = evaluate_map(dets, gts, num_classes=num_classes)
    ref_ap, ref_ap50 = coco_ap(dets, gts, num_classes)
    assert abs(ours["AP"] - ref_ap) < TOL
    assert abs(ours["AP50"] - ref_ap50) < TOL
    assert ours["AP50_voc"] >= 0  # VOC has no reference here; sanity only


def test_max_detections_per_image_and_class_like_pycocotools():
    rng = np.random.default_rng(11)
    gts = [gt_rows(*[[0] + _random_box(rng, False) for _ in range(5)]),
           gt_rows([1, 0.1, 0.1, 0.5, 0.5])]
    boxes = [[0, _score(rng)] + _jitter(rng, gts[0][i % 5, 1:].tolist(), False)
             for i in range(150)]  # 150 > 100 detections of class 0
    dets = [det_rows(*boxes), det_rows([1, 0.3, 0.1, 0.1, 0.5, 0.5])]
    ours = evaluate_map(dets, gts, num_classes=2)
    ref_ap, ref_ap50 = coco_ap(dets, gts, 2)
    assert abs(ours["AP"] - ref_ap) < TOL
    assert abs(ours["AP50"] - ref_ap50) < TOL


# ------------------------------------------------ hand-worked examples --

def test_perfect_detector_scores_one():
    gts = [gt_rows([0, 0, 0, 1, 1], [1, 2, 2, 4, 3]), gt_rows([0, 5, 5, 6, 7])]
    dets = [det_rows([0, 0.9, 0, 0, 1, 1], [1, 0.8, 2, 2, 4, 3]),
            det_rows([0, 0.7, 5, 5, 6, 7])]
    assert evaluate_map(dets, gts) == {"AP50": 1.0, "AP": 1.0, "AP50_voc": 1.0}


def test_tp_fp_tp_with_two_gts():
    # Ranked: TP, FP, TP with 2 ground truths:
    #   recall    = [1/2, 1/2, 2/2]
    #   precision = [1/1, 1/2, 2/3]  -> envelope [1, 2/3, 2/3]
    # VOC:  1/2 * 1 + 1/2 * 2/3 = 5/6
    # COCO: recall levels 0.00..0.50 (51 of them) see precision 1,
    #       levels 0.51..1.00 (50) see 2/3: (51 + 50 * 2/3) / 101 = 253/303
    gts = [gt_rows([0, 0, 0, 1, 1], [0, 2, 2, 3, 3])]
    dets = [det_rows([0, 0.9, 0, 0, 1, 1],      # TP
                     [0, 0.8, 5, 5, 6, 6],      # FP (overlaps nothing)
                     [0, 0.7, 2, 2, 3, 3])]     # TP
    recall, precision = class_precision_recall(dets, gts, 0, 0.5)
    assert recall.tolist() == [0.5, 0.5, 1.0]
    assert precision.tolist() == pytest.approx([1, 0.5, 2 / 3])
    result = evaluate_map(dets, gts)
    assert result["AP50_voc"] == pytest.approx(5 / 6, abs=1e-12)
    assert result["AP50"] == pytest.approx(253 / 303, abs=1e-12)
    assert result["AP50"] == pytest.approx(coco_ap(dets, gts, 1)[1], abs=TOL)


def test_voc_and_coco_on_hand_made_pr_curve():
    recall = [0.25, 0.25, 0.5, 0.75, 0.75]
    precision = [1.0, 0.5, 0.6, 0.4, 0.5]
    # envelope (max to the right): [1.0, 0.6, 0.6, 0.5, 0.5]
    # VOC area: 0.25*1.0 + 0*0.6 + 0.25*0.6 + 0.25*0.5 + 0*0.5 = 0.525
    assert average_precision(recall, precision, "voc") == pytest.approx(0.525)
    # COCO: levels 0..0.25 (26) -> 1.0, 0.26..0.50 (25) -> 0.6,
    #       0.51..0.75 (25) -> 0.5, 0.76..1.00 (25) -> 0 (never reached)
    expected = (26 * 1.0 + 25 * 0.6 + 25 * 0.5) / 101
    assert average_precision(recall, precision, "coco") == pytest.approx(expected)
    # VOC2007 11-point: r = 0, .1, .2 -> 1.0; .3, .4, .5 -> 0.6; .6, .7 -> 0.5; .8, .9, 1 -> 0
    assert average_precision(recall, precision, "voc07") == pytest.approx(
        (3 * 1.0 + 3 * 0.6 + 2 * 0.5) / 11)
    with pytest.raises(ValueError):
        average_precision(recall, precision, "11-point")


def test_voc07_counts_a_recall_of_exactly_three_tenths():
    # 10 ground truths: recall reaches 0.3 exactly at the 4th detection (precision 3/4), then stops
    recall, precision = np.array([0.1, 0.2, 0.2, 0.3]), np.array([1.0, 1.0, 2 / 3, 0.75])
    assert average_precision(recall, precision, "voc07") == pytest.approx((3 * 1.0 + 0.75) / 11)


@pytest.mark.parametrize("seed", range(5))
def test_voc07_matches_the_devkit_formula(seed):
    # the VOC2007 devkit: for t in 0, 0.1, ..., 1: p = max(precision[recall >= t]), or 0 if none
    rng = np.random.default_rng(seed)
    is_tp = rng.random(40) < 0.6
    recall = np.cumsum(is_tp) / 30
    precision = np.cumsum(is_tp) / np.arange(1, 41)
    devkit = np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                      for t in np.arange(11) / 10])
    assert average_precision(recall, precision, "voc07") == pytest.approx(devkit, abs=1e-12)


def test_empty_curve_has_zero_ap():
    empty = torch.zeros(0, dtype=torch.float64)
    assert average_precision(empty, empty, "coco") == 0.0
    assert average_precision(empty, empty, "voc") == 0.0
    gts = [gt_rows([0, 0, 0, 1, 1])]
    dets = [det_rows()]
    assert evaluate_map(dets, gts) == {"AP50": 0.0, "AP": 0.0, "AP50_voc": 0.0}


# ------------------------------------------------ COCO matching details --

def test_equal_iou_tie_goes_to_last_gt_like_coco():
    # Detection A overlaps both gts with IoU exactly 3/5.  COCO assigns it to
    # the LAST of them (gt2), which leaves gt1 free for detection B.
    gts = gt_rows([0, 0, 0, 2, 2], [0, 1, 0, 3, 2])
    dets = det_rows([0, 0.9, 0.5, 0, 2.5, 2],   # A
                    [0, 0.8, 0, 0, 2, 2])       # B: IoU 1 with gt1, 1/3 with gt2
    is_tp, scores = match_detections(dets, gts, 0.5)
    assert is_tp.tolist() == [True, True]
    assert scores.tolist() == pytest.approx([0.9, 0.8])
    assert evaluate_map([dets], [gts])["AP50"] == pytest.approx(
        coco_ap([dets], [gts], 1)[1], abs=TOL)


def test_iou_equal_to_threshold_is_a_match():
    gts = gt_rows([0, 0, 0, 2, 1])
    dets = det_rows([0, 0.5, 0, 0, 1, 1])  # IoU exactly 1/2
    assert match_detections(dets, gts, 0.5)[0].tolist() == [True]
    assert match_detections(dets, gts, 0.55)[0].tolist() == [False]
    # threshold 1.0 is capped at 1 - 1e-10: IoU 1 - 1e-12 still matches
    near = torch.tensor([[0, 1.0, 0, 0, 2, 1 + 1e-12]], dtype=torch.float64)
    assert match_detections(near, gts.double(), 1.0)[0].tolist() == [True]
    assert match_detections(near, gts.double(), 0.99)[0].tolist() == [True]


def test_stable_sort_keeps_input_order_on_score_ties():
    gts = gt_rows([0, 0, 0, 1, 1])
    dets = det_rows([0, 0.5, 5, 5, 6, 6],   # FP, listed first
                    [0, 0.5, 0, 0, 1, 1])   # TP, same score
    is_tp, _ = match_detections(dets, gts, 0.5)
    assert is_tp.tolist() == [False, True]
    # across images: equal scores keep image order (pycocotools mergesort)
    recall, precision = precision_recall(
        [torch.tensor([False]), torch.tensor([True])],
        [torch.tensor([0.5]), torch.tensor([0.5])], num_gts=1)
    assert precision.tolist() == [0.0, 0.5]
    assert recall.tolist() == [0.0, 1.0]


def test_each_gt_matched_once():
    gts = gt_rows([0, 0, 0, 1, 1])
    dets = det_rows([0, 0.9, 0, 0, 1, 1], [0, 0.8, 0, 0, 1, 1])
    assert match_detections(dets, gts, 0.5)[0].tolist() == [True, False]
    assert match_detections(dets, gts, 0.5, max_detections=1)[0].tolist() == [True]


# ------------------------------------------------ padding and classes --

def test_padding_and_class_minus_one_rows_are_ignored():
    dets, gts = random_dataset(21, pixel_grid=False, batched_tensor=False)
    clean_dets = [d[d[:, 0] != -1] for d in dets]
    clean_gts = [g[g[:, 0] != -1] for g in gts]
    # junk with a class -1 and a top score, sitting right on a real object
    noisy_dets = [torch.cat([d, torch.tensor([[-1, 1.0, *g[0, 1:].tolist()]])])
                  if len(g) else d for d, g in zip(clean_dets, clean_gts)]
    noisy_gts = [torch.cat([g, torch.tensor([[-1, 0.1, 0.1, 0.2, 0.2]] * 3)])
                 for g in clean_gts]
    expected = evaluate_map(clean_dets, clean_gts)
    assert evaluate_map(dets, gts) == expected
    assert evaluate_map(noisy_dets, noisy_gts) == expected


def test_list_and_batched_tensor_give_the_same_result():
    dets, gts = random_dataset(3, num_images=10, batched_tensor=True)
    assert evaluate_map(dets, gts) == evaluate_map(list(dets), list(gts))


def test_classes_without_ground_truth_are_left_out():
    gts = [gt_rows([0, 0, 0, 1, 1])]
    dets = [det_rows([0, 0.9, 0, 0, 1, 1], [2, 0.8, 3, 3, 4, 4])]  # class 2: no gt
    result = mean_average_precision(dets, gts, num_classes=3)
    assert result["map"] == 1.0
    assert list(result["per_class"]) == [0]
    assert result["per_threshold"] == {0.5: 1.0}
    assert math.isnan(result["ap"][0, 1]) and math.isnan(result["ap"][0, 2])
    nothing = mean_average_precision([det_rows()], [gt_rows()], num_classes=2)
    assert math.isnan(nothing["map"]) and nothing["per_class"] == {}


def test_plot_pr_curve_returns_axes():
    recall, precision = precision_recall(
        [torch.tensor([True, False, True])],
        [torch.tensor([0.9, 0.8, 0.7])], num_gts=2)
    ax = plot_pr_curve(recall, precision, label="class 0")
    assert ax.get_xlabel() == "recall" and len(ax.lines) == 2
    assert plot_pr_curve([], [], ax=ax) is ax
