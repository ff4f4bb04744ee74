"""Helpers for the TinySSD notebooks: Single Shot Multibox Detection from its parts.

Read it as a book. The sections follow the notebooks:

    0. Set-up: config, device, seed, fast mode     (every notebook)
    1. Prediction heads                            (01_predictors)
    2. Concatenating predictions across scales     (02_concatenation)
    3. Blocks                                      (03_blocks)
    4a. Boxes, anchors and IoU                     (04a_anchors)
    4b. Labelling anchors, offsets and NMS         (04b_labelling_and_nms)
    5. The TinySSD model                           (05_model)

Conventions used everywhere:

- A box is a row ``(xmin, ymin, xmax, ymax)`` ("corner" format). Anchors and
  labels are normalised to the image: 0..1 on both axes.
- A label row is ``(class_id, xmin, ymin, xmax, ymax)``. Rows with
  ``class_id == -1`` are padding (an image with fewer objects than the batch's
  widest image) and are ignored.
- Class 0 in ``cls_preds`` is the background; object class ``c`` is ``c + 1``.

There is no module-level state: the device, the config and the seed are passed
in explicitly.
"""

import dataclasses
import os
import random

import matplotlib.pyplot as plt
import numpy as np
import torch
import torchvision
from torch import nn

__all__ = [
    # 0. Set-up
    "SSDConfig", "fast_mode", "pick_device", "set_seed",
    # 1. Prediction heads
    "cls_predictor", "bbox_predictor",
    # 2. Concatenation
    "flatten_pred", "concat_preds",
    # 3. Blocks
    "down_sample_blk", "base_net", "get_blk",
    # 4a. Boxes, anchors and IoU
    "box_corner_to_center", "box_center_to_corner", "check_boxes",
    "multibox_prior", "box_iou", "bbox_to_rect", "show_bboxes",
    # 4b. Labelling anchors, offsets and NMS
    "offset_boxes", "offset_inverse", "assign_anchor_to_bbox", "match_anchors",
    "multibox_target", "nms", "multibox_detection",
    # 5. Model
    "blk_forward", "TinySSD",
]


# ---------------------------------------------------------------------------
# 0. Set-up: config, device, seed, fast mode (every notebook)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SSDConfig:
    """Everything that shapes a TinySSD. Introduced in 05_model.

    ``sizes[i]`` and ``ratios[i]`` are the anchor sizes (fractions of the image
    side) and aspect ratios (w/h) of scale ``i``; there is one entry per block.
    Each pixel of scale ``i`` gets ``len(sizes[i]) + len(ratios[i]) - 1`` anchors.
    """
    num_classes: int = 1
    sizes: tuple = ((0.2, 0.272), (0.37, 0.447), (0.54, 0.619),
                    (0.71, 0.79), (0.88, 0.961))
    ratios: tuple = ((1, 2, 0.5),) * 5

    @property
    def num_anchors(self):
        """Anchors per pixel, the same for every scale (checked in TinySSD)."""
        return len(self.sizes[0]) + len(self.ratios[0]) - 1


def fast_mode():
    """True when the test suite asks for short runs (env ``TINYSSD_FAST=1``).

    This is the one switch every long notebook consults; ``make test`` sets it.
    """
    return os.environ.get("TINYSSD_FAST", "0") not in ("", "0")


