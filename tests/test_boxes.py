"""Anchors, IoU, offsets and box checks (notebooks 04a and 04b) against d2l and torchvision."""
import pytest
import torch
import torchvision
from d2l import torch as d2l

import ssd_helpers as H


@pytest.mark.parametrize("h, w", [(32, 32), (5, 7), (1, 1), (40, 24)])
@pytest.mark.parametrize("sizes, ratios", [([0.75, 0.5, 0.25], [1, 2, 0.5]),
                                           ([0.2, 0.272], [1, 2, 0.5]),
                                           ([0.4], [1, 3, 1 / 3, 2])])
def test_multibox_prior_is_identical_to_d2l(h, w, sizes, ratios):
    data = torch.zeros(1, 3, h, w)
    ours = H.multibox_prior(data, sizes, ratios)
    assert ours.shape == (1, h * w * (len(sizes) + len(ratios) - 1), 4)
    if h <= w:
        assert torch.equal(ours, d2l.multibox_prior(data, sizes, ratios))
    else:  # a tall map: the same centres, sizes measured against the width (the shorter side)
        reference = d2l.multibox_prior(data, sizes, ratios)
        torch.testing.assert_close(ours[..., :2] + ours[..., 2:],
                                   reference[..., :2] + reference[..., 2:])
        # in map pixels; ratios[0] is 1
        first = (ours[0, 0, 2:] - ours[0, 0, :2]) * torch.tensor([w, h])
        torch.testing.assert_close(first, torch.tensor([sizes[0] * w, sizes[0] * w]))


def random_boxes(generator, n, scale=1.0):
    xy = torch.rand(n, 2, generator=generator) * scale
    wh = torch.rand(n, 2, generator=generator) * scale * 0.5 + 1e-3
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("seed", range(5))
def test_box_iou_agrees_with_torchvision_and_d2l(seed):
    g = torch.Generator().manual_seed(seed)
    boxes1, boxes2 = random_boxes(g, 50), random_boxes(g, 70)
    ours = H.box_iou(boxes1, boxes2)
    torch.testing.assert_close(ours, torchvision.ops.box_iou(boxes1, boxes2))
    assert torch.equal(ours, d2l.box_iou(boxes1, boxes2))
    assert ((ours >= 0) & (ours <= 1)).all()


def test_box_iou_broadcasts_over_a_batch():
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(g, 30)
    gt = torch.stack([random_boxes(g, 4) for _ in range(3)])  # (3, 4, 4)
    batched = H.box_iou(gt, anchors)  # (3, 4, 30)
    for i in range(3):
        assert torch.equal(batched[i], H.box_iou(gt[i], anchors))


def test_box_iou_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        H.box_iou(torch.zeros(3, 5), torch.zeros(2, 4))


def test_corner_center_round_trip():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(g, 20)
    torch.testing.assert_close(H.box_center_to_corner(H.box_corner_to_center(boxes)), boxes)


@pytest.mark.parametrize("seed", range(3))
def test_offsets_encode_decode_round_trip(seed, anchors):
    g = torch.Generator().manual_seed(seed)
    anchors = anchors[0]
    boxes = random_boxes(g, anchors.shape[0], scale=0.8)
    offsets = H.offset_boxes(anchors, boxes)
    assert torch.equal(offsets, d2l.offset_boxes(anchors, boxes))
    torch.testing.assert_close(H.offset_inverse(anchors, offsets), boxes, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(H.offset_inverse(anchors, offsets),
                               d2l.offset_inverse(anchors, offsets))


@pytest.mark.parametrize("bad, message", [
    ([[0.5, 0.1, 0.4, 0.3]], "xmax <= xmin"),
    ([[0.1, 0.5, 0.4, 0.5]], "ymax <= ymin"),
    ([[0.1, float("nan"), 0.4, 0.5]], "not finite"),
    ([[0.1, 0.2, 0.4]], "shape"),
])
def test_check_boxes_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        H.check_boxes(torch.tensor(bad))


def test_check_boxes_names_the_row():
    boxes = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4]])
    with pytest.raises(ValueError, match=r"row \(1,\)"):
        H.check_boxes(boxes)
