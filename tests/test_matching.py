"""Labelling anchors, NMS and detection (notebook 04b) against d2l and torchvision."""
import pytest
import torch
import torchvision
from conftest import random_labels
from d2l import torch as d2l

import ssd_helpers as H


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch, num_gt", [(1, 1), (4, 1), (3, 4), (8, 10)])
def test_multibox_target_is_identical_to_d2l(seed, batch, num_gt, anchors):
    g = torch.Generator().manual_seed(seed)
    labels = random_labels(g, batch, num_gt)
    ours = H.multibox_target(anchors, labels)
    reference = d2l.multibox_target(anchors, labels.clone())
    for name, a, b in zip(("offsets", "mask", "classes"), ours, reference):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name


def test_multibox_target_on_the_books_example():
    ground_truth = torch.tensor([[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]])
    anchors = torch.tensor([[0, 0.1, 0.2, 0.3], [0.15, 0.2, 0.4, 0.4], [0.63, 0.05, 0.88, 0.98],
                            [0.66, 0.45, 0.8, 0.8], [0.57, 0.3, 0.92, 0.9]])
    offsets, mask, classes = H.multibox_target(anchors[None], ground_truth[None])
    assert classes.tolist() == [[0, 1, 2, 0, 2]]
    assert mask.reshape(5, 4)[:, 0].tolist() == [0, 1, 1, 0, 1]


def test_multibox_target_ties_break_as_in_d2l(anchors):
    # Two identical boxes: equal IoUs everywhere, so only the tie rule decides.
    box = [0, 0.3, 0.3, 0.6, 0.55]
    labels = torch.tensor([[box, box, [1, 0.1, 0.1, 0.2, 0.3]]])
    for a, b in zip(H.multibox_target(anchors, labels),
                    d2l.multibox_target(anchors, labels.clone())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(4))
def test_padding_rows_change_nothing(seed, anchors):
    g = torch.Generator().manual_seed(seed)
    labels = random_labels(g, 4, 3)
    padded = torch.cat([labels, torch.full((4, 2, 5), -1.0)], dim=1)
    for a, b in zip(H.multibox_target(anchors, labels), H.multibox_target(anchors, padded)):
        assert torch.equal(a, b)


def test_d2l_mislabels_padding_and_we_do_not(anchors):
    labels = torch.tensor([[[0, 0.1, 0.1, 0.4, 0.5], [-1, -1, -1, -1, -1]]])
    offsets, mask, classes = d2l.multibox_target(anchors, labels.clone())
    # d2l matches one anchor to the padding row: a positive mask on a background label
    assert ((mask.reshape(-1, 4)[:, 0] > 0) & (classes[0] == 0)).any()
    offsets, mask, classes = H.multibox_target(anchors, labels)
    positive = mask.reshape(-1, 4)[:, 0] > 0
    assert torch.equal(positive, classes[0] > 0)
    assert offsets.abs().max() < 50  # no log(eps) offsets from a zero-size box


def test_batch_mixing_objects_and_padding(anchors):
    g = torch.Generator().manual_seed(7)
    full = random_labels(g, 3, 4)
    labels = full.clone()
    labels[1, 2:] = -1  # image 1 has two objects
    labels[2, :] = -1  # image 2 has none
    offsets, mask, classes = H.multibox_target(anchors, labels)
    one = H.multibox_target(anchors, full[1:2, :2])
    assert torch.equal(classes[1], one[2][0]) and torch.equal(offsets[1], one[0][0])
    assert classes[2].sum() == 0 and mask[2].sum() == 0


@pytest.mark.parametrize("labels, message", [
    ([[[0, 0.5, 0.1, 0.4, 0.3]]], "xmax <= xmin"),
    ([[[0, 0.1, 0.1, 0.4, float("nan")]]], "not finite"),
    ([[[float("nan"), 0.1, 0.1, 0.4, 0.3]]], "class id"),
    ([[0, 0.1, 0.1, 0.4, 0.3]], "shape"),
])
def test_multibox_target_rejects_malformed_labels(labels, message, anchors):
    with pytest.raises(ValueError, match=message):
        H.multibox_target(anchors, torch.tensor(labels))


def scored_boxes(seed, n):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.8
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.3 + 0.01], dim=1)
    return boxes, torch.rand(n, generator=g)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_keeps_what_torchvision_keeps(seed, threshold):
    boxes, scores = scored_boxes(seed, 300)
    ours = H.nms(boxes, scores, threshold)
    assert torch.equal(ours, torchvision.ops.nms(boxes, scores, threshold))
    assert torch.equal(ours, d2l.nms(boxes, scores, threshold))


def test_nms_of_nothing():
    assert H.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)


def kept_rows(output):
    """Detections of one image as a sorted (k, 6) tensor, so that ties in score compare equal."""
    rows = output[output[:, 0] >= 0]
    return torch.tensor(sorted(rows.tolist())).reshape(-1, 6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_classes", [1, 3])
def test_multibox_detection_matches_d2l_when_class_agnostic(seed, num_classes, anchors):
    g = torch.Generator().manual_seed(seed)
    batch, num_anchors = 3, anchors.shape[1]
    cls_probs = torch.softmax(torch.randn(batch, num_classes + 1, num_anchors, generator=g) * 3,
                              dim=1)
    offsets = torch.randn(batch, num_anchors * 4, generator=g) * 0.3
    ours = H.multibox_detection(cls_probs, offsets, anchors, nms_threshold=0.5, pos_threshold=0.2,
                                class_agnostic=True, pre_nms_top_k=None)
    theirs = d2l.multibox_detection(cls_probs, offsets, anchors, nms_threshold=0.5,
                                    pos_threshold=0.2)
    for i in range(batch):
        a, b = kept_rows(ours[i]), kept_rows(theirs[i])
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_multibox_detection_per_class_nms_and_layout(anchors):
    # Two classes predicted on the same place: per-class NMS keeps both.
    num_anchors = anchors.shape[1]
    cls_probs = torch.zeros(1, 3, num_anchors)
    cls_probs[0, 0] = 1.0
    cls_probs[0, :, 100] = torch.tensor([0.1, 0.9, 0.0])
    cls_probs[0, :, 101] = torch.tensor([0.2, 0.0, 0.8])
    offsets = torch.zeros(1, num_anchors * 4)
    out = H.multibox_detection(cls_probs, offsets, anchors)
    assert out.shape == (1, 2, 6)
    assert out[0, :, 0].tolist() == [0, 1] and out[0, :, 1].tolist() == pytest.approx([0.9, 0.8])
    torch.testing.assert_close(out[0, 0, 2:], anchors[0, 100])
    agnostic = H.multibox_detection(cls_probs, offsets, anchors, class_agnostic=True)
    iou = H.box_iou(anchors[0, 100:101], anchors[0, 101:102]).item()
    assert (agnostic[0, :, 0] >= 0).sum() == (1 if iou > 0.5 else 2)


def test_multibox_detection_pads_with_minus_one(anchors):
    num_anchors = anchors.shape[1]
    cls_probs = torch.zeros(2, 2, num_anchors)
    cls_probs[:, 0] = 1.0
    cls_probs[0, :, 7] = torch.tensor([0.05, 0.95])
    out = H.multibox_detection(cls_probs, torch.zeros(2, num_anchors * 4), anchors)
    assert out.shape == (2, 1, 6)
    assert out[0, 0, 0] == 0 and out[1, 0, 0] == -1