def pick_device(name=None):
    """Return a ``torch.device``: ``name`` if given, else CUDA, then MPS, then CPU."""
    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed=0):
    """Seed Python, NumPy and PyTorch so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# 1. Prediction heads (01_predictors)
# ---------------------------------------------------------------------------

def cls_predictor(num_inputs, num_anchors, num_classes):
    """3x3 conv that scores every anchor of every pixel. Introduced in 01_predictors.

    Input (batch, num_inputs, h, w) -> output
    (batch, num_anchors * (num_classes + 1), h, w); the +1 is the background.
    """
    return nn.Conv2d(num_inputs, num_anchors * (num_classes + 1),
                     kernel_size=3, padding=1)


def bbox_predictor(num_inputs, num_anchors):
    """3x3 conv that predicts 4 offsets per anchor. Introduced in 01_predictors.

    Input (batch, num_inputs, h, w) -> output (batch, num_anchors * 4, h, w).
    """
    return nn.Conv2d(num_inputs, num_anchors * 4, kernel_size=3, padding=1)


# ---------------------------------------------------------------------------
# 2. Concatenating predictions across scales (02_concatenation)
# ---------------------------------------------------------------------------

def flatten_pred(pred):
    """(batch, channels, h, w) -> (batch, h * w * channels). Introduced in 02_concatenation.

    Channels go last before flattening, so the predictions for one pixel (all
    its anchors) stay next to each other.
    """
    return torch.flatten(pred.permute(0, 2, 3, 1), start_dim=1)


def concat_preds(preds):
    """Flatten each scale's predictions and join them. Introduced in 02_concatenation.

    ``preds`` is a list of (batch, c_i, h_i, w_i) -> (batch, sum_i h_i * w_i * c_i).
    """
    return torch.cat([flatten_pred(p) for p in preds], dim=1)


# ---------------------------------------------------------------------------
# 3. Blocks (03_blocks)
# ---------------------------------------------------------------------------

def down_sample_blk(in_channels, out_channels):
    """Two (conv 3x3, batch norm, ReLU) then 2x2 max-pool. Introduced in 03_blocks.

    (batch, in_channels, h, w) -> (batch, out_channels, h // 2, w // 2).
    """
    layers = []
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                   nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def base_net():
    """Three down-sampling blocks, 3 -> 16 -> 32 -> 64 channels. Introduced in 03_blocks.

    (batch, 3, h, w) -> (batch, 64, h // 8, w // 8).
    """
    num_filters = [3, 16, 32, 64]
    return nn.Sequential(*[down_sample_blk(num_filters[i], num_filters[i + 1])
                           for i in range(len(num_filters) - 1)])


def get_blk(i):
    """Block ``i`` of TinySSD's five. Introduced in 03_blocks.

    0: base_net (3 -> 64 channels, /8); 1: 64 -> 128, /2; 2 and 3: 128 -> 128, /2;
    4: global max-pool to 1x1.
    """
    if i == 0:
        return base_net()
    if i == 1:
        return down_sample_blk(64, 128)
    if i == 4:
        return nn.AdaptiveMaxPool2d((1, 1))
    return down_sample_blk(128, 128)


# ---------------------------------------------------------------------------
# 4a. Boxes, anchors and IoU (04a_anchors)
# ---------------------------------------------------------------------------

def box_corner_to_center(boxes):
    """(..., 4) corner boxes (xmin, ymin, xmax, ymax) -> (..., 4) (cx, cy, w, h).

    Introduced in 04a_anchors.
    """
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_center_to_corner(boxes):
    """(..., 4) center boxes (cx, cy, w, h) -> (..., 4) (xmin, ymin, xmax, ymax).

    Introduced in 04a_anchors.
    """
    cx, cy, w, h = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def check_boxes(boxes, name="boxes"):
    """Raise ValueError unless ``boxes`` (..., 4) are finite with xmax > xmin, ymax > ymin.

    The message names the first bad row by its index. Introduced in 04a_anchors.
    """
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")
    if boxes.ndim == 1:
        boxes = boxes[None]
    problems = [(~torch.isfinite(boxes)).any(dim=-1), "is not finite (NaN or inf)",
                (boxes[..., 2] <= boxes[..., 0]), "has xmax <= xmin",
                (boxes[..., 3] <= boxes[..., 1]), "has ymax <= ymin"]
    for bad, what in zip(problems[::2], problems[1::2]):
        if bad.any():
            row = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{name} row {row} {what}: {boxes[row].tolist()}")


def multibox_prior(data, sizes, ratios):
    """Anchors centred on every pixel of ``data``'s feature map. Introduced in 04a_anchors.

    data: (batch, channels, h, w); only h and w are used.
    Returns (1, h * w * (len(sizes) + len(ratios) - 1), 4) normalised corner boxes.
    Each pixel gets the sizes with ratios[0], then sizes[0] with ratios[1:].
    Same arithmetic as d2l's version, so the anchors are bit-identical.
    """
    in_height, in_width = data.shape[-2:]
    device = data.device
    size_tensor = torch.tensor(sizes, device=device)
    ratio_tensor = torch.tensor(ratios, device=device)
    boxes_per_pixel = len(sizes) + len(ratios) - 1
    # Pixel centres, normalised: (row + 0.5) / h and (col + 0.5) / w
    center_h = (torch.arange(in_height, device=device) + 0.5) * (1.0 / in_height)
    center_w = (torch.arange(in_width, device=device) + 0.5) * (1.0 / in_width)
    shift_y, shift_x = torch.meshgrid(center_h, center_w, indexing="ij")
    shift_y, shift_x = shift_y.reshape(-1), shift_x.reshape(-1)  # (h * w,)
    # Widths and heights of the boxes_per_pixel shapes; w is scaled by h / w
    # so that a ratio-1 anchor is square in pixels on a non-square map.
    w = torch.cat((size_tensor * torch.sqrt(ratio_tensor[0]),
                   sizes[0] * torch.sqrt(ratio_tensor[1:]))) * in_height / in_width
    h = torch.cat((size_tensor / torch.sqrt(ratio_tensor[0]),
                   sizes[0] / torch.sqrt(ratio_tensor[1:])))
    half_sizes = torch.stack((-w, -h, w, h)).T.repeat(in_height * in_width, 1) / 2
    centers = torch.stack([shift_x, shift_y, shift_x, shift_y],
                          dim=1).repeat_interleave(boxes_per_pixel, dim=0)
    return (centers + half_sizes).unsqueeze(0)


def box_iou(boxes1, boxes2):
    """Pairwise intersection over union. Introduced in 04a_anchors.

    boxes1: (..., n, 4), boxes2: (..., m, 4), corner format; leading dims
    broadcast. Returns (..., n, m). For two plain lists this is d2l's
    ``box_iou`` to the bit, and it agrees with ``torchvision.ops.box_iou``.
    In-place arithmetic keeps it fast on big batches; it is not for autograd.
    """
    for boxes, name in ((boxes1, "boxes1"), (boxes2, "boxes2")):
        if boxes.ndim < 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{name} must have shape (..., n, 4), got {tuple(boxes.shape)}")
    # One contiguous tensor per coordinate: (..., n, 1) for boxes1, (..., 1, m) for boxes2
    x1, y1, x2, y2 = (boxes1[..., i].contiguous()[..., :, None] for i in range(4))
    u1, v1, u2, v2 = (boxes2[..., i].contiguous()[..., None, :] for i in range(4))
    area1, area2 = (x2 - x1) * (y2 - y1), (u2 - u1) * (v2 - v1)
    # One allocation for all (..., n, m) work: fresh big tensors cost page faults
    shape = torch.broadcast_shapes(x1.shape, u1.shape)
    inter, tmp, union = torch.empty((3, *shape), dtype=area1.dtype, device=area1.device)
    # The overlap's width times its height, 0 when the boxes are apart
    torch.minimum(x2, u2, out=inter).sub_(torch.maximum(x1, u1, out=tmp)).clamp_(min=0)
    torch.minimum(y2, v2, out=union).sub_(torch.maximum(y1, v1, out=tmp)).clamp_(min=0)
    inter.mul_(union)
    torch.add(area1, area2, out=union).sub_(inter)
    return inter.div_(union)


def bbox_to_rect(bbox, color):
    """A corner box (4,) in pixels -> a matplotlib Rectangle. Introduced in 04a_anchors."""
    bbox = [float(v) for v in bbox]
    return plt.Rectangle(xy=(bbox[0], bbox[1]), width=bbox[2] - bbox[0],
                         height=bbox[3] - bbox[1], fill=False, edgecolor=color, linewidth=2)


def show_bboxes(axes, bboxes, labels=None, colors=None):
    """Draw corner boxes (n, 4), in pixels, on matplotlib ``axes``. Introduced in 04a_anchors.

    ``labels`` and ``colors`` may be one value or a list; colours cycle.
    """
    if labels is not None and not isinstance(labels, (list, tuple)):
        labels = [labels]
    if colors is None:
        colors = ["b", "g", "r", "m", "c"]
    elif not isinstance(colors, (list, tuple)):
        colors = [colors]
    for i, bbox in enumerate(bboxes):
        color = colors[i % len(colors)]
        rect = bbox_to_rect(bbox, color)
        axes.add_patch(rect)
        if labels and len(labels) > i:
            axes.text(rect.xy[0], rect.xy[1], labels[i], va="center", ha="center",
                      fontsize=9, color="k" if color == "w" else "w",
                      bbox=dict(facecolor=color, lw=0))


# ---------------------------------------------------------------------------
# 4b. Labelling anchors, offsets and NMS (04b_labelling_and_nms)
# ---------------------------------------------------------------------------

def offset_boxes(anchors, assigned_bb, eps=1e-6):
    """Encode boxes as offsets from their anchors. Introduced in 04b_labelling_and_nms.

    anchors, assigned_bb: (..., 4) corner boxes that broadcast. Returns (..., 4):
    ``10 * (centre shift) / anchor size`` and ``5 * log(size ratio)``, the
    (10, 10, 5, 5) weights of d2l and torchvision's SSD.
    """
    c_anc = box_corner_to_center(anchors)
    c_assigned_bb = box_corner_to_center(assigned_bb)
    offset_xy = 10 * (c_assigned_bb[..., :2] - c_anc[..., :2]) / c_anc[..., 2:]
    offset_wh = 5 * torch.log(eps + c_assigned_bb[..., 2:] / c_anc[..., 2:])
    return torch.cat([offset_xy, offset_wh], dim=-1)


def offset_inverse(anchors, offset_preds):
    """Decode offsets (..., 4) back to corner boxes (..., 4); undoes ``offset_boxes``.

    Introduced in 04b_labelling_and_nms.
    """
    anc = box_corner_to_center(anchors)
    pred_bbox_xy = (offset_preds[..., :2] * anc[..., 2:] / 10) + anc[..., :2]
    pred_bbox_wh = torch.exp(offset_preds[..., 2:] / 5) * anc[..., 2:]
    return box_center_to_corner(torch.cat((pred_bbox_xy, pred_bbox_wh), dim=-1))


def _greedy_match(iou, anchors_bbox_map):
    """The one-to-one step of ``match_anchors``, on the whole batch at once.

    iou: (batch, num_gt, num_anchors), -1 for padding rows; changed in place.
    anchors_bbox_map: (batch, num_anchors), updated and returned.
    d2l repeats num_gt times: take the largest IoU left, give that anchor that
    box, cross out the anchor and the box. Here every box remembers its best
    free anchor, so a step looks at num_gt numbers per image instead of the whole
    matrix; only boxes whose best anchor was just taken look again.
    """
    batch, num_gt, num_anchors = iou.shape
    best_iou, best_anchor = iou.max(dim=2)  # (batch, num_gt); -1: padding or matched
    gt_ids = torch.arange(num_gt, device=iou.device)
    images = torch.arange(batch, device=iou.device)
    for _ in range(num_gt):
        # The largest IoU left; ties go to the lowest anchor, then the lowest box, as in d2l
        top = best_iou.max(dim=1, keepdim=True).values  # (batch, 1)
        key = torch.where(best_iou == top, best_anchor * num_gt + gt_ids, num_anchors * num_gt)
        key = key.min(dim=1).values  # (batch,)
        anchor, gt = key // num_gt, key % num_gt
        todo = top[:, 0] >= 0  # (batch,) images with a box still unmatched
        anchors_bbox_map[images[todo], anchor[todo]] = gt[todo]
        best_iou[images[todo], gt[todo]] = -1.0  # cross out the box ...
        iou[images[todo], :, anchor[todo]] = -1.0  # ... and the anchor
        # Boxes whose best anchor was just taken find their next best
        b, g = ((best_anchor == anchor[:, None]) & (best_iou >= 0) & todo[:, None]).nonzero(as_tuple=True)
        best_iou[b, g], best_anchor[b, g] = iou[b, g].max(dim=1)
    return anchors_bbox_map


def match_anchors(anchors, gt_boxes, gt_valid, iou_threshold=0.5):
    """Give each anchor the index of its ground-truth box, or -1 for background.

    Introduced in 04b_labelling_and_nms.
    anchors: (num_anchors, 4); gt_boxes: (batch, num_gt, 4); gt_valid: (batch, num_gt)
    bool, False for padding rows. Returns (batch, num_anchors) long.
    Rule (as d2l): an anchor whose best IoU is >= iou_threshold takes that box;
    then every box takes its best remaining anchor, greedily by IoU.
    """
    iou = box_iou(gt_boxes, anchors)  # (batch, num_gt, num_anchors): anchors last is faster
    iou[~gt_valid] = -1.0  # padding rows never match
    max_ious, indices = torch.max(iou, dim=1)  # (batch, num_anchors)
    anchors_bbox_map = torch.where(max_ious >= iou_threshold, indices, -1)
    return _greedy_match(iou, anchors_bbox_map)


def assign_anchor_to_bbox(ground_truth, anchors, device=None, iou_threshold=0.5):
    """One image, with the book's signature. Introduced in 04b_labelling_and_nms.

    ground_truth: (num_gt, 4); anchors: (num_anchors, 4) -> (num_anchors,) long.
    ``device`` is accepted for compatibility and ignored (inputs decide it).
    """
    valid = torch.ones(1, ground_truth.shape[0], dtype=torch.bool, device=anchors.device)
    return match_anchors(anchors, ground_truth[None], valid, iou_threshold)[0]


def multibox_target(anchors, labels, iou_threshold=0.5):
    """Training targets for every anchor. Introduced in 04b_labelling_and_nms.

    anchors: (1, num_anchors, 4). labels: (batch, num_gt, 5) rows
    (class_id, xmin, ymin, xmax, ymax), padded with class_id -1 rows.
    Returns (bbox_offset, bbox_mask, class_labels) shaped (batch, num_anchors * 4),
    (batch, num_anchors * 4) and (batch, num_anchors); class 0 is background.
    Vectorised over the batch; agrees with d2l on unpadded labels, and unlike
    d2l never matches an anchor to a padding row.
    """
    if labels.ndim != 3 or labels.shape[-1] != 5:
        raise ValueError(f"labels must have shape (batch, num_gt, 5), got {tuple(labels.shape)}")
    anchors = anchors.reshape(-1, 4)
    classes, gt_boxes = labels[..., 0], labels[..., 1:]
    if not torch.isfinite(classes).all():
        row = tuple((~torch.isfinite(classes)).nonzero()[0].tolist())
        raise ValueError(f"labels row {row} has a class id that is not finite")
    valid = classes >= 0  # (batch, num_gt); False for padding rows
    check_boxes(torch.where(valid[..., None], gt_boxes, anchors[0]), name="labels")
    anchors_bbox_map = match_anchors(anchors, gt_boxes, valid, iou_threshold)
    batch, num_anchors = anchors_bbox_map.shape
    image_ids, anchor_ids = (anchors_bbox_map >= 0).nonzero(as_tuple=True)  # positives only
    gt_ids = anchors_bbox_map[image_ids, anchor_ids]
    class_labels = torch.zeros(batch, num_anchors, dtype=torch.long, device=labels.device)
    class_labels[image_ids, anchor_ids] = classes[image_ids, gt_ids].long() + 1
    bbox_offset = torch.zeros(batch, num_anchors, 4, dtype=labels.dtype, device=labels.device)
    bbox_offset[image_ids, anchor_ids] = offset_boxes(anchors[anchor_ids], gt_boxes[image_ids, gt_ids])
    bbox_mask = (class_labels > 0)[..., None].to(labels.dtype).expand(-1, -1, 4)
    return bbox_offset.reshape(batch, -1), bbox_mask.reshape(batch, -1), class_labels


def nms(boxes, scores, iou_threshold):
    """Non-maximum suppression, written to be read. Introduced in 04b_labelling_and_nms.

    boxes: (n, 4), scores: (n,). Returns the indices of the kept boxes (k,),
    highest score first. Take the best box left, keep it, and drop the boxes that
    overlap it by IoU > iou_threshold; repeat. Same keep-set as
    ``torchvision.ops.nms``, which ``multibox_detection`` uses for speed.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while order.numel() > 0:
        best, rest = order[0], order[1:]
        keep.append(best)
        iou = box_iou(boxes[best][None], boxes[rest])[0]  # (len(rest),)
        order = rest[iou <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)


def multibox_detection(cls_probs, offset_preds, anchors, nms_threshold=0.5,
                       pos_threshold=0.009999999, *, class_agnostic=False,
                       pre_nms_top_k=400, max_detections=None):
    """Turn class probabilities and offsets into detections. Introduced in 04b_labelling_and_nms.

    cls_probs: (batch, num_classes + 1, num_anchors), row 0 the background;
    offset_preds: (batch, num_anchors * 4); anchors: (1, num_anchors, 4).
    Each anchor proposes its best non-background class. Per image, the
    ``pre_nms_top_k`` best proposals (None: all, as d2l) that score at least
    ``pos_threshold`` go through NMS per class (``class_agnostic``: per image),
    with ``torchvision.ops.batched_nms`` over the whole batch at once.
    Returns (batch, k, 6) rows (class_id, score, xmin, ymin, xmax, ymax), best
    first; rows past an image's detections have class_id -1, as in d2l.
    """
    batch, num_anchors = cls_probs.shape[0], cls_probs.shape[2]
    boxes = offset_inverse(anchors.reshape(-1, 4), offset_preds.reshape(batch, num_anchors, 4))
    scores, class_ids = torch.max(cls_probs[:, 1:], dim=1)  # (batch, num_anchors)
    if pre_nms_top_k is not None and pre_nms_top_k < num_anchors:
        scores, top = scores.topk(pre_nms_top_k, dim=1)  # (batch, k)
        class_ids = class_ids.gather(1, top)
        boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
    image_ids, ids = (scores >= pos_threshold).nonzero(as_tuple=True)  # candidates
    groups = image_ids if class_agnostic else image_ids * cls_probs.shape[1] + class_ids[image_ids, ids]
    kept = torchvision.ops.batched_nms(boxes[image_ids, ids], scores[image_ids, ids],
                                       groups, nms_threshold)  # best first
    kept = kept[torch.sort(image_ids[kept], stable=True).indices]  # by image, best first
    image_ids, ids = image_ids[kept], ids[kept]
    return _pack_detections(batch, image_ids, class_ids[image_ids, ids],
                            scores[image_ids, ids], boxes[image_ids, ids], max_detections)


def _pack_detections(batch, image_ids, class_ids, scores, boxes, max_detections=None):
    """Lay out n detections, grouped by image, as (batch, k, 6) with class -1 padding."""
    counts = torch.bincount(image_ids, minlength=batch)  # (batch,)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(image_ids), device=image_ids.device) - starts[image_ids]
    if max_detections is not None:
        keep = rank < max_detections
        image_ids, class_ids, scores, boxes, rank = (
            image_ids[keep], class_ids[keep], scores[keep], boxes[keep], rank[keep])
    k = int(rank.max()) + 1 if len(rank) else 0
    out = torch.zeros(batch, k, 6, dtype=boxes.dtype, device=boxes.device)
    out[..., 0] = -1
    out[image_ids, rank] = torch.cat(
        (class_ids[:, None].to(boxes.dtype), scores[:, None].to(boxes.dtype), boxes), dim=1)
    return out


# ---------------------------------------------------------------------------
# 5. The TinySSD model (05_model)
# ---------------------------------------------------------------------------

def blk_forward(X, blk, sizes, ratios, cls_predictor, bbox_predictor):
    """Run one block and its heads. Introduced in 05_model.

    X: (batch, c_in, h_in, w_in) -> (Y, anchors, cls_preds, bbox_preds) with
    Y (batch, c, h, w), anchors (1, h * w * num_anchors, 4),
    cls_preds (batch, num_anchors * (num_classes + 1), h, w) and
    bbox_preds (batch, num_anchors * 4, h, w).
    """
    Y = blk(X)
    anchors = multibox_prior(Y, sizes=sizes, ratios=ratios)
    return Y, anchors, cls_predictor(Y), bbox_predictor(Y)


class TinySSD(nn.Module):
    """Five blocks, each with a class head and a box head. Introduced in 05_model.

    ``TinySSD(SSDConfig(...))`` or, as in the book, ``TinySSD(num_classes=1)``:
    keyword arguments override fields of the config.
    Input (batch, 3, h, w) -> anchors (1, A, 4), cls_preds (batch, A, num_classes + 1),
    bbox_preds (batch, A * 4); A = 5444 for 256x256 inputs.
    """

    def __init__(self, config=None, **overrides):
        super().__init__()
        self.config = dataclasses.replace(config or SSDConfig(), **overrides)
        cfg = self.config
        if not len(cfg.sizes) == len(cfg.ratios) == 5:
            raise ValueError("TinySSD has 5 blocks: give 5 entries of sizes and of ratios")
        if len({len(s) + len(r) for s, r in zip(cfg.sizes, cfg.ratios)}) != 1:
            raise ValueError("every scale must have the same number of anchors per pixel")
        in_channels = [64, 128, 128, 128, 128]
        self.blks = nn.ModuleList([get_blk(i) for i in range(5)])
        self.cls_heads = nn.ModuleList([cls_predictor(c, cfg.num_anchors, cfg.num_classes)
                                        for c in in_channels])
        self.bbox_heads = nn.ModuleList([bbox_predictor(c, cfg.num_anchors) for c in in_channels])

    def forward(self, X):
        anchors, cls_preds, bbox_preds = [], [], []
        for blk, cls_head, bbox_head, sizes, ratios in zip(
                self.blks, self.cls_heads, self.bbox_heads, self.config.sizes, self.config.ratios):
            X, anc, cls, bbox = blk_forward(X, blk, sizes, ratios, cls_head, bbox_head)
            anchors.append(anc)
            cls_preds.append(cls)
            bbox_preds.append(bbox)
        anchors = torch.cat(anchors, dim=1)  # (1, A, 4)
        cls_preds = concat_preds(cls_preds)
        cls_preds = cls_preds.reshape(cls_preds.shape[0], -1, self.config.num_classes + 1)
        return anchors, cls_preds, concat_preds(bbox_preds)  # bbox_preds: (batch, A * 4)
