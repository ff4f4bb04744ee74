"""Helpers for the TinySSD notebooks: Single Shot Multibox Detection from its parts.

Read it as a book. The sections follow the notebooks:

    0. Set-up: config, device, seed, fast mode     (every notebook)
    1. Prediction heads                            (01_predictors)
    2. Concatenating predictions across scales     (02_concatenation)
    3. Blocks                                      (03_blocks)
    4a. Boxes, anchors and IoU                     (04a_anchors)
    4b. Labelling anchors, offsets and NMS         (04b_labelling_and_nms)
    5. The TinySSD model                           (05_model)
    6. Data: an offline banana dataset, its loader (06_data)
    7. Training: losses, metrics, the loop         (07_training)
    8. Prediction: load_model and detect           (08_prediction)
    9. Evaluation: mean average precision          (09_evaluation)
    10. Improvements: augmentation, variants       (10_improvements)
    11. Your own data: readers, validation, shell  (11_your_own_data)
    12. Speed, ONNX export, torchvision's SSDlite  (12_speed_and_deployment)
    Appendix: how the synthetic images are drawn   (used by 06_data, not taught)

Conventions used everywhere:

- A box is a row ``(xmin, ymin, xmax, ymax)`` ("corner" format). Anchors and
  labels are normalised to the image: 0..1 on both axes.
- A label row is ``(class_id, xmin, ymin, xmax, ymax)``. Rows with
  ``class_id == -1`` are padding (an image with fewer objects than the batch's
  widest image) and are ignored.
- Class 0 in ``cls_preds`` is the background; object class ``c`` is ``c + 1``.

There is no module-level state: the device, the config and the seed are passed
in explicitly. One setting is process-wide by nature: train_ssd asks glibc to
keep freed memory (keep_freed_memory, 12_speed_and_deployment) unless its
TrainConfig says keep_freed_memory=False.

No section calls a helper that a later section defines; the appendix is the
exception. Where training needs something a later notebook teaches, it takes it
as an argument: train_ssd(val_data=..., evaluate=evaluate_map), and with
TrainConfig(augment=True), train_ssd(augment=ssd_batch_augmentation()).

Where to change what:

    to change ...            look at                                          section
    anchor sizes and ratios  SSDConfig.sizes and .ratios (its defaults)       0 (checked in 5)
    anchor matching          match_anchors, multibox_target                   4b
    a loss                   _CLASS_LOSSES or _BOX_LOSSES, calc_loss          7
    the training loop        TrainConfig, train_ssd, train_step               7
    decoding and NMS         multibox_detection, nms; ExportableDetector      4b; 12
    the AP metric            match_detections ... evaluate_map                9
    augmentation             ssd_augmentation, ssd_batch_augmentation         10
    a data format            a reader in _READERS, a writer in _WRITERS       11
    the shell commands       main                                             11
    ONNX export              ExportableDetector, export_onnx                  12
    the synthetic images     the appendix (render_scene, banana_sprite)       Appendix
    file ownership           _write_manifest, _why_not_ours                   Appendix
"""

import concurrent.futures
import contextlib
import copy
import ctypes
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import numbers
import os
import pathlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from xml.etree import ElementTree

import matplotlib.colors
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
import tqdm.auto
import tqdm.notebook
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    # 0. Set-up
    "SSDConfig", "ConfigError", "fast_mode", "pick_device", "set_seed", "progress_bar",
    "scratch_folder",
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
    # 6. Data
    "DATA_DIR", "generate_banana_detection", "generate_small_bananas",
    "generate_fruit_detection", "DatasetError", "image_to_uint8", "open_image", "check_images",
    "label_problems",
    "check_labels", "read_detection_folder", "DetectionDataset", "load_data_bananas",
    # 7. Training
    "TrainConfig", "IMAGENET_MEAN", "IMAGENET_STD", "default_config", "default_checkpoint",
    "hflip_batch", "hard_negative_mask", "focal_loss", "calc_loss", "batch_metrics",
    "cpu_has_native_bf16", "pick_precision", "pick_grad_scaler", "batch_part", "lr_at",
    "CheckpointError", "save_checkpoint", "read_checkpoint", "train_step", "keep_freed_memory",
    "train_ssd", "detect_images", "live_plot", "train_default_model",
    # 8. Prediction
    "load_model", "load_default_model", "to_image_tensor", "detect", "show_detections",
    # 9. Evaluation
    "match_detections", "precision_recall", "precision_envelope", "average_precision",
    "class_precision_recall", "ap_table", "mean_average_precision", "evaluate_map", "plot_pr_curve",
    # 10. Improvements
    "init_background_prior", "ssd_augmentation", "augment_sample", "augment_batch",
    "ssd_batch_augmentation", "show_augmented", "evaluate_splits", "train_variant",
    "for_bigger_input",
    # 11. Your own data
    "DetectionData", "read_dataset", "DatasetReport", "validate_dataset", "export_dataset",
    "draw_detections", "detect_folder", "main",
    # 12. Speed and deployment
    "fold_batch_norm", "ExportableDetector", "export_onnx", "detect_onnx", "detection_gaps",
    "latency_ms", "ssdlite_targets", "train_for_seconds", "detect_torchvision",
    # Appendix: how the synthetic images are drawn
    "BACKGROUND_FILES", "HELD_OUT_FILES", "banana_sprite", "orange_sprite", "load_backgrounds",
    "random_background", "render_scene", "make_test_scene", "build_atomically",
]


# ---------------------------------------------------------------------------
# 0. Set-up: config, device, seed, fast mode, progress bars (every notebook)
# ---------------------------------------------------------------------------

_MAX_CLASS_ID = 2**24  # larger class ids cannot be stored exactly in the float32 labels


class ConfigError(ValueError):
    """A setting out of range (a config field or an argument); the message names it and what it
    may be. Introduced in 05_model."""


def _is_number(value, low=-math.inf, high=math.inf, integer=False):
    """True if ``value`` is a finite number in [low, high] (an integer if asked). Bools are not
    numbers."""
    kind = numbers.Integral if integer else numbers.Real
    try:
        finite = math.isfinite(value)
    except (TypeError, OverflowError):  # not a number, or an integer too large for a float
        return False
    return (isinstance(value, kind) and not isinstance(value, bool) and finite
            and low <= value <= high)


def _check_fields(owner, values, rules):
    """Raise ConfigError for the first value that breaks its rule; rules: {name: (test, what it
    may be)}."""
    for name, (test, allowed) in rules.items():
        value = values[name]
        try:
            good = bool(test(value))
        # a value of the wrong kind, e.g. a string where a list belongs
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _numbers(values, low=-math.inf, low_open=False):
    """True if ``values`` is a non-empty sequence of finite numbers above low (or at it, unless
    low_open)."""
    return (isinstance(values, (list, tuple)) and len(values) > 0
            and all(_is_number(v, low) and not (low_open and v == low) for v in values))


def _class_names_ok(names, num_classes):
    """None, or num_classes distinct, non-empty strings."""
    return names is None or (isinstance(names, (list, tuple)) and len(names) == num_classes
                             and all(isinstance(n, str) and n.strip() for n in names)
                             and len(set(names)) == len(names))


@dataclasses.dataclass(frozen=True)
class SSDConfig:
    """Everything that shapes a TinySSD. Introduced in 05_model.

    ``sizes[i]`` and ``ratios[i]`` are the anchor sizes (fractions of the image
    side) and aspect ratios (w/h) of scale ``i``; there is one entry per block.
    A trained model's config is saved with its weights, so it can be rebuilt.
    Each pixel of scale ``i`` gets ``len(sizes[i]) + len(ratios[i]) - 1`` anchors.
    A value out of range raises ConfigError when the config is built.
    """
    num_classes: int = 1
    sizes: tuple = ((0.2, 0.272), (0.37, 0.447), (0.54, 0.619),
                    (0.71, 0.79), (0.88, 0.961))
    ratios: tuple = ((1, 2, 0.5),) * 5
    # Inputs are floats in 0..255 as in the book. With pixel_mean and pixel_std
    # (per RGB channel, same scale) the model standardises them itself first.
    pixel_mean: tuple | None = None
    pixel_std: tuple | None = None
    # Names of the classes, in id order, saved with the model (11_your_own_data).
    class_names: tuple | None = None
    # 2: the first convolution has stride 2 and the first block no pool (down_sample_blk): the same
    # feature-map sizes from block 1 on, less work (default_config's; 12_speed_and_deployment). 1 is
    # the book's.
    first_stride: int = 1

    def __post_init__(self):
        n = self.num_classes
        _check_fields("SSDConfig", vars(self), {
            "num_classes": (lambda v: _is_number(v, 1, _MAX_CLASS_ID, integer=True),
                            f"an integer 1..{_MAX_CLASS_ID}"),
            "sizes": (lambda v: all(_numbers(s, 0, low_open=True) for s in v) and len(v) > 0,
                      "one sequence of anchor sizes > 0 per block"),
            "ratios": (lambda v: all(_numbers(r, 0, low_open=True) for r in v) and len(v) > 0,
                       "one sequence of aspect ratios > 0 per block"),
            "pixel_mean": (lambda v: v is None or (_numbers(v) and len(v) == 3),
                           "None or 3 finite numbers"),
            "pixel_std": (lambda v: v is None or (_numbers(v, 0, low_open=True) and len(v) == 3),
                          "None or 3 numbers > 0"),
            "class_names": (lambda v: _class_names_ok(v, n),
                            f"None or {n} distinct, non-empty strings"),
            "first_stride": (lambda v: _is_number(v, 1, 2, integer=True),
                             "1 (the book's) or 2"),
        })

    @property
    def num_anchors(self):
        """Anchors per pixel, the same for every scale (checked in TinySSD)."""
        return len(self.sizes[0]) + len(self.ratios[0]) - 1


def fast_mode():
    """True when the test suite asks for short runs (env ``TINYSSD_FAST=1``). Introduced in
    07_training.

    This is the one switch every long notebook consults; ``make test`` sets it.
    """
    return os.environ.get("TINYSSD_FAST", "0") not in ("", "0")


def pick_device(name=None):
    """Return a ``torch.device``: ``name`` if given, else CUDA, then MPS, then CPU. Introduced in
    07_training."""
    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed=0):
    """Seed Python, NumPy and PyTorch so that a run can be repeated. Introduced in 01_predictors."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _NotebookBar(tqdm.notebook.tqdm):
    """tqdm's notebook bar, shown with a display id so that closing it also updates the stored
    text (what GitHub and nbviewer show without the widget): the final count, not 0%."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, display=False, **kwargs)
        self._shown = None
        if not self.disable:
            from IPython.display import display
            self._shown = display(self.container, display_id=True)

    def close(self):
        super().close()
        if getattr(self, "_shown", None) is not None:
            self._shown.update(self.container)
            self._shown = None


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (same arguments): a widget in a notebook, whose stored text ends at its
    final state; text in a terminal. Every long loop of the series uses it, from 06_data on."""
    in_notebook = issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm)
    return (_NotebookBar if in_notebook else tqdm.auto.tqdm)(iterable, **kwargs)


def scratch_folder(path, remove=False):
    """An empty folder a notebook may fill and later delete; returns its Path. Introduced in
    06_data.

    The folder's manifest (_MANIFEST_FILE) records that the series made it for a notebook's scratch
    work, so all of it is the notebook's: keep nothing of yours there. An existing folder is emptied
    only if it has that record; a folder without it is the user's, and FileExistsError leaves it
    alone.
    ``remove=True`` deletes the folder (record required) instead.
    """
    path = pathlib.Path(path)
    if path.exists() or path.is_symlink():
        manifest = _read_manifest(path)
        if manifest is None or manifest.get("kind") != "scratch":
            raise FileExistsError(f"{path} exists and was not made by scratch_folder; "
                                  "nothing was deleted. Move it away or choose another folder.")
        shutil.rmtree(path)
    if not remove:
        path.mkdir(parents=True)
        _write_manifest(path, "scratch", files=None)
    return path


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

def down_sample_blk(in_channels, out_channels, stride=1):
    """Two (conv 3x3, batch norm, ReLU) then 2x2 max-pool. Introduced in 03_blocks.

    (batch, in_channels, h, w) -> (batch, out_channels, h // 2, w // 2).
    stride=2 (12_speed_and_deployment): the first convolution halves the size
    instead, and there is no pool, so no feature map of the input's size is made
    (an odd side becomes (h + 1) // 2).
    """
    layers = []
    for i in range(2):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1,
                             stride=stride if i == 0 else 1),
                   nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    if stride == 1:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def base_net(first_stride=1):
    """Three down-sampling blocks, 3 -> 16 -> 32 -> 64 channels. Introduced in 03_blocks.

    (batch, 3, h, w) -> (batch, 64, h // 8, w // 8). first_stride: the first block's stride
    (down_sample_blk).
    """
    num_filters = [3, 16, 32, 64]
    return nn.Sequential(*[down_sample_blk(num_filters[i], num_filters[i + 1],
                                           first_stride if i == 0 else 1)
                           for i in range(len(num_filters) - 1)])


def get_blk(i, first_stride=1):
    """Block ``i`` of TinySSD's five. Introduced in 03_blocks.

    0: base_net (3 -> 64 channels, /8); 1: 64 -> 128, /2; 2 and 3: 128 -> 128, /2;
    4: global max-pool to 1x1. first_stride: passed to base_net.
    """
    if i == 0:
        return base_net(first_stride)
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
    Sizes are fractions of the map's shorter side. On square and wide maps that
    is the height, and the anchors are bit-identical to d2l's; on a tall map
    d2l still measures against the height, which would make every anchor too
    large for a portrait photo (08_prediction runs the model on one).
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
    # Widths and heights of the boxes_per_pixel shapes, as fractions of the map's
    # width and height, scaled so that a ratio-1 anchor is square in pixels.
    w = torch.cat((size_tensor * torch.sqrt(ratio_tensor[0]),
                   sizes[0] * torch.sqrt(ratio_tensor[1:])))
    h = torch.cat((size_tensor / torch.sqrt(ratio_tensor[0]),
                   sizes[0] / torch.sqrt(ratio_tensor[1:])))
    # min() without an if, so torch.export (12) keeps every shape
    short = torch.sym_min(in_height, in_width)
    # on square and wide maps: d2l's w * h / w, and h
    w, h = w * short / in_width, h * short / in_height
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


def _is_light(color):
    """True for a matplotlib colour ("y", "#ffdc00", ...) bright enough to carry black text."""
    red, green, blue = matplotlib.colors.to_rgb(color)
    return 0.299 * red + 0.587 * green + 0.114 * blue > 0.5


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
        # above the box's top-left corner, or just inside at the image's top edge
        if labels and len(labels) > i:
            top = min(axes.get_ylim())
            inside = rect.xy[1] - top < 0.06 * abs(axes.get_ylim()[1] - axes.get_ylim()[0])
            axes.text(rect.xy[0], rect.xy[1], labels[i], va="top" if inside else "bottom",
                      ha="left", fontsize=8, color="k" if _is_light(color) else "w",
                      bbox=dict(facecolor=color, lw=0, pad=1.5, alpha=0.85))


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
        b, g = ((best_anchor == anchor[:, None]) & (best_iou >= 0)
                & todo[:, None]).nonzero(as_tuple=True)
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
    bbox_offset[image_ids, anchor_ids] = offset_boxes(anchors[anchor_ids],
                                                      gt_boxes[image_ids, gt_ids])
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
    groups = (image_ids if class_agnostic
              else image_ids * cls_probs.shape[1] + class_ids[image_ids, ids])
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


def _check_ssd_config(cfg):
    """Raise ConfigError for an SSDConfig TinySSD cannot be built from (its fields are checked when
    built). Returns cfg."""
    if not len(cfg.sizes) == len(cfg.ratios) == 5:
        raise ConfigError("TinySSD has 5 blocks: give 5 entries of sizes and of ratios")
    if len({len(s) + len(r) for s, r in zip(cfg.sizes, cfg.ratios)}) != 1:
        raise ConfigError("every scale must have the same number of anchors per pixel")
    if (cfg.pixel_mean is None) != (cfg.pixel_std is None):
        raise ConfigError("give both pixel_mean and pixel_std, or neither")
    return cfg


class TinySSD(nn.Module):
    """Five blocks, each with a class head and a box head. Introduced in 05_model.

    ``TinySSD(SSDConfig(...))`` or, as in the book, ``TinySSD(num_classes=1)``:
    keyword arguments override fields of the config.
    Input (batch, 3, h, w) -> anchors (1, A, 4), cls_preds (batch, A, num_classes + 1),
    bbox_preds (batch, A * 4); A = 5444 for 256x256 inputs.
    """

    def __init__(self, config=None, **overrides):
        super().__init__()
        self.config = cfg = _check_ssd_config(
            dataclasses.replace(config or SSDConfig(), **overrides))
        in_channels = [64, 128, 128, 128, 128]
        self.blks = nn.ModuleList([get_blk(i, cfg.first_stride) for i in range(5)])
        self.cls_heads = nn.ModuleList([cls_predictor(c, cfg.num_anchors, cfg.num_classes)
                                        for c in in_channels])
        self.bbox_heads = nn.ModuleList([bbox_predictor(c, cfg.num_anchors) for c in in_channels])
        if cfg.pixel_mean is not None:  # buffers follow .to(device) but are not saved
            self.register_buffer("pixel_mean",
                                 torch.tensor(cfg.pixel_mean).reshape(1, 3, 1, 1), False)
            self.register_buffer("pixel_std",
                                 torch.tensor(cfg.pixel_std).reshape(1, 3, 1, 1), False)

    def forward(self, X):
        if self.config.pixel_mean is not None:
            X = (X - self.pixel_mean) / self.pixel_std
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


# ---------------------------------------------------------------------------
# 6. Data: a banana dataset made offline, and its loader (06_data)
# ---------------------------------------------------------------------------
#
# The datasets are drawn offline: fruit sprites pasted on photos that ship inside scikit-image
# (the appendix draws them). Label files hold integer pixel boxes with an exclusive upper end
# (d2l's convention); the loader divides them by the image size.

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"  # git-ignored cache
_CSV_HEADER = ("img_name", "label", "xmin", "ymin", "xmax", "ymax")  # d2l's label.csv


# 6a. Making the datasets (how the images are drawn is in the appendix)

def generate_banana_detection(root=None, seed=0,
                              num_train=1000, num_val=100, progress=None):
    """Write a d2l-style banana-detection dataset; returns root (Path). Introduced in 06_data.

    Layout: root/bananas_train/images/{0..num_train-1}.png, root/
    bananas_train/label.csv and the same for bananas_val. Images are RGB
    256x256 PNGs with exactly one banana (box sides 34..73 px). label.csv
    has the header img_name,label,xmin,ymin,xmax,ymax and one row per
    image, e.g. "0.png,0,104,20,143,58": label is always 0, coordinates
    are integer pixels with exclusive xmax/ymax. Same seed -> same bytes.
    A finished dataset (its manifest matches) is reused at once.
    progress: None, True (tqdm bar) or f(done, total).
    """
    root = DATA_DIR / "banana-detection" if root is None else root
    return _generate_detection_dataset(root, "bananas", _banana_scene, seed,
                                      num_train, num_val, progress, "bananas")


def generate_small_bananas(root=None, seed=0,
                           num_train=1000, num_val=100, progress=None):
    """Like generate_banana_detection, but the banana boxes are asked to be only 15..30 px per side
    (a harder split; the tight box of a rotated sprite can come out a pixel smaller); same layout,
    folder names and CSV. Introduced in 06_data."""
    scene = functools.partial(_banana_scene, side_range=_SMALL_BANANA_BOX)
    root = DATA_DIR / "banana-detection-small" if root is None else root
    return _generate_detection_dataset(root, "bananas", scene, seed, num_train,
                                      num_val, progress, "small-bananas")


def generate_fruit_detection(root=None, seed=0,
                             num_train=1000, num_val=100, progress=None):
    """Write a multi-object dataset (bananas = class 0, oranges = class 1). Introduced in 06_data.

    Layout: root/fruit_train/images/N.png + root/fruit_train/label.csv,
    same for fruit_val. Each image holds 0..6 objects, which may occlude
    each other (boxes are tight around the VISIBLE pixels). label.csv has
    the header img_name,label,xmin,ymin,xmax,ymax and one row PER OBJECT,
    so several rows can share an img_name; an image without objects gets
    a single row with the five other fields empty, e.g. "7.png,,,,,".
    """
    root = DATA_DIR / "fruit-detection" if root is None else root
    return _generate_detection_dataset(root, "fruit", _fruit_scene, seed,
                                      num_train, num_val, progress, "fruit")


# 6b. Checking what a user gives us: one set of rules for the reader, the
# training loop and detect. Each message says what was found, where, and what
# to do about it.

class DatasetError(ValueError):
    """Bad input data: a file, a CSV row, an image or a label. Introduced in 06_data.

    The message names where (file and row, or image index) and what to do.
    """


def _exists(path):
    """path.exists(), but False for a path the system cannot look up (a name too long, a NUL)."""
    try:
        return pathlib.Path(path).exists()
    except (OSError, ValueError):
        return False


_EXIF_ORIENTATION = 0x0112  # the EXIF tag that tells a viewer to rotate or mirror a photo


def _pil_pixels(image, where):
    """A PIL image's pixels as a numpy array (H, W) or (H, W, C); the dtype tells the range.

    16-bit modes stay uint16, float mode "F" stays float32, modes with
    transparency become RGBA, everything else (CMYK, palette, grey, ...) RGB.
    """
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":  # 32-bit integers; 16-bit grey PNGs open in this mode
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise DatasetError(f"{where}: 32-bit integer image with values "
                               f"{pixels.min()}..{pixels.max()}; expected 16-bit values 0..65535. "
                               "Save it as an 8-bit RGB image.")
        return pixels.astype(np.uint16)
    if image.mode == "F":
        return np.asarray(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _channels_last(array, layout, where):
    """An (H, W, C) view of an image array, C in 1..4; layout "HWC" (numpy) or "CHW" (torch)."""
    shape = tuple(array.shape)
    if array.ndim == 4 and shape[0] == 1:  # a batch of one
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if first and last:
            raise DatasetError(f"{where}: cannot tell the channels of an image of shape {shape}: "
                               "both its first and last sides could be channels. Pass an image "
                               "at least 5 pixels on each side")
        if layout == "HWC" and last:
            return array
        if layout == "CHW" and first:
            return array.transpose(1, 2, 0)
        if layout == "HWC" and first:
            raise DatasetError(f"{where}: a numpy array of shape {shape} looks channels-first "
                               "(C, H, W), but numpy images are (H, W, C) as PIL and matplotlib "
                               "use: pass array.transpose(1, 2, 0), or a torch tensor (C, H, W)")
        if layout == "CHW" and last:
            raise DatasetError(f"{where}: a tensor of shape {shape} looks channels-last (H, W, C), "
                               "but torch images are (C, H, W): pass image.permute(2, 0, 1)")
    raise DatasetError(f"{where}: expected an image (H, W), or (H, W, C) as a numpy array, "
                       "or (C, H, W) as a tensor, with C = 1, 2, 3 or 4 channels; "
                       f"got shape {shape}")


def _pixel_values(array, where):
    """Pixel values as float32 in 0..255, by the series' conventions; refuses what is ambiguous.

    uint8: 0..255. uint16: 0..65535 (a 16-bit image). Other integers: 0..255.
    Floats: 0..255, as the model takes them (floats all within 0..1 are refused).
    """
    dtype = array.dtype
    if dtype == np.uint16:
        return array.astype(np.float32) * (255 / 65535)
    if dtype.kind not in ("u", "i", "f"):
        raise DatasetError(f"{where}: pixel values of type {dtype} are not an image; expected "
                           "uint8, uint16, another integer type in 0..255, or floats in 0..255")
    values = array.astype(np.float32)
    if values.size == 0:
        raise DatasetError(f"{where}: the image is empty (shape {tuple(array.shape)})")
    if not np.isfinite(values).all():
        raise DatasetError(f"{where}: {int((~np.isfinite(values)).sum())} pixel values are NaN "
                           "or infinite; fix the image or leave it out")
    low, high = float(values.min()), float(values.max())
    if low < -1e-3 or high > 255 + 1e-3:
        raise DatasetError(f"{where}: {dtype} pixel values run {low:g}..{high:g}, outside 0..255. "
                           "Scale them to 0..255 (uint16 images are read as 0..65535)")
    if dtype.kind == "f" and high <= 1:
        raise DatasetError(f"{where}: every pixel value is within 0..1 (max {high:.3g}). "
                           "This series reads float images as 0..255, as the model takes them, "
                           "so this one would be black. For a 0..1 image (matplotlib's imread, "
                           "torchvision's to_dtype) pass image * 255")
    return values


def image_to_uint8(image, where="image"):
    """A PIL image, numpy array or tensor -> uint8 (3, H, W) RGB. Introduced in 06_data; detect uses
    it (08).

    Conventions (anything else raises DatasetError saying what was expected):
    - numpy arrays are (H, W) or (H, W, C), channels last as PIL and matplotlib
      use; tensors are (H, W), (C, H, W) or (1, C, H, W), channels first as
      torch uses. C is 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA).
    - values: uint8 0..255, uint16 0..65535, other integers 0..255, floats
      0..255 like the model's input. Floats all within 0..1 are ambiguous
      (a 0..1 image, or a black one) and refused; so are NaN and inf.
    - PIL images are turned upright by their EXIF orientation, as a photo
      viewer shows them. Transparent pixels become white.
    """
    if isinstance(image, Image.Image):
        pixels = _pil_pixels(ImageOps.exif_transpose(image), where)  # (H, W) or (H, W, C): known
        pixels, layout = (pixels[..., None] if pixels.ndim == 2 else pixels), "PIL"
    elif isinstance(image, np.ndarray):
        pixels, layout = image, "HWC"
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        pixels = (image.float() if image.dtype in (torch.bfloat16, torch.float16)
                  else image).numpy()
        layout = "CHW"
    else:
        raise DatasetError(f"{where}: expected a file path, a PIL image, a numpy array or a "
                           f"tensor, got {type(image).__name__}")
    pixels = pixels if layout == "PIL" else _channels_last(pixels, layout, where)  # (H, W, C)
    if pixels.dtype == np.uint8 and pixels.shape[-1] == 3:
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    values = _pixel_values(pixels, where)
    if values.shape[-1] in (2, 4):  # composite over white
        alpha = values[..., -1:] / 255
        values = values[..., :-1] * alpha + 255 * (1 - alpha)
    values = np.broadcast_to(values, (*values.shape[:2], 3))
    return torch.from_numpy(
        np.ascontiguousarray(values.round().clip(0, 255).astype(np.uint8).transpose(2, 0, 1)))


def open_image(path, where="image", exif="apply"):
    """An image file -> uint8 (3, H, W) RGB, read by ``image_to_uint8``'s rules. Introduced in
    06_data.

    exif="apply" turns a photo upright by its EXIF orientation (for detect);
    exif="refuse" raises DatasetError for a photo that has one (for the dataset
    reader: its boxes may have been drawn on either the stored or the turned pixels).
    """
    path = pathlib.Path(path)
    if not (_exists(path) and path.is_file()):
        what = "is a folder, not an image" if _exists(path) else "is missing"
        raise DatasetError(f"{where}: image file {path} {what}")
    try:
        with Image.open(path) as image:
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            if exif == "refuse" and orientation not in (None, 1):
                raise DatasetError(
                    f"{where}: image {path} carries EXIF orientation {orientation}, so viewers "
                    "show it turned or mirrored, and its boxes may have been drawn on either "
                    "version. Save it with the turn applied (PIL.ImageOps.exif_transpose) and "
                    "check its boxes on the saved image.")
            return image_to_uint8(image, f"{where}: image {path}")
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{where}: cannot decode image {path}: {error}") from None


def _first_bad(mask, what, values, where, ids, advice):
    """Raise DatasetError for the first True of mask (N,) or (N, G), naming image (and row)."""
    if not mask.any():
        return
    index = mask.nonzero()[0].tolist()
    image = ids[index[0]] if ids is not None else index[0]
    place = f"image {image}" + (f", row {index[1]}" if len(index) > 1 else "")
    shown = values[tuple(index)].tolist()
    others = int(mask.sum()) - 1
    more = f" ({others} more like it)" if others else ""
    raise DatasetError(f"{where} {place}: {what}: {shown}{more}. {advice}")


def check_images(images, where="images", ids=None):
    """Raise DatasetError unless images (N, 3, H, W) are uint8, or floats in 0..255 without NaN.

    Introduced in 06_data; train_step and train_ssd call it. ``ids`` names the
    N images in messages (default 0..N-1, their index in ``images``).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DatasetError(f"{where}: expected images (N, 3, H, W), "
                           f"got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise DatasetError(f"{where}: expected uint8 images (as read_detection_folder returns) "
                           f"or floats in 0..255, got {images.dtype}")
    flat = images.detach().flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    _first_bad(~finite, "pixel values are NaN or infinite",
               (~torch.isfinite(flat)).sum(1), where, ids,
               "The value shown is the number of such pixels: fix the image or leave it out.")
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    _first_bad((low < -1e-3) | (high > 255 + 1e-3),
               "pixel values outside 0..255 (the maximum shown)",
               high, where, ids, "Images are uint8, or floats in 0..255.")
    if high.max() <= 1:
        raise DatasetError(f"{where}: every pixel value is within 0..1. Images here are uint8, "
                           "or floats in 0..255 as the model takes them; for 0..1 images pass "
                           "(images * 255).round().to(torch.uint8)")


def _numbers_text(values):
    """[10, 20.5, 30, 40] as a user wrote them, without float noise."""
    return "[" + ", ".join(f"{v:g}" if isinstance(v, (int, float)) else repr(v)
                           for v in values) + "]"


def label_problems(label, box, size=None, classes=None, normalised=False, written=None, earlier=()):
    """Every problem of one labelled box, as (problem, what to do) pairs; [] if it is valid.

    Introduced in 06_data. The one rule set at the boundary: the d2l, VOC, COCO
    and CSV readers, validate_dataset and check_labels (so train_ssd) all call it.
    Readers raise at the first problem; validate_dataset lists them all.
    label: a class id (a number) or a class name (str); None or "" if the box has none.
    box: (xmin, ymin, xmax, ymax) in pixels with an exclusive max, or in 0..1 with
    normalised=True. size: (width, height) of the image in pixels, None if unknown.
    classes: None, the number of classes, or the class names in id order.
    written: the numbers as the file holds them, shown in messages (default: box).
    earlier: (class, box) pairs already read for the same image; a repeat is a problem.
    """
    found = _class_problems(label, classes)
    shown = _numbers_text(box if written is None else written)
    if not all(math.isfinite(v) for v in box):
        return found + [(f"box {shown} is not finite", "write four finite numbers")]
    xmin, ymin, xmax, ymax = box
    if normalised and (min(box) < -1e-3 or max(box) > 1 + 1e-3):
        fix = ("they look like pixels: divide x by the image width and y by its height "
               "(read_detection_folder does)" if max(box) > 1 + 1e-3
               else "clip the box to the image")
        return found + [(f"box {shown} is not normalised to 0..1", fix)]
    if (not normalised and all(0 <= v <= 1 for v in (written or box))
            and (size is None or max(size) > 2)):
        width, height = size or ("W", "H")
        return found + [(f"box {shown} looks normalised (0..1), but pixels are expected",
                         f"multiply x by the image width ({width}) and y by its height ({height})")]
    if xmax <= xmin or ymax <= ymin:
        return found + [(f"box {shown} is empty or inverted", "need xmax > xmin and ymax > ymin")]
    if not normalised and (xmax - xmin < 1 or ymax - ymin < 1):
        found.append((f"box {shown} is less than one pixel wide or high", "fix or remove it"))
    if size is not None and not normalised and (xmin < 0 or ymin < 0 or xmax > size[0]
                                                or ymax > size[1]):
        read = "" if written is None or list(written) == list(box) else \
            f" (read as {_numbers_text(box)} in 0-based pixels with an exclusive max)"
        found.append((f"box {shown}{read} lies outside the {size[0]}x{size[1]} image",
                      "clip it to the image or fix it"))
    if any(other == (label, list(box)) for other in earlier):
        found.append((f"duplicate box {shown}: the same class and box twice in this image",
                      "remove one of the two"))
    return found


def _class_problems(label, classes):
    """The problems of a class label (see label_problems)."""
    if label is None or (isinstance(label, str) and not label.strip()):
        return [("the box has no class", "write its class")]
    if isinstance(label, str):
        if isinstance(classes, (list, tuple)) and label not in classes:
            return [(f"unknown class name {label!r} (known: {', '.join(map(str, classes))})",
                     "fix the name, or list every class in class_names")]
        return []
    if not math.isfinite(label) or label < 0 or label != int(label) or label >= _MAX_CLASS_ID:
        return [(f"class id {label:g} is not an integer >= 0 (and below {_MAX_CLASS_ID})",
                 "fix the class id")]
    count = len(classes) if isinstance(classes, (list, tuple)) else classes
    if count is not None and label >= count:
        return [(f"class id {int(label)} is out of range for {count} classes (ids 0..{count - 1})",
                 "fix the label, or use a model with more classes (TinySSD(num_classes=...))")]
    return []


def check_labels(labels, num_classes=None, where="labels", ids=None):
    """Raise DatasetError unless labels (N, G, 5) are valid, normalised SSD labels. Introduced in
    06_data.

    Each row is (class, xmin, ymin, xmax, ymax): class an integer in
    0..num_classes-1 (-1: a padding row, ignored), coordinates finite and
    normalised to 0..1, with xmax > xmin and ymax > ymin: label_problems'
    rules for normalised boxes. ``ids`` names the N images (default 0..N-1).
    """
    if labels.ndim != 3 or labels.shape[-1] != 5:
        raise DatasetError(f"{where}: expected labels (N, G, 5) of rows "
                           f"(class, xmin, ymin, xmax, ymax), got shape {tuple(labels.shape)}")
    rows = labels.detach().cpu().double()
    real = (rows[..., 0] != -1).nonzero().tolist()  # [(image, row)]; class -1 rows are padding
    values = rows.tolist()
    bad = [(i, j, label_problems(values[i][j][0], values[i][j][1:], classes=num_classes,
                                 normalised=True))
           for i, j in real]
    bad = [(i, j, problems) for i, j, problems in bad if problems]
    if bad:
        i, j, problems = bad[0]
        more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
        problem, fix = problems[0]
        raise DatasetError(f"{where} image {ids[i] if ids is not None else i}, row {j}: "
                           f"{problem}{more}: "
                           f"{_numbers_text(rows[i, j].tolist())}. {fix[0].upper() + fix[1:]}.")


# 6c. Reading d2l's on-disk format back, with clear errors

def _csv_text(csv_path):
    """The text of a CSV (or other text) file: UTF-8, with or without the BOM Excel writes; else
    DatasetError."""
    try:
        raw = pathlib.Path(csv_path).read_bytes()
    except OSError as error:
        raise DatasetError(f"{csv_path}: cannot read it ({error.strerror or error})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{csv_path} is UTF-16 text (Excel's 'Unicode Text'): "
                           "save it as 'CSV UTF-8'")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        row = raw[:error.start].count(b"\n") + 1
        raise DatasetError(f"{csv_path} row {row}: byte {raw[error.start]:#04x} is not UTF-8 "
                           "(the file may be Latin-1 or Windows-1252). Save it as UTF-8 "
                           "(in Excel: 'CSV UTF-8')") from None


def _csv_table(csv_path, header):
    """The rows of a CSV file that must start with ``header``: [(row number, [fields, stripped])].

    Row numbers are the file's line numbers, the header being row 1, as a
    spreadsheet counts them. Blank rows are skipped. A wrong header, a stray
    quote or a NUL byte raises DatasetError naming the file and the row.
    """
    reader = csv.reader(io.StringIO(_csv_text(csv_path), newline=""))
    rows, start = [], 1
    try:
        first = next(reader, None)
        if first is None or [field.strip() for field in first] != list(header):
            hint = next((f" (the file seems to separate fields with {sep!r}: use ',')"
                         for sep in (";", "\t")
                         if first and len(first) == 1 and sep in first[0]), "")
            raise DatasetError(f"{csv_path}: the header (row 1) must be {','.join(header)}, got "
                               f"{','.join(first) if first else 'an empty file'}{hint}")
        start = reader.line_num + 1
        for fields in reader:
            if any("\n" in field or "\r" in field for field in fields):
                raise csv.Error("a quoted field runs over several lines")
            if any(field.strip() for field in fields):
                rows.append((start, [field.strip() for field in fields]))
            start = reader.line_num + 1
    except csv.Error as error:
        raise DatasetError(f"{csv_path} row {start}: {_csv_error_text(error)}") from None
    return rows


def _csv_error_text(error):
    """What a csv.Error means for a user, and what to do."""
    text = str(error)
    if "field limit" in text or "several lines" in text or "EOF" in text:
        return ('a field there starts with a double quote (") that is not closed on its row, '
                'so the rows after it read as part of one field. Remove the stray quote, '
                'or put the whole field in quotes and write each quote inside it as ""')
    if "NUL" in text:
        return "it holds a NUL byte, so it is not CSV text. Save it as 'CSV UTF-8'"
    return f"not valid CSV ({text})"


def _number_fields(fields):
    """Floats from strings, or None if any is not a number ("", "abc", "640px")."""
    try:
        return [float(field) for field in fields]
    except (TypeError, ValueError):
        return None


def _read_label_csv(csv_path):
    """Rows of a label.csv as (row number, img_name, label or None, box or None).

    A row with the five fields after img_name all empty is an image without
    objects; a box without a class gets the label None (label_problems refuses it).
    """
    rows = []
    for row_number, fields in _csv_table(csv_path, _CSV_HEADER):
        where = f"{csv_path} row {row_number}"
        if len(fields) != len(_CSV_HEADER):
            raise DatasetError(f"{where}: expected {len(_CSV_HEADER)} columns "
                               f"({','.join(_CSV_HEADER)}), "
                               f"got {len(fields)}: {fields}")
        name, label, box = fields[0], fields[1], _number_fields(fields[2:])
        if not name:
            raise DatasetError(f"{where}: the image name (img_name) is empty")
        if all(field == "" for field in fields[1:]):
            rows.append((row_number, name, None, None))
            continue
        if box is None or (label and _number_fields([label]) is None):
            raise DatasetError(f"{where}: label and box must be numbers, got {fields[1:]}")
        rows.append((row_number, name, _number_fields([label])[0] if label else None, box))
    return rows


def read_detection_folder(folder, num_classes=None):
    """Read one split in d2l's layout: ``folder/label.csv`` and ``folder/images/``.

    Introduced in 06_data. Returns ``(images, labels)``: images uint8
    (N, 3, H, W); labels float32 (N, max_objects, 5) rows (class, xmin, ymin,
    xmax, ymax) with coordinates divided by the image width and height (0..1),
    padded with rows of -1. ``num_classes``: refuse class ids the model does
    not have. Every box passes label_problems; the first problem raises
    DatasetError naming the file and row. Image names are matched as paths
    (``a.png`` and ``./a.png`` are one image).
    """
    folder = pathlib.Path(folder)
    csv_path = folder / "label.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path} is missing")
    objects, first_row = _rows_by_image(csv_path)
    images, labels = [], []
    for name, rows in objects.items():
        image = open_image(folder / "images" / name, f"{csv_path} row {first_row[name]}",
                           exif="refuse")
        if images and image.shape != images[0].shape:
            raise DatasetError(f"{csv_path} row {first_row[name]}: image {name} is "
                               f"{tuple(image.shape)}, the first was {tuple(images[0].shape)}")
        height, width = image.shape[1:]
        for k, (row_number, label, box) in enumerate(rows):
            earlier = [(other[1], list(other[2])) for other in rows[:k]]
            problems = label_problems(label, box, (width, height), num_classes, earlier=earlier)
            if problems:
                raise DatasetError(f"{csv_path} row {row_number}: "
                                   f"{problems[0][0]}; {problems[0][1]}")
        scale = torch.tensor([1.0, width, height, width, height])
        labels.append(torch.tensor([[label, *box] for _, label, box in rows]).reshape(-1, 5)
                      / scale)
        images.append(image)
    if not images:
        raise DatasetError(f"{csv_path} lists no images")
    max_objects = max(1, max(len(lab) for lab in labels))
    padded = torch.full((len(labels), max_objects, 5), -1.0)
    for i, lab in enumerate(labels):
        padded[i, :len(lab)] = lab
    return torch.stack(images), padded


def _rows_by_image(csv_path):
    """({image path: [(row number, label, box)]}, {image path: its first row number}) of a
    label.csv, in file order; an image listed with empty fields has no rows."""
    objects, first_row, spelling = {}, {}, {}  # spelling: case-free name -> image path
    for row_number, name, label, box in _read_label_csv(csv_path):
        key = _image_key(name)
        if spelling.setdefault(key.casefold(), key) != key:
            raise DatasetError(f"{csv_path} row {row_number}: image {name} differs from another "
                               "image name only in case; on Windows and macOS they are one file. "
                               "Rename one.")
        first_row.setdefault(key, row_number)
        objects.setdefault(key, [])
        if label is not None or box is not None:
            objects[key].append((row_number, label, box))
    return objects, first_row


def _image_key(name):
    """An image's name as a normalised relative path, so that ``a.png`` and ``./a.png`` match."""
    return os.path.normpath(name) if name else name


class DetectionDataset(torch.utils.data.Dataset):
    """One split held in memory. Introduced in 06_data.

    ``dataset[i]`` is ``(image, label)``: image float32 (3, H, W) in 0..255 as the
    book feeds it (``as_float=False``: uint8), label (max_objects, 5).
    """

    def __init__(self, folder, as_float=True, num_classes=None):
        self.images, self.labels = read_detection_folder(folder, num_classes)
        self.as_float = as_float

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        image = self.images[idx]
        return (image.float() if self.as_float else image), self.labels[idx]


def load_data_bananas(batch_size, root=None, seed=0, as_float=True, num_classes=None):
    """The book's ``load_data_bananas``: (train_iter, val_iter) DataLoaders. Introduced in 06_data.

    root: a folder holding ``bananas_train/`` and ``bananas_val/`` (d2l's real
    dataset works too); None generates ours into ``data/`` on first use.
    Batches are (images (batch, 3, 256, 256), labels (batch, 1, 5)); the
    training order is shuffled reproducibly from ``seed``. ``num_classes``:
    refuse labels with class ids a model of that many classes does not have.
    """
    root = generate_banana_detection(seed=seed) if root is None else pathlib.Path(root)
    train = DetectionDataset(root / "bananas_train", as_float, num_classes)
    val = DetectionDataset(root / "bananas_val", as_float, num_classes)
    shuffle = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size, shuffle=True, generator=shuffle),
            torch.utils.data.DataLoader(val, batch_size))


# ---------------------------------------------------------------------------
# 7. Training (07_training)
# ---------------------------------------------------------------------------

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # per RGB channel, 0..255 scale
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of ``train_ssd``. Introduced in 07_training.

    The defaults are the recipe measured best here (notebook 07 shows the
    evidence); ``TrainConfig.book_recipe()`` is the book's. A value out of
    range (NaN, a batch of 0, an unknown option) raises ConfigError at once.
    """
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.02              # peak SGD learning rate; the book's 0.2 is too large for a
                                  # per-positive loss
    momentum: float = 0.0         # the book uses plain SGD
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0    # linear warm-up from 0, then ...
    schedule: str = "cosine"      # ... "cosine" decay to 0, or "constant" (the book)
    neg_ratio: float = 3.0        # hard negatives per positive; 0: every anchor (the book)
    bbox_weight: float = 1.0      # weight of the box loss against the class loss
    loss_norm: str = "positives"  # "positives": sums / #positives (SSD paper); "anchors": means
                                  # (the book)
    box_loss: str = "l1"          # "l1" (the book) or "smooth_l1" (SSD paper); 10_improvements
    cls_loss: str = "ce"          # "ce" (cross-entropy) or "focal" (softmax focal loss, usually
                                  # with neg_ratio=0 and a net started by init_background_prior);
                                  # 10_improvements
    focal_gamma: float = 2.0      # focal loss exponent; 0 gives cross-entropy
    focal_alpha: float = 0.25     # focal loss weight of object anchors (background: 1 - alpha),
                                  # as RetinaNet
    hflip: bool = True            # flip a random half of each batch left-right
    augment: bool = False         # SSD's augmentation, given to train_ssd (10_improvements)
    bf16: str = "auto"            # bf16 autocast: "auto" (CPUs with native bf16), "on", "off"
    channels_last: str = "auto"   # "auto" (on a CPU, and with bf16), "on", "off"
    keep_freed_memory: bool = True  # glibc keeps freed memory (keep_freed_memory();
                                    # 12_speed_and_deployment)
    seed: int = 0

    def __post_init__(self):
        def number(low, high=math.inf, integer=False):
            return lambda v: _is_number(v, low, high, integer)

        def one_of(*options):
            return lambda v: isinstance(v, str) and v in options, " or ".join(map(repr, options))
        flag = (lambda v: isinstance(v, bool), "True or False")
        _check_fields("TrainConfig", vars(self), {
            "epochs": (number(1, integer=True), "an integer >= 1"),
            "batch_size": (number(1, integer=True), "an integer >= 1"),
            "lr": (lambda v: _is_number(v, 0) and v > 0, "a finite number > 0"),
            "momentum": (lambda v: _is_number(v, 0, 1) and v < 1, "a number in 0..1, below 1"),
            "weight_decay": (number(0), "a finite number >= 0"),
            "warmup_epochs": (number(0), "a finite number >= 0"),
            "schedule": one_of("cosine", "constant"),
            "neg_ratio": (number(0), "a finite number >= 0 (0: every anchor)"),
            "bbox_weight": (number(0), "a finite number >= 0"),
            "loss_norm": one_of("positives", "anchors"),
            "box_loss": one_of(*_BOX_LOSSES),
            "cls_loss": one_of(*_CLASS_LOSSES),
            "focal_gamma": (number(0), "a finite number >= 0"),
            "focal_alpha": (lambda v: v is None or _is_number(v, 0, 1), "None or a number in 0..1"),
            "hflip": flag, "augment": flag, "keep_freed_memory": flag,
            "bf16": one_of("auto", "on", "off"),
            "channels_last": one_of("auto", "on", "off"),
            "seed": (number(0, 2**63 - 1, integer=True), "an integer >= 0"),
        })

    @classmethod
    def book_recipe(cls, **overrides):
        """The book's recipe: constant lr 0.2, every anchor in the loss, no flips."""
        book = dict(lr=0.2, warmup_epochs=0.0, schedule="constant", neg_ratio=0.0,
                    loss_norm="anchors", hflip=False)
        return cls(**{**book, **overrides})


def default_config(num_classes=1, class_names=None):
    """The SSDConfig we train by default. Introduced in 07_training.

    The book's anchors, ImageNet pixel statistics, and first_stride=2: the first
    convolution halves the image, so no 256 x 256 feature map is made. That step
    is 1.3x faster for the same AP (12_speed_and_deployment measures both blocks).
    class_names (11_your_own_data): saved with the model; sets num_classes.
    """
    if class_names is not None:
        num_classes, class_names = len(class_names), tuple(class_names)
    return SSDConfig(num_classes=num_classes, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
                     class_names=class_names, first_stride=2)


def default_checkpoint(fast=False):
    """Where notebook 07 saves the default model; ``fast=True`` (pass fast_mode()): the short run's
    own file. Introduced in 07_training."""
    return DATA_DIR / ("tinyssd_bananas_fast.pt" if fast else "tinyssd_bananas.pt")


def _batches(images, labels, batch_size, generator=None, shuffle=True):
    """Yield (idx (b,), images (b, 3, H, W), labels (b, G, 5)) from in-memory tensors. Used by
    train_ssd (07_training).

    idx holds the batch's indices into ``images``, so a message can name an image.
    """
    order = (torch.randperm(len(images), generator=generator) if shuffle
             else torch.arange(len(images)))
    for i in range(0, len(images), batch_size):
        idx = order[i:i + batch_size]
        yield idx, images[idx], labels[idx]


def hflip_batch(images, labels, generator=None):
    """Flip a random half of a batch left-right: (B, 3, H, W), (B, G, 5) -> new tensors.
    Used by train_ssd (07_training)."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images, labels = images.clone(), labels.clone()
    images[flip] = images[flip].flip(-1)
    x1, x2 = labels[flip, :, 1], labels[flip, :, 3]
    real = labels[flip, :, 0] >= 0  # padding rows stay -1
    labels[flip, :, 1] = torch.where(real, 1 - x2, x1)
    labels[flip, :, 3] = torch.where(real, 1 - x1, x2)
    return images, labels


def hard_negative_mask(cls_loss, cls_labels, neg_ratio=3.0):
    """(B, A) bool: all positives plus the ``neg_ratio`` x #positives hardest negatives. Introduced
    in 07_training.

    cls_loss: (B, A) per-anchor cross-entropy; cls_labels: (B, A), 0 = background.
    An image without positives keeps ``neg_ratio`` negatives.
    """
    positive = cls_labels > 0
    num_neg = (positive.sum(dim=1, keepdim=True) * neg_ratio).long()
    num_neg = num_neg.clamp(min=max(1, int(neg_ratio)), max=cls_loss.shape[1] - 1)  # (B, 1)
    neg_loss = cls_loss.detach().masked_fill(positive, -math.inf)
    hardest = neg_loss.topk(int(num_neg.max()), dim=1).values  # (B, k), hardest first
    return positive | (neg_loss >= hardest.gather(1, num_neg - 1))


def focal_loss(logits, labels, gamma=2.0, alpha=None):
    """Softmax focal loss per row: (N, C) logits, (N,) class ids -> (N,). Introduced in
    10_improvements.

    -alpha_t (1 - p_t)^gamma log(p_t), p_t = softmax probability of the true class (Lin et al.
    2017). gamma = 0 is cross-entropy; a larger gamma shrinks the loss of anchors that are already
    right (p_t near 1), mostly easy background. alpha_t = alpha for object rows (label > 0) and
    1 - alpha for background; None: 1 for both.
    """
    log_pt = F.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    # clamp: for gamma < 1 the gradient of x^gamma is infinite at x = 0 (p_t rounded to 1)
    loss = -(-torch.expm1(log_pt)).clamp(min=1e-12).pow(gamma) * log_pt
    return loss if alpha is None else loss * torch.where(labels > 0, alpha, 1 - alpha)


# The losses calc_loss knows, by name (TrainConfig's cls_loss and box_loss). A new class loss is
# one function (logits (N, C), class ids (N,), gamma, alpha) -> (N,) and one entry here.
_CLASS_LOSSES = {
    "ce": lambda logits, targets, gamma, alpha: F.cross_entropy(logits, targets, reduction="none"),
    "focal": focal_loss,
}
_BOX_LOSSES = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


def calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks,
              neg_ratio=0.0, bbox_weight=1.0, loss_norm="anchors",
              box_loss="l1", cls_loss="ce", focal_gamma=2.0, focal_alpha=None):
    """Per-image SSD loss (B,): class loss plus masked box loss. Introduced in 07_training.

    cls_preds (B, A, C) logits; cls_labels (B, A); bbox_* (B, A * 4). The defaults are the book's
    loss: cross-entropy and L1, both means over all anchors. ``neg_ratio`` > 0 keeps only the
    hardest negatives; ``loss_norm="positives"`` divides both sums by the number of positive
    anchors instead. 10_improvements adds ``box_loss="smooth_l1"`` and ``cls_loss="focal"``
    (``focal_gamma``, ``focal_alpha``).
    """
    _check_loss_names(cls_loss, box_loss, loss_norm)
    batch, num_anchors, num_classes = cls_preds.shape
    logits, targets = cls_preds.reshape(-1, num_classes).float(), cls_labels.reshape(-1)
    cls = _CLASS_LOSSES[cls_loss](logits, targets, focal_gamma, focal_alpha)  # (B * A,)
    cls = cls.reshape(batch, num_anchors)
    box_fn = _BOX_LOSSES[box_loss]
    box = (box_fn(bbox_preds.float() * bbox_masks, bbox_labels * bbox_masks, reduction="none")
           .reshape(batch, num_anchors, 4).sum(dim=2))  # (B, A), 0 off positives
    keep = (hard_negative_mask(cls, cls_labels, neg_ratio) if neg_ratio > 0
            else torch.ones_like(cls, dtype=torch.bool))
    if loss_norm == "anchors":
        return ((cls * keep).sum(dim=1) / keep.sum(dim=1)
                + bbox_weight * box.sum(dim=1) / (4 * num_anchors))
    num_pos = (cls_labels > 0).sum(dim=1).clamp(min=1)  # loss_norm == "positives"
    return ((cls * keep).sum(dim=1) + bbox_weight * box.sum(dim=1)) / num_pos


def _check_loss_names(cls_loss, box_loss, loss_norm):
    """ConfigError unless calc_loss knows the losses and the normalisation asked for."""
    _check_fields("calc_loss", dict(cls_loss=cls_loss, box_loss=box_loss, loss_norm=loss_norm), {
        "cls_loss": (lambda v: v in _CLASS_LOSSES, " or ".join(map(repr, _CLASS_LOSSES))),
        "box_loss": (lambda v: v in _BOX_LOSSES, " or ".join(map(repr, _BOX_LOSSES))),
        "loss_norm": (lambda v: v in ("anchors", "positives"), "'anchors' or 'positives'"),
    })


@torch.no_grad()
def batch_metrics(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks):
    """Counts to sum over an epoch. Introduced in 07_training.

    The book's class error divides by every anchor (mostly easy background) and
    its box MAE by every offset (mostly masked zeros); we also count the class
    error over foreground anchors and the MAE over positive anchors only.
    """
    wrong = cls_preds.argmax(dim=-1) != cls_labels
    foreground = cls_labels > 0
    return {"cls_wrong": int(wrong.sum()), "anchors": wrong.numel(),
            "fg_wrong": int((wrong & foreground).sum()), "fg_anchors": int(foreground.sum()),
            "bbox_abs": float(((bbox_preds.float() - bbox_labels) * bbox_masks).abs().sum()),
            "bbox_values": int(bbox_masks.sum())}


def cpu_has_native_bf16():
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX) through oneDNN.
    Used by pick_precision (07_training)."""
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)()
                 for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    try:
        return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(device, bf16="auto", channels_last="auto"):
    """(use_bf16, use_channels_last) for ``device``, from "auto" / "on" / "off". Introduced in
    07_training.

    "auto" picks bf16 where the hardware computes it natively: CPUs with AVX512-BF16 or AMX, and
    CUDA GPUs from Ampere on (compute capability 8.0). Older CUDA GPUs train in fp16 instead
    (pick_grad_scaler). channels_last speeds up convolutions on CPUs in fp32 too, and bf16 needs it.
    """
    if bf16 == "auto":
        use_bf16 = (cpu_has_native_bf16() if device.type == "cpu" else
                    device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0))
    else:
        use_bf16 = bf16 == "on"
    use_cl = ((use_bf16 or device.type == "cpu") if channels_last == "auto"
              else channels_last == "on")
    return use_bf16, use_cl


def pick_grad_scaler(device, bf16="auto"):
    """A torch.amp.GradScaler where training runs in fp16, else None. Introduced in 07_training.

    fp16 autocast is the choice of "auto" on a CUDA GPU without native bf16 (before Ampere). fp16
    keeps more digits than bf16 but a far smaller range, so small gradients would round to 0: the
    scaler multiplies the loss before the backward pass, divides the gradients before the step, and
    skips a step whose gradients overflowed, lowering its scale. train_step takes it as ``scaler``.
    """
    if device.type == "cuda" and bf16 == "auto" and not pick_precision(device, bf16)[0]:
        return torch.amp.GradScaler("cuda")
    return None


def lr_at(step, total_steps, steps_per_epoch, config):
    """Learning rate at optimiser step ``step``: linear warm-up, then constant or cosine.
    Used by train_ssd (07_training)."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                               / max(1, total_steps - warmup)))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def _non_finite_tensors(state_dict):
    """Names of the tensors of a state dict that hold NaN or inf (saving, loading and training
    refuse them). Used by train_step and the checkpoint checks (07_training)."""
    return [name for name, value in state_dict.items()
            if value.is_floating_point() and not torch.isfinite(value).all()]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what to do. Introduced
    in 08_prediction."""


# save_checkpoint's mark; it replaces only files that carry it
_CHECKPOINT_MARKER = "tinyssd-checkpoint"


def save_checkpoint(path, net, **extra):
    """Save weights and config atomically (temporary file, then rename). Introduced in 07_training.

    Readable with ``torch.load(path, weights_only=True)``; see ``load_model``.
    The file carries made_by="tinyssd-checkpoint", and an existing file is replaced
    only if it carries it too: any other file raises FileExistsError. Weights with
    NaN or inf are refused (CheckpointError).
    """
    path = pathlib.Path(path)
    state = {**extra, "made_by": _CHECKPOINT_MARKER,
             "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
             "config": dataclasses.asdict(net.config)}
    _check_can_save(path, state["state_dict"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_can_save(path, state_dict):
    """FileExistsError if path is a file save_checkpoint did not write; CheckpointError if a weight
    is NaN or inf."""
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file, not a folder, so {path} cannot be saved; "
                                  "nothing was written. Save the model under another path.")
    if (path.exists() or path.is_symlink()) and not _is_checkpoint(path):
        raise FileExistsError(f"{path} exists and was not written by save_checkpoint; "
                              "nothing was written. "
                              "Save the model under another name, or move that file away first.")
    bad = _non_finite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"not saving {path}: {len(bad)} weight tensors hold NaN or inf "
                              f"(first: {bad[0]})")


def read_checkpoint(path):
    """The dict saved by save_checkpoint, read with weights_only=True; CheckpointError otherwise.
    Shown in 08_prediction; load_model builds the model from it."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), perhaps from a copy or save that was "
                              "cut off. Copy it again, or train again.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types, by how the bytes are broken
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable PyTorch checkpoint "
            f"({type(error).__name__}). It was read with weights_only=True, which runs no code "
            "from the file; do not load a file of unknown origin any other way. Save models "
            "with save_checkpoint, or train again.") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        found = (sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise CheckpointError(f"{path} is a PyTorch file but not a TinySSD checkpoint: it needs a "
                              f"'state_dict' and a 'config' (found {found}). Save models with "
                              "save_checkpoint(path, net).")
    return checkpoint


def _is_checkpoint(path):
    """True if ``path`` is a file save_checkpoint wrote (it carries _CHECKPOINT_MARKER): one it may
    replace."""
    path = pathlib.Path(path)
    if path.is_symlink():
        return False
    try:
        return read_checkpoint(path).get("made_by") == _CHECKPOINT_MARKER
    except (CheckpointError, FileNotFoundError, OSError):
        return False


def _loss_options(config):
    """The calc_loss keyword arguments a TrainConfig sets."""
    return {key: getattr(config, key) for key in ("neg_ratio", "bbox_weight", "loss_norm",
                                                  "box_loss", "cls_loss", "focal_gamma",
                                                  "focal_alpha")}


@torch.no_grad()
def _undo_forward(net, optimizer, saved):
    """Put back the buffers (batch-norm statistics) a forward pass moved and drop the gradients."""
    for name, buffer in net.named_buffers():
        buffer.copy_(saved[name])
    optimizer.zero_grad(set_to_none=True)


def train_step(net, optimizer, images, labels, config, device, use_bf16=False, use_cl=False,
               ids=None, *, scaler=None, share=1.0):
    """One SGD step on a batch: images (B, 3, H, W) uint8, labels (B, G, 5). Used by train_ssd
    (07_training).

    Returns (loss as a float, batch_metrics). The forward pass runs under bf16 autocast when asked,
    or fp16 with a ``scaler`` (pick_grad_scaler); targets and loss are float32. The batch is checked
    first (check_images, check_labels). If a loss, a gradient or a new weight is not finite, the
    step is undone (weights, optimizer state and the batch-norm statistics the forward pass moved)
    and FloatingPointError names the images (``ids``, default 0..B-1): the model is left as it was
    before the batch. Under torchrun, net is a DistributedDataParallel and ``share`` is this
    process's part of the global batch times the number of processes (train_ssd).
    """
    tinyssd = getattr(net, "module", net)  # the TinySSD, also inside a DistributedDataParallel
    check_images(images, "batch", ids)
    check_labels(labels, tinyssd.config.num_classes, "batch", ids)
    saved = {name: buffer.clone() for name, buffer in net.named_buffers()}  # batch-norm statistics
    X = _to_device(images, device).float()
    if use_cl:
        X = X.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16 if scaler is None else torch.float16,
                        enabled=use_bf16 or scaler is not None):
        anchors, cls_preds, bbox_preds = net(X)
    with torch.no_grad():
        bbox_labels, bbox_masks, cls_labels = multibox_target(anchors.float(),
                                                              _to_device(labels, device))
    losses = calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks,
                       **_loss_options(config))  # (B,)
    optimizer.zero_grad(set_to_none=True)
    try:
        _check_loss(losses, ids)
        _backward_and_step(net, optimizer, losses.mean() * share, scaler)
    except FloatingPointError:
        _undo_forward(net, optimizer, saved)
        raise
    return losses.mean().item(), batch_metrics(cls_preds, cls_labels, bbox_preds, bbox_labels,
                                               bbox_masks)


def _to_device(tensor, device):
    """tensor on device; to a CUDA GPU from pinned memory with non_blocking=True, so that the copy
    runs beside the work already queued on the GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _check_loss(losses, ids):
    """FloatingPointError naming the images unless every per-image loss (B,) is finite, in this
    process and, under torchrun, in every other (so that all of them stop together)."""
    bad = (~torch.isfinite(losses.detach())).nonzero()[:, 0].tolist()
    if not _in_any_process(bool(bad), losses.device):
        return
    if not bad:
        raise FloatingPointError("the loss is not finite in another process's part of the batch; "
                                 "that process names the images")
    names = [int(ids[i]) if ids is not None else i for i in bad]
    raise FloatingPointError(
        f"the loss is {losses[bad[0]].item()} for image(s) {names[:10]}"
        f"{' ...' if len(bad) > 10 else ''}. Their pixels and labels passed the checks, so "
        "the model's outputs overflowed: the learning rate is likely too high for this loss; "
        "lower config.lr")


def _backward_and_step(net, optimizer, loss, scaler):
    """loss.backward() and one optimizer step. With a GradScaler (fp16) the loss is scaled, and a
    step whose gradients overflowed is skipped while the scaler halves its scale: in fp16 training
    that is routine, not an error, until the scale falls below 1."""
    if scaler is None:
        loss.backward()
        _check_gradients(net)
        _step_or_undo(net, optimizer, optimizer.step)
        return
    scale = scaler.get_scale()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    try:
        _step_or_undo(net, optimizer, lambda: scaler.step(optimizer))
    finally:
        scaler.update()
    if scaler.get_scale() < min(scale, 1.0):  # skipped, and the gradients overflow unscaled
        raise FloatingPointError("the gradient is NaN or inf although the loss is finite, even "
                                 "with the fp16 loss scale lowered below 1")


def _check_gradients(net):
    """FloatingPointError if a gradient is NaN or inf although the loss was finite."""
    # measures, clips nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), math.inf)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"the gradient is {grad_norm.item()} although the loss is finite")


@torch.no_grad()
def _step_or_undo(net, optimizer, step):
    """step() (the optimizer's); if it leaves a weight NaN or inf, put weights and optimizer state
    back and raise FloatingPointError saying why."""
    weights = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(optimizer.state_dict())  # e.g. momentum buffers
    step()
    bad = _non_finite_tensors(dict(net.named_parameters()))
    if not bad:
        return
    for p, w in zip(net.parameters(), weights):
        p.copy_(w)
    optimizer.load_state_dict(state)
    settings = {key: optimizer.param_groups[0].get(key)
                for key in ("lr", "momentum", "weight_decay")}
    raise FloatingPointError(
        f"one SGD step made {bad[0]} NaN or inf although the loss and the gradients were "
        f"finite: the step's size comes from the optimiser's settings {settings}, so lower "
        "the learning rate (config.lr), or the momentum")


def _epoch_summary(sums, num_examples, elapsed, lr):
    """Turn an epoch's summed counts into the numbers the history keeps."""
    return dict(loss=sums["loss"] / num_examples, cls_err=sums["cls_wrong"] / sums["anchors"],
                fg_err=sums["fg_wrong"] / max(1, sums["fg_anchors"]),
                bbox_mae=sums["bbox_abs"] / max(1, sums["bbox_values"]), lr=lr,
                time=elapsed, examples_per_s=num_examples / elapsed)


def _per_epoch(history):
    """The per-epoch lists of a ``train_ssd`` history (what a checkpoint keeps). Used by train_ssd
    (07_training)."""
    return {key: value for key, value in history.items() if isinstance(value, list)}


_HISTORY_KEYS = ("loss", "cls_err", "fg_err", "bbox_mae", "lr", "time", "examples_per_s",
                 "AP50", "AP")  # per epoch


def _check_predictions(cls_preds, bbox_preds):
    """RuntimeError if a model's outputs hold NaN or inf: its weights are damaged."""
    if not (torch.isfinite(cls_preds).all() and torch.isfinite(bbox_preds).all()):
        raise RuntimeError("the model's outputs hold NaN or inf: its weights or batch-norm "
                           "statistics are damaged (e.g. by training on bad input). Reload it "
                           "with load_model.")


@torch.no_grad()
def detect_images(net, images, batch_size=50, pos_threshold=0.01, nms_threshold=0.5, bf16="auto",
                  channels_last="auto"):
    """Detections for images (N, 3, H, W) at the model's size. Introduced in 07_training.

    Returns a list of N tensors (k, 6): rows (class, score, xmin, ymin, xmax, ymax),
    boxes normalised to 0..1, class -1 rows dropped. bf16 and channels_last as
    in pick_precision; train_ssd passes its TrainConfig's.
    """
    device = next(net.parameters()).device
    use_bf16, use_cl = pick_precision(device, bf16, channels_last)
    net.eval()
    out = []
    for i in range(0, len(images), batch_size):
        X = images[i:i + batch_size].to(device).float()
        if use_cl:
            X = X.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            anchors, cls_preds, bbox_preds = net(X)
        _check_predictions(cls_preds, bbox_preds)
        cls_probs = torch.softmax(cls_preds.float(), dim=2).permute(0, 2, 1)
        detections = multibox_detection(cls_probs, bbox_preds.float(), anchors.float(),
                                        nms_threshold=nms_threshold, pos_threshold=pos_threshold)
        out += [d[d[:, 0] >= 0].cpu() for d in detections]
    return out


def _validation_ap(net, val_data, evaluate, config):
    """{"AP50": VOC AP@0.5, "AP": COCO AP@[.5:.95]} of net on val_data, both None without it."""
    if val_data is None:
        return {"AP50": None, "AP": None}
    detections = detect_images(net, val_data[0], bf16=config.bf16,
                               channels_last=config.channels_last)
    ap = evaluate(detections, val_data[1])
    return {"AP50": ap["AP50_voc"], "AP": ap["AP"]}


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse. Introduced in 12_speed_and_deployment.

    A training step frees and allocates the same large tensors every time. By default glibc returns
    each large block to the kernel when it is freed (munmap, heap trimming), and the next step
    faults it back in page by page, zeroed: about 300,000 minor page faults per bf16 step of 32
    images (12_speed_and_deployment measures it). ``mallopt(M_MMAP_MAX, 0)`` and a high
    ``M_TRIM_THRESHOLD`` keep the memory in the process instead, as the environment variables
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... would. Process-wide and lasting; train_ssd calls
    it when ``TrainConfig.keep_freed_memory`` is True. Returns True if applied (Linux with glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: macOS, Windows, musl
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def train_ssd(net, train_data, config, device, *, val_data=None, evaluate=None, augment=None,
              checkpoint=None, resume=None, on_epoch_end=None, progress=True):
    """Train a TinySSD; returns the history. Introduced in 07_training.

    train_data, val_data: (images (N, 3, H, W) uint8, labels (N, G, 5)) in memory.
    evaluate(detections, labels) -> {"AP50_voc", "AP", ...} scores val_data after every epoch:
    notebook 07 passes evaluate_map, which 09_evaluation derives.
    augment(images, labels, generator) -> (images, labels) replaces the flip when config.augment
    is True: 10_improvements passes ssd_batch_augmentation().
    checkpoint: a path, saved atomically after every epoch with what resuming needs. resume: the
    path of such a checkpoint of an unfinished run with the same config and train_data; training
    goes on after its last epoch with its weights, optimiser, random state and history, as if it
    had never stopped. on_epoch_end(epoch, history): e.g. ``live_plot()``.
    The history holds per-epoch lists (loss, cls_err, fg_err, bbox_mae, lr, time, examples_per_s,
    AP50, AP) and the device and precision used; examples_per_s times all of an epoch's work.
    A non-finite loss raises FloatingPointError naming the epoch, the batch and the images
    (indices into train_data), and leaves the model as it was before that batch.
    config.keep_freed_memory (default True) calls keep_freed_memory(), process-wide.
    Under torchrun (once torch.distributed is started, as the train command does) each process
    trains on its part of every batch of config.batch_size images, and only the first one
    validates, saves, calls on_epoch_end and shows progress.
    """
    _check_before_training(net, train_data, val_data, evaluate, config, augment, checkpoint)
    if config.keep_freed_memory:
        keep_freed_memory()
    rank = _rank_and_world()[0]
    precision = pick_precision(device, config.bf16, config.channels_last)  # (bf16, channels_last)
    scaler = pick_grad_scaler(device, config.bf16)  # fp16 on older CUDA GPUs; else None
    net.to(device, memory_format=torch.channels_last if precision[1] else torch.contiguous_format)
    model = _in_every_process(net, device)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = {key: [] for key in _HISTORY_KEYS}
    history |= {"bf16": precision[0], "fp16": scaler is not None, "channels_last": precision[1],
                "device": str(device)}
    step_options = dict(use_bf16=precision[0], use_cl=precision[1], scaler=scaler)
    data_hash = _data_hash((*train_data, *(val_data or ()))) if checkpoint or resume else None
    done = 0 if resume is None else _resume(resume, config, data_hash, net, optimizer, generator,
                                            scaler, history)
    steps = math.ceil(len(train_data[0]) / config.batch_size)
    with progress_bar(total=steps * config.epochs, initial=steps * done, desc="training",
                      disable=not progress or rank > 0) as bar:
        for epoch in range(done, config.epochs):
            start = time.perf_counter()
            sums, lr = _train_epoch(model, optimizer, train_data, config, device, epoch, generator,
                                    augment, step_options, bar)
            _check_processes_agree(net, device)
            row = _epoch_summary(sums, len(train_data[0]), time.perf_counter() - start, lr)
            row.update(_validation_ap(net, val_data if rank == 0 else None, evaluate, config))
            for key in row:
                history[key].append(row[key])
            bar.set_postfix(loss=f"{row['loss']:.3g}", ex_per_s=f"{row['examples_per_s']:.0f}",
                            **({"AP50": f"{row['AP50']:.3f}"} if row["AP50"] is not None else {}))
            if rank == 0 and checkpoint is not None:
                save_checkpoint(checkpoint, net, train_config=dataclasses.asdict(config),
                                history=_per_epoch(history),
                                resume=_training_progress(epoch, optimizer, generator, scaler,
                                                          data_hash))
            if rank == 0 and on_epoch_end is not None:
                on_epoch_end(epoch, history)
    return history


def _train_epoch(net, optimizer, train_data, config, device, epoch, generator, augment,
                 step_options, bar):
    """One shuffled pass over train_data: (summed batch_metrics and loss, the last learning rate).
    Under torchrun every process draws the same batches and trains on its part of each."""
    images, labels = train_data
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    net.train()
    sums = dict.fromkeys(("loss", "cls_wrong", "anchors", "fg_wrong", "fg_anchors", "bbox_abs",
                          "bbox_values"), 0)
    for batch, (idx, X, Y) in enumerate(_batches(images, labels, config.batch_size, generator)):
        if augment is not None:
            X, Y = augment(X, Y, generator)
        elif config.hflip:
            X, Y = hflip_batch(X, Y, generator)
        lr = lr_at(epoch * steps_per_epoch + batch, steps_per_epoch * config.epochs,
                   steps_per_epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        part, share = batch_part(len(X), *_rank_and_world())
        try:
            loss, counts = train_step(net, optimizer, X[part], Y[part], config, device,
                                      ids=idx[part], share=share, **step_options)
        except FloatingPointError as error:
            raise FloatingPointError(f"epoch {epoch + 1}, batch {batch + 1} (lr {lr:.3g}): "
                                     f"{error}. Image numbers are indices into train_data. The "
                                     "model is left as it was before this batch.") from None
        if share > 0:  # a stand-in image (share 0) counts for nothing
            for key, value in counts.items():
                sums[key] += value
            sums["loss"] += loss * len(idx[part])
        bar.update(1)
    return _summed_over_processes(sums, device), lr


# Training on several processes (torchrun): each process takes a part of every batch, its
# DistributedDataParallel averages the gradients, and these helpers do the rest. In one process
# they change nothing.

def _distributed_started():
    """True once torch.distributed's process group is started (the train command under torchrun)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_and_world():
    """(this process's rank, number of processes): (0, 1) unless torch.distributed is started."""
    if _distributed_started():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batch_part(batch_size, rank=0, world=1):
    """(slice of a batch that process ``rank`` of ``world`` trains on, its share). Used by train_ssd
    (07_training).

    The processes take consecutive parts of about batch_size / world images. share = world x part
    / batch_size, so that the gradients DistributedDataParallel averages are the whole batch's
    mean. A process left without an image trains on the first one with share 0: it still takes
    part in the average, and adds nothing to it. In one process: (slice(0, batch_size), 1.0).
    """
    start, stop = rank * batch_size // world, (rank + 1) * batch_size // world
    if start == stop:
        return slice(0, 1), 0.0
    return slice(start, stop), world * (stop - start) / batch_size


def _in_any_process(flag, device):
    """True if flag is True here or, under torchrun, in any other process."""
    if _rank_and_world()[1] == 1:
        return flag
    flag = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _in_every_process(net, device):
    """net, or under torchrun net in a DistributedDataParallel: each backward pass then averages
    the gradients of all processes."""
    if _rank_and_world()[1] == 1:
        return net
    return nn.parallel.DistributedDataParallel(
        net, device_ids=[device] if device.type == "cuda" else None)


def _check_processes_agree(net, device):
    """RuntimeError unless every process holds the same weights, as DistributedDataParallel keeps
    them: the model the first process saves is the model of all."""
    if _rank_and_world()[1] == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in net.parameters()]).to(device)
    low, high = sums.clone(), sums
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("after an epoch the processes hold different weights: their gradients "
                           "were not averaged. Train the TinySSD inside a "
                           "DistributedDataParallel, as train_ssd does.")


def _summed_over_processes(sums, device):
    """A dict of numbers summed over all processes (itself in one process)."""
    if _rank_and_world()[1] == 1:
        return sums
    values = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(sums, values.tolist()))


# Resuming: train_ssd saves, after every epoch, the state an unfinished run needs.

def _data_hash(data):
    """SHA-256 of (images, labels), kept in checkpoints: resuming checks that the data are the
    same."""
    digest = hashlib.sha256()
    for tensor in data:
        digest.update(tensor.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


def _training_progress(epoch, optimizer, generator, scaler, data_hash):
    """What a checkpoint keeps so that a run can go on after ``epoch`` (counted from 0)."""
    return {"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "data": data_hash,
            "scaler": None if scaler is None else scaler.state_dict()}


def _resume(path, config, data_hash, net, optimizer, generator, scaler, history):
    """Load an unfinished run's weights, optimiser, random and loss-scale state and history from the
    checkpoint at path into the other arguments; return the number of epochs it had done."""
    path = pathlib.Path(path)
    checkpoint = _training_state(path, config, data_hash, net.config)
    state = checkpoint["resume"]
    try:
        net.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if scaler is not None and state.get("scaler") is not None:  # same kind of GPU
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise CheckpointError(f"{path} cannot be resumed: its saved state does not fit this model "
                              f"({str(error).splitlines()[0][:200]}). Start a new run.") from None
    bad = _non_finite_tensors(net.state_dict())
    if bad:
        raise CheckpointError(f"{path} holds NaN or inf (in {bad[0]}): it cannot be resumed. "
                              "Start a new run.")
    history.update({key: list(checkpoint["history"][key]) for key in _HISTORY_KEYS})
    return state["epoch"]


def _training_state(path, config, data_hash=None, net_config=None):
    """The checkpoint at path if a run of ``config`` (of a model with ``net_config``, on data with
    ``data_hash``) can resume from it; CheckpointError, ConfigError or DatasetError naming the file
    and what to do otherwise."""
    checkpoint = read_checkpoint(path)
    state, history = checkpoint.get("resume"), checkpoint.get("history")
    done = state.get("epoch") if isinstance(state, dict) else None
    if not (type(done) is int and done >= 1 and _is_history(history, done)
            and isinstance(state.get("data"), str)):
        raise CheckpointError(f"{path} holds no training state to resume from (a model saved by "
                              "save_checkpoint alone, or damaged). Start a new run.")
    for saved, ours in ((checkpoint.get("train_config"), config),
                        (checkpoint["config"], net_config)):
        changed = [] if ours is None else _changed_fields(saved, ours)
        if changed:
            key = changed[0]
            raise ConfigError(f"{path} was trained with {key}={_field(saved, key)}, and this run "
                              f"asks for {getattr(ours, key)!r}: resuming needs the same settings "
                              "(the learning-rate schedule depends on them) and the same model. "
                              "Use that run's settings, or start a new run.")
    if done > config.epochs:  # with the same config: damaged
        raise CheckpointError(f"{path} says {done} epochs are done, of {config.epochs}: it is "
                              "damaged. Start a new run.")
    if data_hash is not None and state["data"] != data_hash:
        raise DatasetError(f"the training or validation data differ from those {path} was trained "
                           "on: resume with the same data and validation split, or start a new "
                           "run.")
    return checkpoint


def _is_history(history, done):
    """True if history holds ``done`` numbers (or None) for each of _HISTORY_KEYS."""
    def number(value):
        return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(history, dict) and all(
        isinstance(history.get(key), list) and len(history[key]) == done
        and all(map(number, history[key])) for key in _HISTORY_KEYS)


def _changed_fields(saved, dataclass_value):
    """The fields of a dataclass whose value differs from the saved dict's (by repr, so that a
    damaged value of any type compares safely); keep_freed_memory never matters."""
    saved = saved if isinstance(saved, dict) else {}
    return [key for key, value in dataclasses.asdict(dataclass_value).items()
            if key != "keep_freed_memory" and (key not in saved or repr(saved[key]) != repr(value))]


def _field(saved, key):
    """A saved field as the error message shows it."""
    return repr(saved[key])[:80] if isinstance(saved, dict) and key in saved else "(missing)"


def _check_before_training(net, train_data, val_data, evaluate, config, augment,
                           checkpoint=None):
    """Refuse a model that already holds NaN, data that fail check_images or check_labels, options
    that do not go together, and a checkpoint path that holds a file save_checkpoint did not
    write."""
    bad = _non_finite_tensors(net.state_dict())
    if bad:
        raise FloatingPointError(f"the model already holds NaN or inf (in {bad[0]}) before "
                                 "training: start from a new TinySSD or reload a checkpoint "
                                 "with load_model")
    if (val_data is None) != (evaluate is None) or not (evaluate is None or callable(evaluate)):
        raise ConfigError("train_ssd's val_data= and evaluate= go together: pass both, with "
                          "evaluate a function such as H.evaluate_map (09_evaluation), or neither")
    if config.augment != (augment is not None) or not (augment is None or callable(augment)):
        raise ConfigError("TrainConfig(augment=True) and train_ssd(augment=...) go together: "
                          "pass both, with augment a function such as "
                          "H.ssd_batch_augmentation() (10_improvements), or neither")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None:
            _check_data(net, name, data)
    if checkpoint is not None:
        _check_can_save(pathlib.Path(checkpoint), {})


def _check_data(net, name, data):
    """DatasetError unless data is (images, labels) of equal, non-zero length that pass the
    checks."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise DatasetError(f"{name} must be (images, labels), two tensors as "
                           "read_detection_folder returns, or (data.images, data.labels) of "
                           f"read_dataset; got {type(data).__name__}")
    if len(data[0]) != len(data[1]) or len(data[0]) == 0:
        raise DatasetError(f"{name} holds {len(data[0])} images and {len(data[1])} labels: it "
                           "needs at least one image, and one label tensor per image")
    check_images(data[0], name)
    check_labels(data[1], net.config.num_classes, name)


def _plot_history(history, axes=None):
    """Loss, error and AP per epoch from a ``train_ssd`` history. Introduced in 07_training."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    epochs = range(1, len(history["loss"]) + 1)
    axes[0].plot(epochs, history["loss"], "o-")
    axes[0].set_title("training loss")
    axes[1].plot(epochs, history["fg_err"], "o-", label="class error, foreground anchors")
    axes[1].plot(epochs, history["bbox_mae"], "s-", label="box MAE, positive anchors")
    axes[1].set_title("training metrics")
    # below: never over the curves
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8)
    if any(v is not None for v in history["AP50"]):
        axes[2].plot(epochs, history["AP50"], "o-", label="AP@0.5 (VOC)")
        axes[2].plot(epochs, history["AP"], "s-", label="AP@[.5:.95] (COCO)")
        axes[2].set_ylim(0, 1)
        axes[2].legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=2)
    axes[2].set_title("validation")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return axes


def live_plot():
    """An ``on_epoch_end`` for notebooks: redraws the loss, error and AP curves after every epoch.
    Introduced in 07_training."""
    from IPython.display import display
    handle = None

    def redraw(epoch, history):
        nonlocal handle
        fig = _plot_history(history)[0].figure
        if handle is None:
            handle = display(fig, display_id=True)
        else:
            handle.update(fig)
        plt.close(fig)
    return redraw


def train_default_model(path=None, device=None, epochs=None, progress=True, fast=False):
    """Train the default recipe on the default banana data and save it. Introduced in 07_training.

    ``fast=True`` (pass fast_mode()) trains on 128 images for 2 epochs (unless
    ``epochs`` is given) and saves to default_checkpoint(fast=True). Returns the history.
    """
    root = generate_banana_detection()
    images, labels = read_detection_folder(root / "bananas_train")
    if fast:
        images, labels = images[:128], labels[:128]
    config = TrainConfig(epochs=epochs or (2 if fast else TrainConfig.epochs))
    set_seed(config.seed)
    net = TinySSD(default_config())
    return train_ssd(net, (images, labels), config, device or pick_device(),
                     checkpoint=path or default_checkpoint(fast), progress=progress)


# ---------------------------------------------------------------------------
# 8. Prediction: load a trained model and detect on any image (08_prediction)
# ---------------------------------------------------------------------------

def load_model(path, device=None, num_classes=None):
    """Rebuild a trained TinySSD from a checkpoint. Introduced in 08_prediction.

    Returns ``(net, config)``: the model in eval mode on ``device`` (default CPU)
    and its SSDConfig. The file is read with ``weights_only=True``, so loading a
    checkpoint runs no code from it. ``num_classes``: the number of classes you
    expect. A file that is empty, not a checkpoint, inconsistent with its config,
    for another number of classes, or holding NaN weights raises CheckpointError.
    """
    path = pathlib.Path(path)
    checkpoint = read_checkpoint(path)
    try:
        config = SSDConfig(**{key: _as_tuples(value)
                              for key, value in checkpoint["config"].items()})
        net = TinySSD(config)
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: its config cannot build a TinySSD ({error})") from None
    if num_classes is not None and config.num_classes != num_classes:
        raise CheckpointError(f"{path} holds a model with num_classes={config.num_classes}, "
                              f"not {num_classes}")
    _check_state_dict(path, checkpoint["state_dict"], net)
    net.load_state_dict(checkpoint["state_dict"])
    return net.to(device or "cpu").eval(), config


def load_default_model(device=None, fast=False):
    """Notebook 07's model for the notebooks after it: (net in eval mode, its SSDConfig, path).
    Introduced in 08_prediction.

    Loads default_checkpoint(fast). If notebook 07 has not saved the full model, it says so and
    uses the short model of default_checkpoint(fast=True) instead, training it first if needed
    (train_default_model(fast=True): 2 epochs on 128 images). It never writes the full model's
    file. Compare ``path`` with default_checkpoint() before checking what only the full model does.
    """
    path = default_checkpoint(fast)
    if not path.exists() and not fast:
        print(f"No {path.name} from notebook 07: using the short model instead. Run notebook 07 "
              "for the full one; checks that need it are skipped.")
        path = default_checkpoint(fast=True)
    if not path.exists():
        print(f"Training the short model first ({path.name}).")
        train_default_model(path, device=device, fast=True)
    net, config = load_model(path, device=device)
    return net, config, path


def _check_state_dict(path, state, net):
    """CheckpointError unless ``state`` has exactly net's tensors, in net's shapes, all finite."""
    expected = net.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: its weights do not match its config: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in expected.items():
        if not isinstance(state[key], torch.Tensor):
            raise CheckpointError(f"{path}: {key} is a {type(state[key]).__name__} in the file, "
                                  "not a tensor; save models with save_checkpoint(path, net)")
        if tuple(state[key].shape) != tuple(value.shape):
            hint = ""
            if key == "cls_heads.0.weight" and state[key].ndim == value.ndim:
                classes = state[key].shape[0] // net.config.num_anchors - 1
                hint = (f"; the weights are for num_classes={classes}, "
                        f"its config says {net.config.num_classes}")
            raise CheckpointError(f"{path}: {key} is {tuple(state[key].shape)} in the file, "
                                  "the model built from its config needs "
                                  f"{tuple(value.shape)}{hint}")
    bad = _non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors hold NaN or inf "
                              f"(first: {bad[0]}), so the model would detect nothing. "
                              "Training diverged before it was saved: use an earlier checkpoint "
                              "or train again.")


def _as_tuples(value):
    """Lists (as a checkpoint stores them) back to the tuples SSDConfig holds."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def to_image_tensor(image):
    """Any image -> uint8 (3, H, W) RGB. Introduced in 08_prediction.

    ``image``: a file path (EXIF orientation applied), a PIL image, a numpy
    array (H, W, C) or a tensor (C, H, W); see ``image_to_uint8`` for the
    rules (floats are 0..255; what is ambiguous raises DatasetError).
    """
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, "image", exif="apply")
    return image_to_uint8(image)


def detect(net, image, threshold=0.5, size=256, nms_threshold=0.5, keep_aspect=True, max_size=1024):
    """Detect objects in one image of any size and mode. Introduced in 08_prediction.

    ``image``: a file path, a PIL image, a numpy array (H, W, C) or a tensor
    (C, H, W). Integer pixels are 0..255 (uint16: 0..65535); **floats are
    0..255**, as the model takes them, and floats all within 0..1 are refused
    as ambiguous (multiply a 0..1 image by 255). Photos are turned upright by
    their EXIF orientation; transparent pixels become white (see image_to_uint8).
    The image keeps its proportions: it is scaled so that its shorter side is
    ``size`` (the training size; the longer side at most ``max_size``) and the
    model, being convolutional, runs on the whole rectangle. ``keep_aspect=False``
    squashes it to ``size`` x ``size`` as the book does. Returns a float tensor
    (k, 6) of rows (class_id, score, xmin, ymin, xmax, ymax) in the upright
    image's pixels, best first, score >= threshold.
    """
    _check_detect_options(threshold, nms_threshold, size, max_size)
    X, (height, width) = _model_input(image, size, keep_aspect, max_size)
    net.eval()
    with torch.no_grad():
        anchors, cls_preds, bbox_preds = net(X.to(next(net.parameters()).device))
        _check_predictions(cls_preds, bbox_preds)
        cls_probs = torch.softmax(cls_preds.float(), dim=2).permute(0, 2, 1)
        output = multibox_detection(cls_probs, bbox_preds.float(), anchors, nms_threshold)[0].cpu()
    return _in_pixels(output[(output[:, 0] >= 0) & (output[:, 1] >= threshold)], height, width)


def _check_detect_options(threshold, nms_threshold=0.5, size=256, max_size=1024):
    """ConfigError unless detect's options lie in their ranges."""
    _check_fields("detect", dict(threshold=threshold, nms_threshold=nms_threshold, size=size,
                                 max_size=max_size), {
        "threshold": (lambda v: _is_number(v, 0, 1), "a score in 0..1"),
        "nms_threshold": (lambda v: _is_number(v, 0, 1) and v > 0, "an IoU in 0..1, above 0"),
        "size": (lambda v: _is_number(v, 64, integer=True), "an integer >= 64 (pixels)"),
        "max_size": (lambda v: _is_number(v, size, integer=True), f"an integer >= size ({size})"),
    })


def _model_input(image, size=256, keep_aspect=True, max_size=1024):
    """(X (1, 3, h, w) float 0..255 scaled as detect describes, (height, width) of the upright
    image)."""
    pixels = to_image_tensor(image)  # (3, H, W) uint8
    height, width = pixels.shape[1:]
    if keep_aspect:  # at least 64 px on the short side: five blocks halve it down to one pixel
        short, long = min(height, width), max(height, width)
        scale = max(min(size / short, max_size / long), 64 / short)
        if long * scale > max_size + 0.5:
            raise DatasetError(f"the image is {width}x{height} pixels: with its short side at "
                               "least 64 pixels (what five blocks need) its long side would be "
                               f"{long * scale:.0f}, over max_size={max_size}. Crop it into "
                               "pieces, or pass a larger max_size.")
        new_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    else:
        new_size = (size, size)
    X = F.interpolate(pixels[None].float(), size=new_size, mode="bilinear", antialias=True,
                      align_corners=False)
    return X, (height, width)


def _in_pixels(rows, height, width):
    """Detection rows (k, 6) with normalised boxes -> boxes in an image's pixels, clipped to it."""
    rows = rows.clone()
    scale = torch.tensor([width, height, width, height], dtype=rows.dtype)
    rows[:, 2:] = (rows[:, 2:] * scale).clamp(min=torch.zeros(4), max=scale)
    return rows


# Detections are drawn in one palette, with one rule for naming classes, on matplotlib axes
# (show_detections) and on saved images (draw_detections, 11_your_own_data).
_DETECTION_COLORS = ("#ffffff", "#00c8ff", "#ffdc00", "#ff00c8")  # by class id, cycling


def _class_name(class_names, class_id):
    """The name of class ``class_id``: from class_names if it lists it, else "class <id>"."""
    class_id = int(class_id)
    return (class_names[class_id] if class_names and class_id < len(class_names)
            else f"class {class_id}")


def show_detections(ax, image, detections, class_names=None, colors=_DETECTION_COLORS):
    """Draw an image and its detections (k, 6), rows (class, score, xmin, ymin, xmax, ymax) in
    pixels, on matplotlib ``ax``; each labelled "name score". Introduced in 08_prediction."""
    ax.imshow(to_image_tensor(image).permute(1, 2, 0).numpy())
    for class_id, score, *box in detections.tolist():
        label = f"{_class_name(class_names, class_id)} {score:.2f}"
        show_bboxes(ax, [box], label, colors[int(class_id) % len(colors)])
    ax.axis("off")


# ---------------------------------------------------------------------------
# 9. Evaluation: mean average precision (09_evaluation)
# ---------------------------------------------------------------------------
#
# Detections of one image: (k, 6) rows (class_id, score, xmin, ymin, xmax, ymax);
# ground truth: (m, 5) rows (class_id, xmin, ymin, xmax, ymax); class -1 rows are
# padding. A batch is a 3-D tensor or a list of per-image tensors. IoU is a ratio
# of areas, so boxes may be in 0..1 or in pixels.
#
# One small function per idea: match_detections (one image, one class: which
# detections are true positives?), precision_recall (pool all images of a class),
# average_precision (COCO 101-point or VOC all-point), mean_average_precision and
# evaluate_map (average over classes and IoU thresholds), plot_pr_curve.
# The rules (sorting, ties, thresholds, interpolation) follow pycocotools'
# COCOeval exactly, so the numbers agree with it (tests/test_map.py).

def _as_image_list(batch):
    """A batch as a list of per-image 2-D tensors: a 3-D tensor (B, rows, cols), or a list of (rows,
    cols)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 3:
            raise ValueError("a batch tensor must be 3-D (batch, rows, cols)")
        return list(batch.unbind(0))
    return [torch.as_tensor(rows) for rows in batch]


def _drop_padding(rows):
    """Only the real rows (n', cols) of (n, cols): padding rows have class id -1."""
    return rows[rows[:, 0] >= 0]


def _rows_of_class(rows, class_id):
    """The rows (n', cols) of one class among (n, cols)."""
    return rows[rows[:, 0] == class_id]


def match_detections(dets, gts, iou_threshold, max_detections=None):
    """Which detections of ONE class in ONE image are true positives. Introduced in 09_evaluation.

    dets (k, 6) rows (class, score, xmin, ymin, xmax, ymax) of one class (column 0 is not read); gts
    (m, 5) rows (class, xmin, ymin, xmax, ymax) of that class; a match needs IoU >= iou_threshold.
    max_detections: keep only the best-scoring ones (None: all). Returns (is_tp bool (k',), scores
    (k',)) in descending score order.

    The greedy COCO rule: visit detections from the highest score down (a stable sort: ties keep
    input order); each takes the still-unmatched ground truth with the highest IoU if that IoU
    reaches the threshold, else it is a false positive. As in pycocotools, among equally good ground
    truths the last is taken, and the threshold is capped at 1 - 1e-10 so that 1.0 still lets a
    (numerically) perfect box match.
    """
    order = torch.sort(-dets[:, 1], stable=True).indices[:max_detections]
    dets = dets[order]
    scores = dets[:, 1]
    is_tp = torch.zeros(len(dets), dtype=torch.bool)
    if len(dets) == 0 or len(gts) == 0:
        return is_tp, scores
    # float64 like pycocotools: in float32 an IoU exactly on a threshold can flip; 0/0 (empty boxes)
    # -> 0
    ious = torch.nan_to_num(torchvision.ops.box_iou(dets[:, 2:6].double(),
                                                    gts[:, 1:5].double()))  # (k, m)
    threshold = min(iou_threshold, 1 - 1e-10)
    gt_taken = torch.zeros(len(gts), dtype=torch.bool)
    for i in range(len(dets)):
        candidate_ious = ious[i].masked_fill(gt_taken, -1.0)  # (m,)
        best_iou = candidate_ious.max()
        if best_iou < threshold:
            continue  # false positive
        best_gt = torch.nonzero(candidate_ious == best_iou).max()  # the last of equals
        gt_taken[best_gt] = True
        is_tp[i] = True
    return is_tp, scores


def precision_recall(is_tp_per_image, scores_per_image, num_gts):
    """Precision-recall curve of one class, pooled over all images. Introduced in 09_evaluation.

    is_tp_per_image, scores_per_image: lists of (k_i,) tensors from match_detections; num_gts (> 0):
    ground-truth boxes of the class in all images. Returns (recall, precision), float64 (n,) with
    n = sum of k_i: entry j is the cut after the j+1 best detections, recall = TP / num_gts and
    precision = TP / (TP + FP). Ranking as in pycocotools: images concatenated in order, then a
    stable sort on -score.
    """
    if num_gts <= 0:
        raise ValueError("precision/recall need at least one ground truth box")
    if len(is_tp_per_image) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone()
    is_tp, scores = torch.cat(is_tp_per_image), torch.cat(scores_per_image)
    is_tp = is_tp[torch.sort(-scores, stable=True).indices]
    tp = torch.cumsum(is_tp, dim=0).double()   # true positives so far
    fp = torch.cumsum(~is_tp, dim=0).double()  # false positives so far
    return tp / num_gts, tp / (tp + fp)


def precision_envelope(precision):
    """Interpolated precision p_interp[j] = max(precision[j:]): float64 numpy (n,), non-increasing.
    Introduced in 09_evaluation."""
    precision = np.asarray(precision, dtype=np.float64)
    return np.maximum.accumulate(precision[::-1])[::-1]


def average_precision(recall, precision, method="coco"):
    """One precision-recall curve as one number in [0, 1]. Introduced in 09_evaluation.

    recall, precision: (n,) from precision_recall (n may be 0: AP 0). Every method first replaces
    precision by its envelope, the best precision at any recall >= r, which removes the zig-zags of
    the raw curve.

    - "coco": 101-point, exactly as pycocotools: at each recall level r in linspace(0, 1, 101),
      the envelope at the first cut with recall >= r (searchsorted, side "left"); levels never
      reached count 0. AP is their mean.
    - "voc": all-point (PASCAL VOC 2010 on), the exact area under the envelope, sum over j of
      (recall[j] - recall[j-1]) * envelope[j]; only true positives move recall, so only they add
      area.
    - "voc07": 11-point (VOC 2007, the SSD paper's tables, 10_improvements): the mean of the
      envelope at recall 0, 0.1, ..., 1.0, 0 where never reached.
    """
    recall = np.asarray(recall, dtype=np.float64)
    envelope = precision_envelope(precision)
    if method == "coco":
        cut = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
        return float(np.mean([envelope[c] if c < len(recall) else 0.0 for c in cut]))
    if method == "voc":
        return float(np.sum(np.diff(recall, prepend=0.0) * envelope))
    if method == "voc07":
        cut = np.searchsorted(recall, np.arange(11) / 10, side="left")  # exact 0.3, 0.6, 0.7
        return float(np.mean([envelope[c] if c < len(recall) else 0.0 for c in cut]))
    raise ValueError(f"unknown method {method!r}; use 'coco', 'voc' or 'voc07'")


def class_precision_recall(detections, ground_truths, class_id, iou_threshold, max_detections=100):
    """Precision-recall curve of one class over a whole data set. Introduced in 09_evaluation.

    detections: a batch of (k, 6) rows; ground_truths: a batch of (m, 5) rows (a 3-D tensor or a
    list of tensors). max_detections: per image, of this class, like pycocotools' maxDets. Returns
    (recall, precision) float64 (n,), or None when the class has no ground truth (its AP is
    undefined and left out of the mean).
    """
    dets, gts = _as_image_list(detections), _as_image_list(ground_truths)
    if len(dets) != len(gts):
        raise ValueError("detections and ground truths differ in batch size")
    is_tp_per_image, scores_per_image, num_gts = [], [], 0
    for image_dets, image_gts in zip(dets, gts):
        class_dets = _rows_of_class(_drop_padding(image_dets), class_id)
        class_gts = _rows_of_class(_drop_padding(image_gts), class_id)
        is_tp, scores = match_detections(class_dets, class_gts, iou_threshold, max_detections)
        is_tp_per_image.append(is_tp)
        scores_per_image.append(scores)
        num_gts += len(class_gts)
    if num_gts == 0:
        return None
    return precision_recall(is_tp_per_image, scores_per_image, num_gts)


def _infer_num_classes(dets, gts):
    """1 + the largest class id among the real rows of two lists of tensors."""
    class_ids = [_drop_padding(rows)[:, 0] for rows in dets + gts]
    class_ids = torch.cat(class_ids) if class_ids else torch.zeros(0)
    return int(class_ids.max().item()) + 1 if len(class_ids) else 0


def ap_table(dets, gts, thresholds, num_classes, method, max_detections):
    """AP per (IoU threshold, class): float64 (T, C), nan for a class without ground truth.
    Introduced in 09_evaluation.

    dets, gts: lists of (k, 6) and (m, 5) tensors, one per image, without padding rows.
    """
    ap = torch.full((len(thresholds), num_classes), float("nan"), dtype=torch.float64)
    for t, threshold in enumerate(thresholds):
        for c in range(num_classes):
            curve = class_precision_recall(dets, gts, c, threshold, max_detections)
            if curve is not None:
                ap[t, c] = average_precision(*curve, method=method)
    return ap


def mean_average_precision(detections, ground_truths, iou_thresholds=(0.5,), num_classes=None,
                           method="coco", max_detections=100):
    """AP of every (IoU threshold, class) pair, and their means. Introduced in 09_evaluation.

    detections: a batch of (k, 6) rows (class, score, xmin, ymin, xmax, ymax); ground_truths: a
    batch of (m, 5) rows (class, xmin, ymin, xmax, ymax); a 3-D tensor or a list of tensors, class
    -1 rows ignored.
    iou_thresholds: a float or a sequence, e.g. np.linspace(.5, .95, 10). num_classes: classes
    0..num_classes-1 (default: from the largest class id present). method: "coco", "voc" or "voc07"
    (average_precision).
    max_detections: per image and class, as pycocotools' maxDets. Every box counts, whatever its
    size.

    Returns {"map": the mean over thresholds and classes (nan if no class has ground truth),
    "per_class": {class: AP averaged over the thresholds}, "per_threshold": {threshold rounded to 4
    digits: mAP over classes}, "ap": float64 (T, C), nan where a class has no ground truth; such
    classes are left out of every mean, like pycocotools' -1 entries}.
    """
    dets = [_drop_padding(d) for d in _as_image_list(detections)]
    gts = [_drop_padding(g) for g in _as_image_list(ground_truths)]
    thresholds = [float(t) for t in np.atleast_1d(iou_thresholds)]
    num_classes = _infer_num_classes(dets, gts) if num_classes is None else num_classes
    ap = ap_table(dets, gts, thresholds, num_classes, method, max_detections)
    has_gt = ~torch.isnan(ap).all(dim=0)  # (C,) classes with ground truth
    valid = ap[:, has_gt]                  # (T, number of such classes); an empty mean is nan
    return {"map": valid.mean().item(),
            "per_class": {c: ap[:, c].mean().item() for c in range(num_classes) if has_gt[c]},
            "per_threshold": {round(th, 4): valid[t].mean().item()
                              for t, th in enumerate(thresholds)},
            "ap": ap}


def evaluate_map(detections, ground_truths, num_classes=None, max_detections=100):
    """The usual summary numbers, in [0, 1]. Introduced in 09_evaluation (used from 07_training on).

    detections, ground_truths: batches as in mean_average_precision. Returns {"AP50": COCO-style AP
    at IoU 0.5, "AP": COCO AP@[.5:.95] (the mean over IoU 0.50, 0.55, ..., 0.95), "AP50_voc": VOC
    all-point AP at IoU 0.5}.
    """
    coco = mean_average_precision(detections, ground_truths, np.linspace(0.5, 0.95, 10),
                                  num_classes, "coco", max_detections)
    voc = mean_average_precision(detections, ground_truths, 0.5, num_classes, "voc", max_detections)
    return {"AP50": coco["per_threshold"][0.5], "AP": coco["map"], "AP50_voc": voc["map"]}


def plot_pr_curve(recall, precision, ax=None, label=None):
    """Draw a precision-recall curve (n,) and its envelope into ax (default: a new figure); returns
    the axes. Introduced in 09_evaluation."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    recall, precision = (np.asarray(recall, dtype=np.float64),
                         np.asarray(precision, dtype=np.float64))
    line, = ax.plot(recall, precision, marker=".", alpha=0.5,
                    label=f"{label} (raw)" if label else "raw")
    if len(recall):
        # the envelope is a staircase: on (recall[j-1], recall[j]] its value is envelope[j]; drawn
        # from recall 0
        ax.step(np.concatenate([[0.0], recall]),
                precision_envelope(np.concatenate([precision[:1], precision])),
                where="pre", color=line.get_color(), linestyle="--",
                label=f"{label} (interpolated)" if label else "interpolated")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    # beside the axes, off the curves
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return ax


# ---------------------------------------------------------------------------
# 10. Improvements: focal loss's start, box-aware augmentation, variants (10_improvements)
# ---------------------------------------------------------------------------
#
# focal_loss lives with the other losses in section 7; this section starts the model for it.

@torch.no_grad()
def init_background_prior(net, prior=0.01):
    """Start every anchor at P(background) = 1 - ``prior``. Introduced in 10_improvements.

    Focal loss sums over every anchor; from a uniform start the ~5000
    background anchors per image swamp the first steps (RetinaNet, Lin et al.
    2017, sec. 4.1). With foreground logits at 0 and the background bias b,
    softmax gives P(background) = e^b / (e^b + C), so b = log(C (1 - prior) / prior).
    """
    num_classes = net.config.num_classes
    for head in net.cls_heads:
        head.bias.view(-1, num_classes + 1)[:, 0] = math.log(num_classes * (1 - prior) / prior)
        head.bias.view(-1, num_classes + 1)[:, 1:] = 0.0
    return net


#
# Batches are uint8 images (B, 3, H, W) and float32 labels (B, G, 5) with rows
# (class, xmin, ymin, xmax, ymax) normalised to 0..1, padded with rows of -1.
# torchvision's box transforms want pixel boxes in a tv_tensors.BoundingBoxes
# that travels in the same call as the image, so augment_sample converts one
# image's rows to pixels, runs the transform on a dict {"image", "boxes",
# "labels"} and converts back.

class _PhotometricDistort(v2.RandomPhotometricDistort):
    """SSD's photometric distortion, optionally without the channel shuffle.

    torchvision shuffles R, G, B with probability ``p``; the original SSD
    (caffe, random_order_prob=0) did not, and here colour tells a yellow
    banana from an orange: a shuffled banana turns cyan or magenta.
    """

    def __init__(self, channel_swap=False, **kwargs):
        super().__init__(**kwargs)
        self.channel_swap = channel_swap

    def make_params(self, flat_inputs):
        params = super().make_params(flat_inputs)
        if not self.channel_swap:
            params["channel_permutation"] = None
        return params


def ssd_augmentation(size=256, max_zoom=2.5, p_zoom=0.5, min_scale=0.3,
                     iou_options=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), channel_swap=False):
    """SSD's training augmentation as a ``v2.Compose``. Introduced in 10_improvements.

    Photometric distortion -> zoom-out (pad to up to ``max_zoom`` x the side with
    the ImageNet mean colour, with probability ``p_zoom``) -> SSD's IoU crop ->
    resize to ``size`` x ``size`` -> horizontal flip -> drop boxes the crop
    removed. Call it on a dict {"image": tv_tensors.Image, "boxes":
    tv_tensors.BoundingBoxes, "labels": tensor (n,)} (``augment_sample`` does).

    max_zoom 2.5 (SSD: 4): shrinks our 34..73 px bananas to 14..29 px, the
    size range of the small-banana split (15..30 px). 4x would make 8..18 px
    objects, smaller than any test split and with IoU < 0.15 to the smallest
    anchor (0.2 x 256 = 51 px), so each would match one poor anchor.
    iou_options: minimum IoU of the crop with some box, one drawn per image
    (SSD's list); 1.0 means "no crop" and must stay in the list: it is also how
    an image without boxes gets through (torchvision retries forever otherwise).
    """
    if max(iou_options) < 1.0:
        raise ValueError("iou_options must include 1.0 (keep the image uncropped)")
    mean = tuple(round(m) for m in IMAGENET_MEAN)  # padding normalises to ~0
    return v2.Compose([
        _PhotometricDistort(channel_swap=channel_swap),
        v2.RandomZoomOut(fill={tv_tensors.Image: mean, "others": 0},
                         side_range=(1.0, max_zoom), p=p_zoom),
        v2.RandomIoUCrop(min_scale=min_scale, sampler_options=list(iou_options)),
        v2.Resize((size, size), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.SanitizeBoundingBoxes(),  # drops boxes the crop zeroed (and their labels)
    ])


def augment_sample(transform, image, label, masks=None):
    """Augment one image and its label rows. Used by augment_batch (10_improvements).

    image: uint8 (3, H, W); label: (G, 5) normalised rows, -1 padding allowed.
    Returns (image uint8 (3, h, w), label float32 (n, 5) normalised, real rows
    only, in input order). ``masks`` (n_real, ..., H, W), one per real row, go
    through the same call (tests use them to follow the objects' pixels) and
    are returned third, minus the rows that were dropped.
    """
    rows = label[label[:, 0] >= 0].float()
    height, width = image.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    sample = {"image": tv_tensors.Image(image),
              "boxes": tv_tensors.BoundingBoxes(rows[:, 1:] * scale, format="XYXY",
                                                canvas_size=(height, width)),
              "labels": rows[:, 0]}
    if masks is not None:
        sample["masks"] = tv_tensors.Mask(masks)
    out = transform(sample)
    height, width = out["image"].shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = out["boxes"].as_subclass(torch.Tensor).float() / scale
    new_label = torch.cat([out["labels"][:, None], boxes], dim=1)
    new_image = out["image"].as_subclass(torch.Tensor)
    if masks is None:
        return new_image, new_label
    return new_image, new_label, out["masks"].as_subclass(torch.Tensor)


@contextlib.contextmanager
def _threads(num_threads):
    """Run torch ops on ``num_threads`` threads inside the block (None: leave the count), then
    restore it."""
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def augment_batch(transform, images, labels, generator=None, num_threads=1):
    """Augment each image of a batch: (B, 3, H, W) uint8, (B, G, 5) -> new tensors. Introduced in
    10_improvements.

    Labels come back (B, G, 5), padded with -1 rows: the transforms only move,
    clip or drop boxes, never add any, so G rows always suffice. An image that
    ends up with no box stays in the batch with all -1 rows (SSD learns
    background from it); with ``ssd_augmentation`` only images that had no box
    to begin with end up so in practice: every IoU crop holds the centre of at
    least one box, so at least half of that box stays.

    Randomness: torchvision draws from torch's global RNG. This function draws
    one seed per image from ``generator`` (None: the global RNG), then runs the
    transforms under ``torch.random.fork_rng`` with the global RNG reseeded for
    each image. Same generator state -> same batch; given its seed, an image's
    augmentation does not depend on how many numbers the others drew; the
    global RNG is left as it was (generator given) or advanced by just the seed
    draw (generator None).

    num_threads: torch's thread count while the transforms run, restored after (None: leave it).
    Per-image augmentation is many tiny ops: extra threads barely help, and on a busy CPU they stall
    each other (measured: 0.2 s -> 10 s per batch of 32), so the default is 1.
    """
    seeds = torch.randint(0, 2**62, (len(images),), generator=generator).tolist()
    out_images = []
    out_labels = torch.full_like(labels, -1.0, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), _threads(num_threads):
        for i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            image, rows = augment_sample(transform, images[i], labels[i])
            out_images.append(image)
            out_labels[i, :len(rows)] = rows
        out_images = torch.stack(out_images)
    return out_images, out_labels


def ssd_batch_augmentation(size=None, num_threads=1, **options):
    """train_ssd's ``augment`` for TrainConfig(augment=True): f(images, labels, generator) runs
    augment_batch with ssd_augmentation(size, **options). size None: the batch's own image size.
    Introduced in 10_improvements."""
    def augment(images, labels, generator=None):
        transform = ssd_augmentation(size or images.shape[-1], **options)
        return augment_batch(transform, images, labels, generator, num_threads)
    return augment


def show_augmented(transform, images, labels, num=6, generator=None, class_names=None,
                   colors=_DETECTION_COLORS, scale=2.0):
    """Plot ``num`` images (top row) over an augmented copy (bottom row) with boxes. Introduced in
    10_improvements.

    The box colour tells the class, in a key under the figure: text labels would hide small objects.
    Returns the matplotlib figure.
    """
    images, labels = images[:num], labels[:num]
    augmented = augment_batch(transform, images, labels, generator)
    fig, axes = plt.subplots(2, len(images), figsize=(scale * len(images), scale * 2.2),
                             squeeze=False)
    for row, (imgs, labs) in enumerate([(images, labels), augmented]):
        for ax, image, label in zip(axes[row], imgs, labs):
            real = label[label[:, 0] >= 0]
            height, width = image.shape[-2:]
            ax.imshow(image.permute(1, 2, 0).numpy())
            classes = [int(c) for c in real[:, 0]]
            show_bboxes(ax, real[:, 1:] * torch.tensor([width, height, width, height]),
                        colors=[colors[c % len(colors)] for c in classes] or None)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(("original", "augmented")[row])
    num_classes = max(len(class_names or ()), int(labels[..., 0].max()) + 1)
    key = [matplotlib.patches.Patch(facecolor="0.3", edgecolor=colors[c % len(colors)], lw=3,
                                    label=f"{_class_name(class_names, c)} box")
           for c in range(num_classes)]
    fig.legend(handles=key, loc="lower center", ncol=len(key), frameon=False, handlelength=2.5,
               handleheight=1.5)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def evaluate_splits(net, splits):
    """AP of ``net`` on several validation splits. Introduced in 10_improvements.

    splits: {name: (images (N, 3, H, W) uint8, labels (N, G, 5))}.
    Returns {name: evaluate_map(...)}, i.e. AP50_voc, AP50 and AP per split.
    Classes without ground truth in a split (oranges in a banana split) are
    left out of that split's mean.
    """
    return {name: evaluate_map(detect_images(net, images), labels)
            for name, (images, labels) in splits.items()}


def for_bigger_input(net, scale):
    """A copy of a trained TinySSD for inputs ``scale`` times the training size. Introduced in
    10_improvements.

    Anchor sizes are fractions of the input, so on an input twice as large every anchor is twice as
    large in pixels, while the convolutions still see an object at its size in pixels. The copy
    divides the anchor sizes by ``scale``: its anchors keep their training size in pixels. Same
    weights, nothing retrained; in eval mode, on net's device.
    """
    sizes = tuple(tuple(size / scale for size in scale_sizes) for scale_sizes in net.config.sizes)
    bigger = TinySSD(dataclasses.replace(net.config, sizes=sizes))
    bigger.load_state_dict(net.state_dict())
    return bigger.to(next(net.parameters()).device).eval()


def train_variant(config, train_data, splits, model_config, device, checkpoint=None):
    """Train one row of notebook 10's table from scratch and evaluate it. Introduced in
    10_improvements.

    config: a TrainConfig (its seed seeds the weights too; with focal loss the
    class heads start from init_background_prior); model_config: an SSDConfig;
    train_data as in train_ssd; splits as in evaluate_splits. Saves the model
    to ``checkpoint`` with the split results.
    Returns a flat dict: minutes of training, the last epoch's class error on
    foreground anchors (see batch_metrics), then "<split> AP50" (VOC
    all-point) and "<split> AP" (COCO AP@[.5:.95]) for each split.
    """
    set_seed(config.seed)
    net = TinySSD(model_config)
    if config.cls_loss == "focal":
        init_background_prior(net)
    augment = ssd_batch_augmentation() if config.augment else None
    history = train_ssd(net, train_data, config, device, augment=augment, progress=False)
    results = evaluate_splits(net, splits)
    row = {"minutes": sum(history["time"]) / 60, "train fg error": history["fg_err"][-1]}
    for name, result in results.items():
        row[f"{name} AP50"], row[f"{name} AP"] = result["AP50_voc"], result["AP"]
    if checkpoint is not None:
        save_checkpoint(checkpoint, net, train_config=dataclasses.asdict(config), results=results,
                        history=_per_epoch(history))
    return row


# ---------------------------------------------------------------------------
# 11. Your own data: VOC, COCO and CSV, a validation report, detection on a folder
# (11_your_own_data)
# ---------------------------------------------------------------------------
#
# Each reader turns its format into the same records: one per image, holding
# the image file and its objects (class name, pixel box with an exclusive
# max, the values as written, a difficult flag, and where in the annotation
# file it came from). One pass (_scan) then decodes each image once, checks
# every object, and scales the image to the model's input.

_CSV_DATASET_HEADER = ("image", "class", "xmin", "ymin", "xmax", "ymax")


@dataclasses.dataclass
class _Object:
    name: str | None  # the class name; None if the file gives the box none
    box: list        # (xmin, ymin, xmax, ymax) in pixels, exclusive max
    written: list    # the four numbers as the file has them
    difficult: bool
    where: str       # e.g. "train.csv row 7" or "Annotations/x.xml object 2"


@dataclasses.dataclass
class _Record:
    file: pathlib.Path  # the image
    objects: list
    source: pathlib.Path  # the annotation file that lists the image ...
    where: str            # ... and where in it
    size: tuple = None    # (width, height) if the annotation file states it


@dataclasses.dataclass(frozen=True)
class DetectionData:
    """A dataset in memory, read by read_dataset. Introduced in 11_your_own_data.

    images: uint8 (N, 3, size, size); each photo is scaled to fit with its
        proportions kept and padded at the right or bottom with the mean colour.
    labels: float32 (N, G, 5) rows (class, xmin, ymin, xmax, ymax) in 0..1 of
        the padded square, padded with rows of -1; ready for train_ssd.
    difficult: bool (N, G): VOC's difficult flag or COCO's iscrowd.
    class_names: class id i is class_names[i]. files: the image of each row.
    """
    images: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor
    class_names: tuple
    files: tuple


def _problem(file, where, problem, fix, image=""):
    """One row of the validation report: the annotation file, where in it, the image, what is wrong,
    what to do."""
    return {"file": str(file), "where": where, "image": str(image), "problem": problem, "fix": fix}


def _voc_records(root, split, image_dir=None):
    """(records, problems, None, the list file) of a Pascal VOC folder: Annotations/*.xml,
    JPEGImages/, ImageSets/Main/<split>.txt. Images are always in JPEGImages/."""
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"{list_file} is missing: a VOC folder lists the image ids of each "
                           "split there")
    records, problems, seen = [], [], {}
    for line_number, line in enumerate(_csv_text(list_file).splitlines(), start=1):
        if not line.strip():
            continue
        image_id, where = line.split()[0], f"line {line_number}"
        if image_id in seen:
            problems.append(_problem(list_file, where, f"id {image_id} is listed twice (first on "
                                     f"line {seen[image_id]})", "list each image once"))
            continue
        seen[image_id] = line_number
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            problems.append(_problem(list_file, where, f"no annotation {xml_path.name}",
                                     "add the XML file or remove the id from the list"))
            continue
        record = _voc_record(root, image_id, xml_path, problems)
        if record is not None:
            records.append(record)
    return records, problems, None, list_file


def _voc_record(root, image_id, xml_path, problems):
    """The record of one VOC annotation file, or None after adding a problem if it is not XML."""
    try:
        node = ElementTree.fromstring(xml_path.read_bytes())
    except (ElementTree.ParseError, ValueError, LookupError, OSError) as error:
        problems.append(_problem(xml_path, "", f"not valid XML ({error})",
                                 "fix or re-export the file"))
        return None
    size = [(node.findtext(f"size/{tag}") or "").strip() for tag in ("width", "height")]
    numbers = _number_fields(size) if all(size) else None
    if any(size) and (numbers is None
                      or not all(_is_number(v, 0) and v == int(v) for v in numbers)):
        problems.append(_problem(xml_path, "size", "width and height must be whole numbers of "
                                 f"pixels, got {size}", "write the image's size, or remove <size>"))
        numbers = None
    objects = []
    for k, obj in enumerate(node.findall("object"), start=1):
        where, bndbox = f"object {k}", obj.find("bndbox")
        texts = [(bndbox.findtext(t) or "").strip() if bndbox is not None else "" for t in
                 ("xmin", "ymin", "xmax", "ymax")]
        written, difficult = (_number_fields(texts),
                              (obj.findtext("difficult") or "0").strip().lower())
        if written is None:
            problems.append(_problem(xml_path, where,
                                     f"<bndbox> needs four numbers xmin, ymin, xmax, ymax; got "
                                     f"{texts}", "write the box's four corners in pixels"))
        elif difficult not in ("0", "1", "false", "true"):
            problems.append(_problem(xml_path, where,
                                     f"<difficult> must be 0 or 1, got {difficult!r}",
                                     "write 0 or 1"))
        # VOC counts pixels from 1, and xmax is the last pixel inside;
        # many tools write 0 for pixel 1
        else:
            box = [v - 1 if v >= 1 else min(v, 0.0) for v in written[:2]] + written[2:]
            objects.append(_Object((obj.findtext("name") or "").strip() or None, box, written,
                                   difficult in ("1", "true"), where))
    filename = (node.findtext("filename") or "").strip() or f"{image_id}.jpg"
    return _Record(root / "JPEGImages" / _image_key(filename), objects, xml_path, "",
                   tuple(int(v) for v in numbers) if numbers else None)


def _read_coco_json(json_path):
    """The dict of a COCO file, with lists under images, annotations and categories; else
    DatasetError."""
    try:
        data = json.loads(_csv_text(json_path))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{json_path} line {error.lineno}: "
                           f"not valid JSON ({error.msg})") from None
    except RecursionError:
        raise DatasetError(f"{json_path}: nested too deeply to be a COCO file") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise DatasetError(f"{json_path}: not a COCO file ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: a COCO file is a JSON object with 'images', "
                           f"'annotations' and 'categories', not a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_path}: '{key}' must be a list, got "
                               f"{'nothing' if key not in data else json.dumps(data[key])[:40]}")
    return data


def _is_id(value):
    """True for a COCO id: an integer, as COCO defines it (not a string, bool, float or list).

    Ids of mixed kinds would make the order of the category ids, and so the class ids, a guess."""
    return isinstance(value, int) and not isinstance(value, bool)


def _coco_categories(json_path, categories, problems):
    """{category id: name} of the well-formed categories, in id order; problems for the others."""
    found, names = {}, set()
    for index, category in enumerate(categories):
        where = f"categories[{index}]"
        if not isinstance(category, dict) or not _is_id(category.get("id")):
            problems.append(_problem(json_path, where, "a category needs an integer 'id'",
                                     "fix the category"))
            continue
        name, where = category.get("name"), f"category id {category['id']}"
        if not isinstance(name, str) or not name.strip():
            problems.append(_problem(json_path, where, f"a category needs a 'name', got {name!r}",
                                     "give the category a name"))
        elif category["id"] in found or name in names:
            problems.append(_problem(json_path, where,
                                     f"another category has the id {category['id']!r} or the "
                                     f"name {name!r}", "give each category its own id and name"))
        else:
            found[category["id"]] = name
            names.add(name)
    return dict(sorted(found.items()))


def _coco_images(json_path, images, image_dir, problems):
    """{image id: record} of the well-formed images; problems for the others (a duplicated id among
    them)."""
    by_id, by_file = {}, {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            problems.append(_problem(json_path, where, "an image needs an integer 'id'",
                                     "fix the image entry"))
            continue
        name, where = image.get("file_name"), f"image id {image['id']}"
        size = (image.get("width"), image.get("height"))
        if not isinstance(name, str) or not name.strip():
            problems.append(_problem(json_path, where,
                                     f"an image needs a 'file_name', got {name!r}",
                                     "write the image's path"))
        elif not all(v is None or _is_number(v, 0, integer=True) for v in size):
            problems.append(_problem(json_path, where,
                                     f"width and height must be whole numbers, got {size}",
                                     "write the image's size, or leave them out", name))
        elif image["id"] in by_id:
            problems.append(_problem(json_path, where, f"image id {image['id']!r} is also the id "
                                     f"of {by_id[image['id']].file.name}, so their annotations "
                                     "cannot be told apart", "give each image its own id", name))
        elif _image_key(name) in by_file:
            problems.append(_problem(json_path, where,
                                     f"{name} is also listed as {by_file[_image_key(name)]}",
                                     "list each image once, with all its annotations under one id",
                                     name))
        else:
            by_id[image["id"]] = _Record(image_dir / _image_key(name), [], json_path, where, size)
            by_file[_image_key(name)] = where
    return by_id


def _coco_records(json_path, split, image_dir):
    """(records, problems, class names, json_path) of a COCO JSON file; category ids become
    0..K-1 in id order, names kept. The file is one split: ``split`` is not used."""
    data, problems = _read_coco_json(json_path), []
    categories = _coco_categories(json_path, data["categories"], problems)
    by_id = _coco_images(json_path, data["images"], image_dir, problems)
    for index, ann in enumerate(data["annotations"]):
        where = (f"annotation id {ann['id']}" if isinstance(ann, dict) and _is_id(ann.get("id"))
                 else f"annotations[{index}]")
        ann = ann if isinstance(ann, dict) else {}
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        record = by_id.get(image_id) if _is_id(image_id) else None
        if record is None:
            problems.append(_problem(json_path, where,
                                     f"image_id {image_id!r} is not the id of a readable image",
                                     "fix the id, or the image's entry in 'images'"))
        elif not _is_id(category_id) or category_id not in categories:
            problems.append(_problem(json_path, where,
                                     f"unknown category_id {category_id!r} (known: "
                                     f"{list(categories)})", "fix the id or add the category",
                                     record.file.name))
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(  # NaN and inf: label_problems
                _is_number(v) or (isinstance(v, float) and not math.isfinite(v)) for v in bbox)):
            problems.append(_problem(json_path, where,
                                     f"bbox must be four numbers [x, y, width, height], got "
                                     f"{json.dumps(bbox)[:60]}", "fix the box", record.file.name))
        elif ann.get("iscrowd", 0) not in (0, 1):
            problems.append(_problem(json_path, where,
                                     f"iscrowd must be 0 or 1, got {ann['iscrowd']!r}",
                                     "write 0 or 1", record.file.name))
        else:  # COCO boxes are (x, y, width, height)
            box = [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
            record.objects.append(_Object(categories[category_id], box, bbox,
                                          bool(ann.get("iscrowd", 0)), where))
    return list(by_id.values()), problems, tuple(categories.values()), json_path


def _csv_records(csv_path, split, image_dir):
    """(records, problems, None, csv_path) of a CSV with the header image,class,xmin,ymin,xmax,ymax
    (pixels), one row per box. The file is one split: ``split`` is not used."""
    by_image, problems = {}, []
    for row_number, fields in _csv_table(csv_path, _CSV_DATASET_HEADER):
        where = f"row {row_number}"
        if len(fields) != len(_CSV_DATASET_HEADER):
            problems.append(_problem(csv_path, where,
                                     f"expected 6 columns, got {len(fields)}: {fields}",
                                     "one row per box: image,class,xmin,ymin,xmax,ymax"))
            continue
        name, label, written = fields[0], fields[1], _number_fields(fields[2:])
        if not name:
            problems.append(_problem(csv_path, where, "the image name is empty",
                                     "write the image's path"))
            continue
        record = by_image.setdefault(_image_key(name),
                                     _Record(image_dir / _image_key(name), [], csv_path, where))
        if all(field == "" for field in fields[1:]):
            continue  # an image without objects
        if written is None:
            problems.append(_problem(csv_path, where, f"box values are not numbers: {fields[2:]}",
                                     "write four numbers in pixels", name))
        else:
            record.objects.append(_Object(label or None, written, written, False, where))
    return list(by_image.values()), problems, None, csv_path


# The formats read_dataset knows: name -> (what the path is, how to tell, its reader). A new
# format is one reader with the signature of these three, and one entry here.
_READERS = {
    "voc": ("a VOC folder (with Annotations/, JPEGImages/ and ImageSets/Main/)",
            lambda path: path.is_dir() and (path / "Annotations").is_dir(), _voc_records),
    "coco": ("a COCO .json file",
             lambda path: path.suffix.lower() == ".json" and path.is_file(), _coco_records),
    "csv": ("a .csv file",
            lambda path: path.suffix.lower() == ".csv" and path.is_file(), _csv_records),
}


def _records(path, split, image_dir):
    """(records, problems, class names or None) of any format in _READERS."""
    path = pathlib.Path(path)
    expected = ", ".join(what for what, _, _ in _READERS.values())
    if not _exists(path):
        raise DatasetError(f"{path} does not exist: expected one of: {expected}")
    if image_dir is not None and not (_exists(image_dir) and pathlib.Path(image_dir).is_dir()):
        raise DatasetError(f"the image folder {image_dir} (image_dir) is not a folder")
    image_dir = pathlib.Path(image_dir) if image_dir is not None else path.parent
    reader = next((read for _, matches, read in _READERS.values() if matches(path)), None)
    if reader is None:
        raise DatasetError(f"{path}: expected one of: {expected}")
    records, problems, names, source = reader(path, split, image_dir)
    if not records and not problems:
        problems.append(_problem(source, "", "lists no images", "add the images and their labels"))
    return records, problems, names


def _letterbox(pixels, size):
    """(3, H, W) uint8 -> (3, size, size) uint8 with proportions kept, padded right and bottom; and
    the scale."""
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) == (height, width) == (size, size):
        return pixels, (1.0, 1.0)
    out = (torch.tensor([round(v) for v in IMAGENET_MEAN], dtype=torch.uint8)
           .view(3, 1, 1).expand(3, size, size))
    out = out.contiguous()
    resized = (pixels if (new_h, new_w) == (height, width)
               else F.interpolate(pixels[None].float(), size=(new_h, new_w), mode="bilinear",
                                  antialias=True).round().clamp(0, 255)[0])
    out[:, :new_h, :new_w] = resized.to(torch.uint8)
    return out, (new_w / width, new_h / height)


def _scan(records, class_names, size):
    """Decode each image once, check every object, scale: (images, labels, difficult, files,
    problems)."""
    class_ids = {name: i for i, name in enumerate(class_names)}
    images, labels, difficult, files, problems, seen = [], [], [], [], [], {}
    for record in records:
        spelling = seen.setdefault(str(record.file).casefold(), record)
        if spelling is not record:
            problems.append(_problem(record.source, record.where,
                                     f"{record.file.name} is the same image as "
                                     f"{spelling.file.name} ({spelling.where}) on Windows and "
                                     "macOS", "give each image one name, spelled the same way",
                                     record.file.name))
            continue
        pixels, image_problem = _open_record_image(record)
        if image_problem:
            problems.append(image_problem)
        height, width = pixels.shape[1:] if pixels is not None else (None, None)
        if (pixels is not None and record.size and all(record.size)
                and tuple(record.size) != (width, height)):
            problems.append(_problem(record.source, record.where,
                                     f"the annotation says {record.size[0]}x{record.size[1]}, "
                                     f"the image is {width}x{height}",
                                     "check that the boxes belong to this image", record.file.name))
        rows, flags = [], []
        for obj in record.objects:
            found = label_problems(obj.name, obj.box, None if pixels is None else (width, height),
                                   class_names, written=obj.written,
                                   earlier=[(class_names[r[0]], r[1:]) for r in rows])
            problems += [_problem(record.source, obj.where, *pair, record.file.name)
                         for pair in found]
            if not found:
                rows.append([class_ids[obj.name], *obj.box])
                flags.append(obj.difficult)
        if pixels is None:
            continue
        image, (sx, sy) = _letterbox(pixels, size)
        scale = torch.tensor([1.0, sx / size, sy / size, sx / size, sy / size])
        labels.append(torch.tensor(rows, dtype=torch.float64).reshape(-1, 5) * scale.double())
        images.append(image)
        difficult.append(flags)
        files.append(str(record.file))
    return images, labels, difficult, files, problems


def _open_record_image(record):
    """(pixels uint8 (3, H, W) or None, a problem row or None) for a record's image."""
    try:
        return open_image(record.file, "", exif="refuse"), None
    except DatasetError as error:
        text = str(error).split(": ", 1)[-1].replace(str(record.file), record.file.name)
        fix = "fix, replace or remove the image"
        if not _exists(record.file):
            fix = (f"check the path: it is read as {record.file}. COCO and CSV paths are relative "
                   "to the annotation file's folder, or to image_dir (--image-dir in the shell)")
            fix += "; write / between folders, not \\" if "\\" in str(record.file) else ""
        return None, _problem(record.source, record.where, text, fix, record.file.name)


def _class_names(records, names_from_file, class_names):
    """The class names: given, else from the file (COCO), else every name used, sorted."""
    if class_names is not None:
        if not _class_names_ok(class_names, len(class_names)) or not class_names:
            raise ConfigError("class_names must be distinct, non-empty strings, got "
                              f"{class_names!r}")
        return tuple(class_names)
    if names_from_file is not None:
        return names_from_file
    return tuple(sorted({obj.name for record in records for obj in record.objects if obj.name}))


def read_dataset(path, split="train", image_dir=None, class_names=None, size=256):
    """Read a VOC folder, a COCO JSON file or a CSV file -> DetectionData. Introduced in
    11_your_own_data.

    path: a VOC folder (Annotations/*.xml, JPEGImages/, ImageSets/Main/<split>.txt;
    the difficult flag is kept), a COCO ``.json`` (category ids become 0..K-1 in
    id order; images without annotations are kept as negatives) or a ``.csv``
    with the header image,class,xmin,ymin,xmax,ymax in pixels (a row with the
    class and box empty: an image without objects). Image paths are relative to
    the annotation file's folder unless ``image_dir`` is given. class_names:
    the classes in id order (default: from the file, or every name used, sorted).
    Data with any problem raise DatasetError; validate_dataset lists them all.
    """
    records, problems, names_from_file = _records(path, split, image_dir)
    names = _class_names(records, names_from_file, class_names)
    images, labels, difficult, files, found = _scan(records, names, size)
    problems += found
    if problems:
        first = problems[0]
        raise DatasetError(f"{path}: {len(problems)} problem(s), the first: {first['file']} "
                           f"{first['where']} ({first['image']}): {first['problem']}. See them "
                           f"all with H.validate_dataset({str(path)!r}"
                           f"{', split=' + repr(split) if split != 'train' else ''}).")
    if not images:
        raise DatasetError(f"{path} lists no images")
    width = max(1, max(len(lab) for lab in labels))
    padded = torch.full((len(labels), width, 5), -1.0)
    flags = torch.zeros(len(labels), width, dtype=torch.bool)
    for i, (lab, flag) in enumerate(zip(labels, difficult)):
        padded[i, :len(lab)] = lab.float()
        flags[i, :len(flag)] = torch.tensor(flag, dtype=torch.bool)
    return DetectionData(torch.stack(images), padded, flags, names, tuple(files))


@dataclasses.dataclass(frozen=True)
class DatasetReport:
    """What validate_dataset found. Introduced in 11_your_own_data.

    problems: one dict per problem (file, where, problem, fix); none means the
    data can be trained on. classes: one dict per class (boxes, images, box
    sides in model pixels, the share of boxes some anchor overlaps with IoU >= 0.5).
    """
    path: str
    num_images: int
    num_without_objects: int
    problems: tuple
    classes: tuple
    anchor_sides: tuple

    @property
    def ok(self):
        return not self.problems

    def __str__(self):
        lines = [f"{self.path}: {self.num_images} images, "
                 f"{self.num_without_objects} without objects, {len(self.problems)} problem(s)"]
        if self.problems:
            lines.append(_text_table(self.problems))
        lines.append("\nper class (box side = sqrt(width x height) in the model's pixels):")
        lines.append(_text_table([{key: f"{value:.2f}" if isinstance(value, float) else value
                                   for key, value in row.items()} for row in self.classes]))
        lines.append("anchor sides of the model (px): "
                     + ", ".join(f"{side:.0f}" for side in self.anchor_sides))
        return "\n".join(lines)


def _text_table(rows):
    """Rows (dicts with the same keys) as a left-aligned text table."""
    keys = list(rows[0])
    widths = [max(len(str(key)), *(len(str(row[key])) for row in rows)) for key in keys]
    lines = ["  ".join(str(key).ljust(w) for key, w in zip(keys, widths)).rstrip()]
    lines += ["  ".join(str(row[key]).ljust(w) for key, w in zip(keys, widths)).rstrip()
              for row in rows]
    return "\n".join(lines)


def _class_summary(labels, class_names, config, size):
    """Per-class counts, box sides and anchor coverage for validate_dataset's report."""
    with torch.no_grad():
        anchors = TinySSD(config)(torch.zeros(1, 3, size, size))[0][0]  # (A, 4)
    rows = []
    for class_id, name in enumerate(class_names):
        per_image = [lab[lab[:, 0] == class_id, 1:].float() for lab in labels]
        boxes = torch.cat(per_image) if per_image else torch.zeros(0, 4)
        sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt() * size
        matched = ((box_iou(boxes, anchors).max(dim=1).values >= 0.5).float().mean()
                   if len(boxes) else math.nan)
        rows.append({"class": name, "boxes": len(boxes),
                     "images": sum(len(b) > 0 for b in per_image),
                     "smallest px": sides.min().item() if len(boxes) else math.nan,
                     "median px": sides.median().item() if len(boxes) else math.nan,
                     "largest px": sides.max().item() if len(boxes) else math.nan,
                     "anchor IoU >= 0.5": float(matched)})
    return tuple(rows)


def validate_dataset(path, split="train", image_dir=None, class_names=None, size=256, config=None):
    """Check a dataset before training and report every problem at once. Introduced in
    11_your_own_data.

    Same arguments as read_dataset; config: the SSDConfig whose anchors the
    boxes are compared with (default: default_config). Decodes each image once.
    Returns a DatasetReport: ``print(report)`` shows a table with the file, the
    row or object, what is wrong and what to do, then per-class box counts and
    sizes against the anchor sizes.
    """
    records, problems, names_from_file = _records(path, split, image_dir)
    names = _class_names(records, names_from_file, class_names)
    _, labels, _, _, found = _scan(records, names, size)
    config = config or default_config(num_classes=max(1, len(names)))
    sides = sorted({round(s * size) for scale in config.sizes for s in scale})
    return DatasetReport(str(path), len(records), sum(len(lab) == 0 for lab in labels),
                         tuple(problems + found), _class_summary(labels, names, config, size),
                         tuple(sides))


def _pixel_objects(image, label):
    """(image (H, W, 3) uint8 numpy, [(class id, xmin, ymin, xmax, ymax) in whole pixels])."""
    height, width = image.shape[1:]
    rows = label[label[:, 0] >= 0]
    boxes = (rows[:, 1:] * torch.tensor([width, height, width, height])).round().long()
    return (image.permute(1, 2, 0).numpy(),
            [(int(c), *b) for c, b in zip(rows[:, 0].tolist(), boxes.tolist())])


def _write_voc(root, split, images, labels, class_names):
    """One split as VOC: Annotations/<id>.xml, JPEGImages/<id>.png, ImageSets/Main/<split>.txt."""
    (root / "JPEGImages").mkdir(exist_ok=True)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = [f"{split}_{i:06d}" for i in range(len(images))]
    for image_id, image, label in zip(ids, images, labels):
        pixels, objects = _pixel_objects(image, label)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.png",
                                     compress_level=_PNG_COMPRESSION)
        xml = [f"<annotation><filename>{image_id}.png</filename>"
               f"<size><width>{pixels.shape[1]}</width><height>{pixels.shape[0]}</height>"
               "<depth>3</depth></size>"]
        # VOC: 1-based, xmax is the last pixel inside
        for class_id, xmin, ymin, xmax, ymax in objects:
            xml.append(f"<object><name>{class_names[class_id]}</name><difficult>0</difficult>"
                       f"<bndbox><xmin>{xmin + 1}</xmin><ymin>{ymin + 1}</ymin>"
                       f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(xml) + "</annotation>\n")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def _write_coco(root, split, images, labels, class_names):
    """One split as COCO: <split>.json and images/."""
    (root / "images").mkdir(exist_ok=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]}
    for index, (image, label) in enumerate(zip(images, labels)):
        pixels, objects = _pixel_objects(image, label)
        name = f"images/{split}_{index:06d}.png"
        Image.fromarray(pixels).save(root / name, compress_level=_PNG_COMPRESSION)
        coco["images"].append({"id": index + 1, "file_name": name, "width": pixels.shape[1],
                               "height": pixels.shape[0]})
        for class_id, xmin, ymin, xmax, ymax in objects:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": index + 1,
                                        "category_id": class_id + 1, "iscrowd": 0,
                                        "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                                        "area": (xmax - xmin) * (ymax - ymin)})
    (root / f"{split}.json").write_text(json.dumps(coco))


def _write_csv_dataset(root, split, images, labels, class_names):
    """One split as CSV: <split>.csv (a row per box, pixels) and images/."""
    (root / "images").mkdir(exist_ok=True)
    rows = [_CSV_DATASET_HEADER]
    for index, (image, label) in enumerate(zip(images, labels)):
        pixels, objects = _pixel_objects(image, label)
        name = f"images/{split}_{index:06d}.png"
        Image.fromarray(pixels).save(root / name, compress_level=_PNG_COMPRESSION)
        rows += ([(name, class_names[c], *box) for c, *box in objects]
                 or [(name, "", "", "", "", "")])
    with open(root / f"{split}.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


# The formats export_dataset writes: name -> writer(root, split, images, labels, class_names).
_WRITERS = {"voc": _write_voc, "coco": _write_coco, "csv": _write_csv_dataset}


def export_dataset(root, fmt, splits, class_names):
    """Write in-memory splits as a VOC folder, COCO JSON files or CSV files. Introduced in
    11_your_own_data.

    splits: {split name: (images uint8 (N, 3, H, W), labels (N, G, 5) normalised)};
    boxes are rounded to whole pixels. fmt "voc": root/Annotations/<id>.xml,
    JPEGImages/<id>.png, ImageSets/Main/<split>.txt. "coco": root/<split>.json
    and root/images/. "csv": root/<split>.csv and root/images/. Written
    atomically; an existing folder is replaced only if the series made it.
    """
    if fmt not in _WRITERS:
        raise ConfigError(f"export_dataset: fmt must be one of {sorted(_WRITERS)}, got {fmt!r}")
    digest = hashlib.sha256(repr(class_names).encode())
    for images, labels in splits.values():
        digest.update(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
    writer = _WRITERS[fmt]

    def write(tmp):
        for split, (images, labels) in splits.items():
            writer(tmp, split, images, labels, class_names)
    params = dict(kind=f"{fmt}-export", version=_FORMAT_VERSION, content=digest.hexdigest()[:16])
    return build_atomically(root, params, write)


# 11b. Detection on a folder of photos, from a notebook or the shell

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def draw_detections(pixels, detections, class_names=None, colors=_DETECTION_COLORS):
    """A PIL copy of uint8 (3, H, W) pixels with detections (k, 6) in pixels drawn and labelled
    as show_detections does. Introduced in 11_your_own_data.

    Boxes are drawn first and labels after them, the best detection's last, so a label is covered
    only by a better one's.
    """
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    rgb = [tuple(round(255 * v) for v in matplotlib.colors.to_rgb(c)) for c in colors]  # PIL
    rows = detections.tolist()  # best first
    for class_id, _, *box in rows:  # every box first, so that no box is drawn across a label
        draw.rectangle(box, outline=rgb[int(class_id) % len(rgb)], width=2)
    for class_id, score, *box in reversed(rows):  # labels weakest first: the best one ends on top
        text = f"{_class_name(class_names, class_id)} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        x = min(max(0, box[0]), image.width - (right - left) - 4)  # keep the label inside
        y = box[1] - (bottom - top) - 4 if box[1] >= bottom - top + 4 else box[1]
        draw.rectangle([x, y, x + right - left + 4, y + bottom - top + 4],
                       fill=rgb[int(class_id) % len(rgb)])
        ink = (0, 0, 0) if _is_light(colors[int(class_id) % len(colors)]) else (255, 255, 255)
        draw.text((x + 2 - left, y + 2 - top), text, fill=ink)
    return image


def _image_files(sources):
    """Image files from paths and folders (a folder's images in name order), each file once.

    A missing path raises FileNotFoundError. ``a.png`` and ``./a.png``, or a file also
    found in a folder given, are one image.
    """
    files, seen = [], set()
    for source in map(pathlib.Path, sources):
        if not _exists(source):
            raise FileNotFoundError(f"{source} does not exist; nothing was written")
        found = sorted(p for p in source.iterdir()
                       if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()) \
            if source.is_dir() else [source]
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    return files


def _drawing_names(files):
    """A distinct file name per image for its drawing, also where names differ only in case.

    <stem>_detections.png where that is unique; where stems clash (x.jpg and x.png, p/a.jpg and
    q/p/a.jpg), the image's path from the images' common folder, with / and . as _.
    """
    names = [f"{path.stem}_detections.png" for path in files]
    clash = {n.casefold() for n in names if [m.casefold() for m in names].count(n.casefold()) > 1}
    if clash:
        common = pathlib.Path(os.path.commonpath([path.resolve().parent for path in files]))
        names = [f"{str(path.resolve().relative_to(common)).replace(os.sep, '_').replace('.', '_')}"
                 f"_detections.png" if name.casefold() in clash else name
                 for path, name in zip(files, names)]
    taken = [name.casefold() for name in names]
    return [name if taken.count(name.casefold()) == 1 else f"{i}_{name}"
            for i, name in enumerate(names)]


def _check_out_dir(out_dir, sources, names):
    """Refuse an output folder that is a file, an input folder, another helper's folder, or that
    holds a file of these names the series did not write (or that changed since). Returns its
    recorded files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; nothing was written. "
                              "Pass a folder for the drawn images and detections.csv.")
    for source in map(pathlib.Path, sources):
        if source.is_dir() and out_dir.resolve().is_relative_to(source.resolve()):
            raise FileExistsError(f"{out_dir} is (inside) the input folder {source}; "
                                  "nothing was written. "
                                  "Pass another folder, so that drawings are never read as photos.")
    manifest = _read_manifest(out_dir) if out_dir.is_dir() else None
    foreign = out_dir / _MANIFEST_FILE
    if manifest is None and (foreign.exists() or foreign.is_symlink()):
        raise FileExistsError(f"{foreign} was not written by the series; nothing was written. "
                              "Choose another output folder, or move that file away.")
    if manifest is not None and manifest.get("kind") != "detections":
        raise FileExistsError(f"{out_dir} holds a {manifest.get('kind')} the series made; "
                              "nothing was written. Pass another folder.")
    recorded = dict(manifest["files"]) if manifest is not None else {}
    found = [(out_dir / name, _why_not_ours(out_dir / name, recorded.get(name), "detect_folder"))
             for name in names if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    found = [(path, why) for path, why in found if why is not None]
    if found:
        raise FileExistsError(f"{out_dir} holds files detect_folder would replace: "
                              f"{_listing(out_dir, found)}. Nothing was written. Choose another "
                              "output folder, or move them away.")
    return recorded


def detect_folder(net, sources, out_dir, class_names=None, threshold=0.5, echo=None):
    """Detect on image files and folders; save drawn copies and detections.csv. Introduced in
    11_your_own_data.

    Writes out_dir/<name>_detections.png per image (a distinct name per image, see
    _drawing_names) and out_dir/detections.csv (image, class, score, xmin, ymin, xmax,
    ymax in the image's pixels), and records them in out_dir's manifest. A file there
    that detect_folder did not write, or that was changed since, is never replaced:
    FileExistsError before anything is written. An unreadable image is reported (echo)
    and skipped; if none can be read, DatasetError. Returns the CSV rows.
    """
    out_dir, files = pathlib.Path(out_dir), _image_files(sources)
    if not files:
        raise DatasetError(f"no image files ({', '.join(_IMAGE_SUFFIXES)}) in "
                           f"{', '.join(map(str, sources))}")
    _check_detect_options(threshold)
    names = _drawing_names(files)
    recorded = _check_out_dir(out_dir, sources, [*names, "detections.csv"])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, read = [], 0
    try:
        for path, name in zip(progress_bar(files, desc="detecting", disable=echo is not None),
                              names):
            try:
                pixels = open_image(path, str(path), exif="apply")
                detections = detect(net, pixels, threshold)
            except DatasetError as error:
                (echo or print)(f"skipped: {error}")
                continue
            draw_detections(pixels, detections, class_names).save(out_dir / name)
            recorded[name], read = _file_record(out_dir / name), read + 1
            for class_id, score, *box in detections.tolist():
                rows.append([str(path), _class_name(class_names, class_id), f"{score:.3f}",
                             *(f"{v:.1f}" for v in box)])
                if echo is not None:
                    echo(f"{path}\t{rows[-1][1]}\t{score:.2f}\t" + " ".join(rows[-1][3:]))
        if read == 0:
            raise DatasetError(f"none of the {len(files)} images could be read, "
                               "so nothing was drawn")
        with open(out_dir / "detections.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([("image", "class", "score",
                                                           *_CSV_DATASET_HEADER[2:]),
                                                          *rows])
        recorded["detections.csv"] = _file_record(out_dir / "detections.csv")
    finally:  # also after Ctrl-C: what was drawn is recorded, so a new run may replace it
        _write_manifest(out_dir, "detections", files=recorded)
    return rows


# ---------------------------------------------------------------------------
# 12. Speed and deployment: folded batch norm, one ONNX graph, torchvision's SSDlite
#     (12_speed_and_deployment)
# ---------------------------------------------------------------------------



def fold_batch_norm(net):
    """A copy of ``net`` for inference, batch norm folded into the convolutions. Introduced in
    12_speed_and_deployment.

    Each BatchNorm2d that follows a Conv2d in an nn.Sequential is merged into it: in eval mode a
    batch norm is a fixed scale and shift per channel, so it can go into the convolution's weights
    and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). The same outputs up to rounding, one
    pass over each feature map fewer. The copy is in eval mode, on net's device; net is unchanged.
    Not for training, where batch norm uses each batch's own statistics.
    """
    folded = copy.deepcopy(net).eval()
    for block in folded.modules():
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1):
                if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                    block[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(block[i], block[i + 1])
                    block[i + 1] = nn.Identity()
    return folded


# A deployed detector should take an image and return detections, with nothing left for the caller
# to decode. ExportableDetector is TinySSD plus multibox_detection's steps for one image, written so
# that torch.export can trace them: no Python branch on a tensor's value, and NMS as one
# torchvision.ops.nms call, which the exporter turns into ONNX's NonMaxSuppression.

_ONNX_MARKER = "tinyssd-onnx"  # metadata key: export_onnx replaces only files that carry it


class ExportableDetector(nn.Module):
    """TinySSD and its decoding in one module, for torch.onnx.export. Introduced in
    12_speed_and_deployment.

    Input (1, 3, H, W) float pixels 0..255, H and W at least 64. Output (k, 6) rows (class, score,
    xmin, ymin, xmax, ymax), boxes normalised to 0..1, best first: what multibox_detection(...,
    pre_nms_top_k=top_k) gives for the image (softmax, each anchor's best class, the top_k anchors,
    offset decoding, NMS per class), without its class -1 rows.
    """

    def __init__(self, net, nms_threshold=0.5, pos_threshold=0.009999999, top_k=400):
        super().__init__()
        self.net, self.nms_threshold, self.pos_threshold, self.top_k = (
            net, nms_threshold, pos_threshold, top_k)

    def forward(self, X):
        anchors, cls_preds, bbox_preds = self.net(X)
        probs = torch.softmax(cls_preds.float(), dim=2)[0]  # (A, C + 1)
        scores, class_ids = probs[:, 1:].max(dim=1)  # (A,): each anchor's best object class
        scores, top = scores.topk(min(self.top_k, scores.shape[0]))  # (k,), best first
        class_ids = class_ids[top]
        boxes = offset_inverse(anchors[0, top], bbox_preds.float().reshape(-1, 4)[top])  # (k, 4)
        # NMS per class in one call: move each class's boxes so far apart that no two classes
        # overlap
        shifted = boxes + class_ids[:, None].to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
        kept = torchvision.ops.nms(shifted, scores, self.nms_threshold)  # (n,), best first
        kept = kept[scores[kept] >= self.pos_threshold]
        return torch.cat((class_ids[kept, None].to(boxes.dtype), scores[kept, None], boxes[kept]),
                         dim=1)


def export_onnx(net, path, nms_threshold=0.5, max_side=2048):
    """Write ``net`` with its decoding (ExportableDetector) as one ONNX file. Introduced in
    12_speed_and_deployment.

    The graph takes ``image`` (1, 3, H, W) float 0..255 with 64 <= H, W <= max_side and returns
    ``detections`` (k, 6) as ExportableDetector. It is exported with torch.export (``dynamo=True``);
    the file is written atomically and replaces only a file that export_onnx wrote. ``net`` itself
    is not moved or changed. Returns the path.
    """
    import onnx  # noqa: PLC0415 (only this section needs it)

    path = pathlib.Path(path)
    if path.is_symlink() or (path.exists() and not _is_our_onnx(path)):
        raise FileExistsError(f"{path} exists and was not written by export_onnx; nothing was "
                              "written. Choose another path, or move that file away first.")
    detector = ExportableDetector(copy.deepcopy(net).cpu().float().eval(), nms_threshold)
    side = {2: torch.export.Dim("height", min=64, max=max_side),
            3: torch.export.Dim("width", min=64, max=max_side)}
    # the exporter's progress lines
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(detector, (torch.zeros(1, 3, 256, 256),), dynamo=True,
                                    input_names=["image"], output_names=["detections"],
                                    dynamic_shapes={"X": side})
    model = program.model_proto
    onnx.helper.set_model_props(model, {_ONNX_MARKER: json.dumps(
        {"num_classes": net.config.num_classes, "class_names": net.config.class_names})})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    finally:  # after an error or Ctrl-C the temporary file is gone too
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _is_our_onnx(path):
    """True if ``path`` is an ONNX file whose metadata carries _ONNX_MARKER."""
    import onnx  # noqa: PLC0415

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (not ONNX at all)
        return False
    return any(prop.key == _ONNX_MARKER for prop in model.metadata_props)


def detect_onnx(session, image, threshold=0.5, size=256, keep_aspect=True, max_size=1024):
    """``detect`` with an onnxruntime session of export_onnx's file. Introduced in
    12_speed_and_deployment.

    session: onnxruntime.InferenceSession. The image is prepared exactly as detect prepares it;
    returns (k, 6) rows (class, score, xmin, ymin, xmax, ymax) in the image's pixels, best first,
    score >= threshold.
    """
    X, (height, width) = _model_input(image, size, keep_aspect, max_size)
    (rows,) = session.run(None, {"image": X.numpy()})
    rows = torch.from_numpy(rows)
    return _in_pixels(rows[rows[:, 1] >= threshold], height, width)


def detection_gaps(ours, theirs, width, height):
    """How far apart two sets of detections are: (largest box gap, largest score gap). Introduced in
    12_speed_and_deployment.

    ours, theirs: (k, 6) rows (class, score, xmin, ymin, xmax, ymax) in the pixels of a width x
    height image, as detect and detect_onnx return. Rows are paired one to one within their class so
    that the box gaps are smallest overall (scipy's linear_sum_assignment), since two detectors may
    order near-equal scores differently. A box gap is a pair's largest coordinate difference as a
    fraction of the image's side. Raises ValueError if the two do not hold the same number of rows
    of each class.

    Two runtimes round differently (scores differ by a few 1e-7), so where two anchors' scores tie
    that closely, either may come first: at the 400th place of the top-k cut, or in NMS between
    overlapping boxes. The two then keep a different box of the pair. Such ties are among low scores
    (a flat patch of image, an untrained model).
    """
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (only this check needs it)

    def per_class(rows):
        return {int(c): int(n) for c, n in zip(*rows[:, 0].unique(return_counts=True))}

    if per_class(ours) != per_class(theirs):
        raise ValueError(f"not the same detections: rows per class {per_class(ours)} against "
                         f"{per_class(theirs)}. If the extra rows have low scores, look for a tie "
                         "(see detection_gaps' docstring).")
    if len(ours) == 0:
        return 0.0, 0.0
    scale = torch.tensor([width, height, width, height], dtype=ours.dtype)
    gaps = ((ours[:, None, 2:] - theirs[None, :, 2:]) / scale).abs().amax(-1)  # (k, k)
    other_class = ours[:, None, 0] != theirs[None, :, 0]
    rows, cols = linear_sum_assignment((gaps + 1e6 * other_class).numpy())
    return float(gaps[rows, cols].max()), float((ours[rows, 1] - theirs[cols, 1]).abs().max())


def latency_ms(calls, rounds=5, runs=20, warmup=2):
    """Time the functions of ``calls`` ({label: fn}) in turns, so that a busy moment of the
    machine hits them all alike. Introduced in 12_speed_and_deployment.

    In each of ``rounds`` rounds, each function makes ``warmup`` untimed calls, then ``runs``
    timed ones. Returns {label: {"p50": ..., "p90": ..., "round p50": [...]}}: the median and
    90th percentile over all its timed calls, and its median in each round, in milliseconds.
    """
    times = {label: [] for label in calls}  # label -> one list of timed calls per round
    for _ in range(rounds):
        for label, fn in calls.items():
            for _ in range(warmup):
                fn()
            round_times = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                round_times.append((time.perf_counter() - start) * 1000)
            times[label].append(round_times)
    return {label: {"p50": float(np.percentile(np.concatenate(t), 50)),
                    "p90": float(np.percentile(np.concatenate(t), 90)),
                    "round p50": [float(np.median(r)) for r in t]} for label, t in times.items()}


# 12b. The same data through torchvision's SSDlite, trained from scratch for the same time
#  torchvision's detection models take a list of float images in 0..1 and, for training, a list of
# targets with boxes in pixels and labels counted from 1 (0 is their background). These three
# helpers translate our tensors, train such a model for a fixed number of seconds and turn its
# detections back into our rows, so that the series' own evaluate_map scores both models.

def ssdlite_targets(labels, size):
    """Our labels (B, G, 5), normalised, -1 padding -> torchvision's targets. Introduced in
    12_speed_and_deployment.

    Returns a list of B dicts: "boxes" (g, 4) float in pixels of a ``size`` x ``size`` image,
    "labels" (g,) int64 counted from 1.
    """
    targets = []
    for label in labels:
        real = label[label[:, 0] >= 0]  # (g, 5) without padding
        targets.append({"boxes": real[:, 1:] * size, "labels": real[:, 0].long() + 1})
    return targets


def train_for_seconds(model, train_data, seconds, device, lr=0.025, batch_size=32, seed=0,
                      progress=True):
    """Train a torchvision detection model for ``seconds`` of wall-clock time. Introduced in
    12_speed_and_deployment.

    train_data: (images (N, 3, S, S) uint8, labels (N, G, 5)). SGD with momentum 0.9 and weight
    decay 4e-5 (as torchvision's SSDlite recipe, lr scaled to the batch); the learning rate warms up
    linearly over the first epoch's steps (as torchvision's detection reference does) under a cosine
    that reaches 0 at ``seconds``. Flips as train_ssd's; freed memory kept, as train_ssd keeps it
    (keep_freed_memory); bf16 autocast where pick_precision chooses it. A non-finite loss raises
    FloatingPointError naming the step and the images; the model is left as it was before that
    batch. Returns {"steps", "examples", "seconds", "examples_per_s", "loss" and "lr" (per step)}.
    """
    images, labels = train_data
    use_bf16 = pick_precision(device)[0]
    keep_freed_memory()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    warmup_steps = math.ceil(len(images) / batch_size)  # one epoch
    history, start = {"steps": 0, "examples": 0, "loss": [], "lr": []}, time.perf_counter()
    with progress_bar(total=round(seconds), desc="training (s)", disable=not progress) as bar:
        while time.perf_counter() - start < seconds:
            for idx, X, Y in _batches(images, labels, batch_size, generator):
                elapsed = (time.perf_counter() - start) / seconds  # share of the budget spent
                if elapsed >= 1:
                    break
                warmup = min(1.0, (history["steps"] + 1) / warmup_steps)
                history["lr"].append(lr * warmup * 0.5 * (1 + math.cos(math.pi * elapsed)))
                for group in optimizer.param_groups:
                    group["lr"] = history["lr"][-1]
                X, Y = hflip_batch(X, Y, generator)
                history["loss"].append(
                    _detection_step(model, optimizer, X, Y, device, use_bf16, idx))
                history["steps"], history["examples"] = (history["steps"] + 1,
                                                         history["examples"] + len(X))
                bar.update(round(time.perf_counter() - start) - bar.n)
    history["seconds"] = time.perf_counter() - start
    history["examples_per_s"] = history["examples"] / history["seconds"]
    return history


def _detection_step(model, optimizer, images, labels, device, use_bf16, ids):
    """One SGD step of a torchvision detection model on a batch; the summed loss as a float."""
    # batch-norm statistics
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    X = list((images.float() / 255).to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        losses = model(X, [{k: v.to(device) for k, v in t.items()}
                           for t in ssdlite_targets(labels, images.shape[-1])])
    loss = sum(losses.values()).float()
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        _undo_forward(model, optimizer, saved)
        raise FloatingPointError(f"the loss is {loss.item()} for the batch of images "
                                 f"{ids.tolist()[:10]} (indices into train_data); the model is "
                                 "left as it was before it. Lower lr.")
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def detect_torchvision(model, images, batch_size=50):
    """A torchvision detection model's detections as our rows. Introduced in
    12_speed_and_deployment.

    images (N, 3, H, W) uint8. Returns a list of N tensors (k, 6): (class, score, xmin, ymin, xmax,
    ymax), classes from 0, boxes normalised to 0..1, best first: what detect_images returns for a
    TinySSD.
    """
    device = next(model.parameters()).device
    model.eval()
    scale = torch.tensor([images.shape[-1], images.shape[-2]] * 2)
    out = []
    for i in range(0, len(images), batch_size):
        for found in model(list((images[i:i + batch_size].float() / 255).to(device))):
            out.append(torch.cat((found["labels"][:, None].float().cpu() - 1,
                                  found["scores"][:, None].cpu(),
                                  found["boxes"].cpu() / scale), dim=1))
    return out


# The shell commands (11_your_own_data, 12_speed_and_deployment): each is a function of the
# parsed arguments; main() parses them and turns the series' errors into one line and exit code 2.

def _number_in(text, inside, what):
    """float(text) if inside(value), else argparse's error saying it must be `what` (NaN too)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not inside(value):  # False for NaN
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _score(text):
    """argparse type for --threshold: a number in (0, 1]."""
    return _number_in(text, lambda v: 0 < v <= 1, "a score in (0, 1]")


def _fraction(text):
    """argparse type for --val-fraction: a number in (0, 1)."""
    return _number_in(text, lambda v: 0 < v < 1, "a fraction in (0, 1)")


def _training_splits(args):
    """(train DetectionData-like (images, labels), val (images, labels), class names) for `train`.

    DATA is validated first: a dataset with problems is refused, pointing to `validate`.
    """
    for path, split in ((args.data, args.split), (args.val, args.val_split)):
        if path is not None:
            report = validate_dataset(path, split=split, image_dir=args.image_dir)
            if not report.ok:
                raise DatasetError(f"{path} has {len(report.problems)} problem(s); nothing was "
                                   f"trained. `python -m ssd_helpers validate {path}` lists them, "
                                   "each with what to do.")
    data = read_dataset(args.data, split=args.split, image_dir=args.image_dir)
    if args.val is not None:
        val = read_dataset(args.val, split=args.val_split, image_dir=args.image_dir,
                           class_names=data.class_names)
        return (data.images, data.labels), (val.images, val.labels), data.class_names
    order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(args.seed))
    num_val = max(1, round(len(order) * args.val_fraction))
    if num_val >= len(order):
        raise DatasetError(f"{args.data} holds {len(order)} image(s): too few to hold out "
                           f"{args.val_fraction:.0%} for validation. Pass --val with a second "
                           "dataset.")
    val, train = order[:num_val], order[num_val:]
    return ((data.images[train], data.labels[train]), (data.images[val], data.labels[val]),
            data.class_names)


def _train_command(args):
    """`train DATA --epochs N --out MODEL.pt`: train a TinySSD, one line and one checkpoint per
    epoch, so that Ctrl-C leaves the last complete epoch's model in MODEL.pt, and --resume goes on
    from it. Under torchrun each process trains on its part of every batch."""
    train, val, class_names = _training_splits(args)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    set_seed(config.seed)
    out = pathlib.Path(args.out)
    net, done = _model_to_train(out, args.resume, config, class_names)
    if done == config.epochs:
        print(f"{out} already holds all {done} epochs of this run: nothing to train")
        return 0
    device, rank = _start_processes(args.device)
    saved_epochs = [done] if done else []  # the epochs whose model is in out

    def end_of_epoch(epoch, history):
        saved_epochs.append(epoch + 1)
        tqdm.tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {history['loss'][-1]:.3f}, "
                        f"validation AP@0.5 {history['AP50'][-1]:.3f}, "
                        f"AP@[.5:.95] {history['AP'][-1]:.3f} ({history['time'][-1]:.0f} s)")
    world = _rank_and_world()[1]
    if rank == 0:
        print(f"training on {len(train[0])} images, validating on {len(val[0])}, classes "
              f"{', '.join(class_names)}, on {device}"
              + (f" in {world} processes" if world > 1 else "")
              + (f"; resuming {out} after epoch {done}" if done else ""))
    try:
        history = train_ssd(net, train, config, device, val_data=val, evaluate=evaluate_map,
                            checkpoint=out, resume=out if args.resume else None,
                            on_epoch_end=end_of_epoch)
    except (KeyboardInterrupt, FloatingPointError) as stop:
        kept = (f"{out} holds the model of epoch {saved_epochs[-1]}, the last complete one; "
                "--resume goes on from it" if saved_epochs else
                f"no epoch was complete, so nothing was saved to {out}")
        if isinstance(stop, KeyboardInterrupt):
            print(f"\nstopped: {kept}" if rank == 0 else "", file=sys.stderr)
            return 130
        print(f"error: {stop}" + (f"\n{kept}" if rank == 0 else ""), file=sys.stderr)
        return 2
    finally:
        if _distributed_started():
            torch.distributed.destroy_process_group()
    if rank == 0:  # the others have nothing to add
        print(f"done: {config.epochs} epochs in {sum(history['time']) / 60:.1f} min; validation "
              f"AP@0.5 {history['AP50'][-1]:.3f}, AP@[.5:.95] {history['AP'][-1]:.3f}; model in "
              f"{out}")


def _model_to_train(out, resume, config, class_names):
    """(TinySSD, epochs done) for `train`: a new model (0), or with --resume the one in out and the
    epochs it holds, once out is known to be a run of this config on these classes."""
    if not resume:  # train_ssd refuses an out it may not write before its first step
        return TinySSD(default_config(class_names=class_names)), 0
    if not out.exists():
        raise FileNotFoundError(f"--resume: {out} does not exist, so there is no run to go on "
                                "with. Drop --resume to start one.")
    net, saved = load_model(out)
    _check_same_classes(out, saved.class_names, class_names)
    return net, len(_training_state(out, config)["history"]["loss"])


def _check_same_classes(path, saved, names):
    """DatasetError unless the model at path was trained on classes named as the data's."""
    if tuple(saved or ()) != tuple(names):
        trained_on = f"the classes {', '.join(saved)}" if saved else "classes without names"
        raise DatasetError(f"{path} was trained on {trained_on}, and the data hold "
                           f"{', '.join(names)}: resume with the same data, or start a new run.")


def _start_processes(device_name):
    """(device, rank) for `train`: under torchrun, torch.distributed started with gloo on a CPU or
    nccl on CUDA, one GPU per process; (pick_device(device_name), 0) otherwise."""
    try:
        device = pick_device(device_name)
        torch.empty(0, device=device)  # a device this machine lacks fails here, not mid-run
    except (RuntimeError, AssertionError) as error:
        raise ConfigError(f"--device {device_name}: {error}") from None
    if "LOCAL_RANK" not in os.environ:  # not under torchrun
        return device, 0
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise ConfigError(f"LOCAL_RANK is set but not {', '.join(missing)}: start several "
                          "processes with torchrun, which sets them all, or unset LOCAL_RANK")
    if device.type not in ("cpu", "cuda") or device.index is not None:
        raise ConfigError(f"under torchrun, --device is cpu or cuda (each process then takes the "
                          f"GPU of its LOCAL_RANK), not {device}")
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started a process for GPU {local_rank}, and this machine "
                              f"has {torch.cuda.device_count()}: pass --nproc_per_node="
                              f"{torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, torch.distributed.get_rank()


def _evaluate_command(args):
    """`evaluate MODEL.pt DATA`: VOC AP@0.5 and COCO AP@[.5:.95], over all classes and per class;
    with --out, the same table as a CSV (a new file: an existing one is never replaced)."""
    out = None if args.out is None else pathlib.Path(args.out)
    if out is not None and (out.exists() or out.is_symlink()):
        raise FileExistsError(f"{out} exists; nothing was written. Choose a new file for --out.")
    net, config = load_model(args.model)
    data = read_dataset(args.data, split=args.split, image_dir=args.image_dir,
                        class_names=config.class_names)
    detections = detect_images(net, data.images)
    num_classes = config.num_classes
    voc = mean_average_precision(detections, data.labels, 0.5, num_classes, "voc")
    coco = mean_average_precision(detections, data.labels, np.linspace(0.5, 0.95, 10),
                                  num_classes, "coco")
    rows = [("all classes", voc["map"], coco["map"])]
    rows += [(name, voc["per_class"].get(c, math.nan), coco["per_class"].get(c, math.nan))
             for c, name in enumerate(config.class_names or range(num_classes))]
    print(f"{len(data.images)} images of {args.data}")
    print(_text_table([{"class": str(name), "VOC AP@0.5": f"{a:.3f}",
                        "COCO AP@[.5:.95]": f"{b:.3f}"} for name, a, b in rows]))
    if out is not None:
        table = io.StringIO()
        csv.writer(table, lineterminator="\n").writerows(
            [("class", "voc_ap50", "coco_ap"), *[(n, f"{a:.6f}", f"{b:.6f}") for n, a, b in rows]])
        out.write_text(table.getvalue(), encoding="utf-8")
        print(f"written to {out}")


def _export_command(args):
    """`export MODEL.pt --onnx FILE`: export_onnx, then run the file with ONNX Runtime on the
    series' test scene at three shapes and compare with detect before reporting success."""
    import onnxruntime  # noqa: PLC0415 (only this command needs it)

    net, _ = load_model(args.model, device=torch.device("cpu"))
    path = export_onnx(net, args.onnx)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        make_test_scene(pathlib.Path(tmp) / "scene.jpg", pathlib.Path(tmp) / "scene.csv")
        scene = to_image_tensor(pathlib.Path(tmp) / "scene.jpg")  # (3, 256, 256) uint8
    worst, compared = (0.0, 0.0), 0
    for height, width in ((256, 256), (384, 256), (256, 448)):  # square, portrait, landscape
        image = F.interpolate(scene[None].float(), size=(height, width), mode="bilinear")[0]
        image = image.round().clamp(0, 255).to(torch.uint8)
        ours = detect(net, image, threshold=args.threshold)
        gaps = detection_gaps(ours, detect_onnx(session, image, threshold=args.threshold), width,
                              height)
        worst, compared = tuple(max(a, b) for a, b in zip(worst, gaps)), compared + len(ours)
    if worst[0] > 1e-3 or worst[1] > 1e-3:
        raise CheckpointError(f"{path} differs from detect by {worst[0]:.2g} of the image's side "
                              f"and {worst[1]:.2g} in score; do not ship it. Please report this.")
    print(f"wrote {path}; ONNX Runtime matches detect on the test scene at 3 shapes: "
          f"{compared} detections with score >= {args.threshold}, largest box gap "
          f"{worst[0]:.1e} of a side, score gap {worst[1]:.1e}")


def _command_parser():
    """The argparse parser of `python -m ssd_helpers`."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m ssd_helpers",
                                     description="TinySSD from the shell: from labelled photos to "
                                     "a validated dataset, a model, an AP table and an ONNX file.")
    commands = parser.add_subparsers(dest="command", required=True)
    data_help = "a VOC folder, a COCO .json or a .csv"
    check = commands.add_parser("validate", help="report every problem of a dataset")
    check.add_argument("path", help=data_help)
    train = commands.add_parser(
        "train", help="train a TinySSD on a dataset",
        epilog="On several processes: torchrun --standalone --nproc_per_node=N -m ssd_helpers "
        "train ... (each process trains on its part of every batch; the first one prints and "
        "saves).")
    train.add_argument("data", help=data_help)
    train.add_argument("--epochs", type=int, default=20, help="default 20")
    train.add_argument("--out", required=True, help="the model file, saved after every epoch")
    train.add_argument("--val", help="a second dataset to validate on (default: hold out "
                       "--val-fraction of DATA)")
    train.add_argument("--val-split", default="val", help="VOC split of --val (default val)")
    train.add_argument("--val-fraction", type=_fraction, default=0.1,
                       help="share of DATA held out for validation without --val (default 0.1)")
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                       help="images per step; under torchrun split among the processes "
                       f"(default {TrainConfig.batch_size})")
    train.add_argument("--lr", type=float, default=TrainConfig.lr,
                       help=f"peak learning rate (default {TrainConfig.lr})")
    train.add_argument("--seed", type=int, default=0, help="same seed, same model (default 0)")
    train.add_argument("--device", help="cpu, cuda or mps (default: the best there is)")
    train.add_argument("--resume", action="store_true", help="go on with the unfinished run "
                       "saved in --out, with the same DATA and options")
    evaluate = commands.add_parser("evaluate", help="AP of a model on a dataset, per class")
    evaluate.add_argument("model", help="a model file from train")
    evaluate.add_argument("data", help=data_help)
    evaluate.add_argument("--out", help="also write the table to this new CSV file")
    export = commands.add_parser("export", help="one ONNX file: the model with its decoding and "
                                 "NMS, checked against detect")
    export.add_argument("model", help="a model file from train")
    export.add_argument("--onnx", required=True, help="the ONNX file to write")
    export.add_argument("--threshold", type=_score, default=0.3, help="lowest score compared")
    run = commands.add_parser("detect", help="detect objects in images and folders")
    run.add_argument("model", help="a model file from train")
    run.add_argument("images", nargs="+", help="image files or folders of images")
    run.add_argument("--out", required=True, help="a folder for the drawn images and "
                     "detections.csv (not an input folder)")
    run.add_argument("--threshold", type=_score, default=0.5, help="lowest score to keep, in "
                     "(0, 1] (default 0.5)")
    for command in (check, train, evaluate):
        command.add_argument("--split", default="train", help="VOC split (default train)")
        command.add_argument("--image-dir", help="where the images of a COCO or CSV file are "
                             "(default: the file's folder)")
    return parser


def _detect_command(args):
    """`detect MODEL IMAGES... --out DIR`: detect_folder."""
    net, config = load_model(args.model)
    rows = detect_folder(net, args.images, args.out, config.class_names, args.threshold,
                         echo=print)
    print(f"{len(rows)} detections; drawn images and detections.csv in {args.out}",
          file=sys.stderr)


def _validate_command(args):
    """`validate PATH`: validate_dataset's report; exit status 1 if it found problems."""
    report = validate_dataset(args.path, split=args.split, image_dir=args.image_dir)
    print(report)
    return 0 if report.ok else 1


def main(argv=None):
    """The shell commands: ``python -m ssd_helpers validate|train|evaluate|export|detect``;
    ``--help`` on each. Introduced in 11_your_own_data (export: 12_speed_and_deployment).

    Exit status: 0 done; 1 validate found problems; 2 an error (printed as ``error: ...``), such as
    a missing input, data with problems, or an option out of range; 130 stopped by Ctrl-C.
    """
    args = _command_parser().parse_args(argv)
    run = {"validate": _validate_command, "train": _train_command, "detect": _detect_command,
           "evaluate": _evaluate_command, "export": _export_command}[args.command]
    try:
        with _sigterm_as_exit():
            return run(args) or 0
    except (DatasetError, CheckpointError, ConfigError, FileExistsError,
            FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------
# Appendix: how the synthetic images are drawn (used by section 6, not taught)
# ---------------------------------------------------------------------------

# A0. The renderer's constants
#
# Photo-like fruit sprites (a banana and an orange) are drawn procedurally and
# pasted on random crops of real photographs that ship inside scikit-image, so
# nothing is ever downloaded. Conventions of this section:
#
# * Images are numpy arrays (H, W, 3): uint8 in 0..255 when they leave the
#   section, float32 in 0..1 while we work on them.
# * Sprites are float32 (h, w, 4) PREMULTIPLIED RGBA in 0..1: pasting one is
#   ``out = rgb + (1 - alpha) * background``.
# * A pixel belongs to an object when its visible alpha is above _ALPHA_THRESHOLD.
# * Boxes are integer pixels (xmin, ymin, xmax, ymax) with an exclusive upper end
#   (d2l's convention): the box covers columns xmin .. xmax - 1.
# * Class ids: 0 = banana, 1 = orange.

_IMAGE_SIZE = 256
_BANANA, _ORANGE = 0, 1
_ALPHA_THRESHOLD = 0.5
_FORMAT_VERSION = 1
_SUPERSAMPLE = 3           # sprites are drawn at 3x3 samples per pixel
_BANANA_BOX = (34, 73)     # box sides (px) of d2l's real banana labels
_SMALL_BANANA_BOX = (15, 30)
_ORANGE_BOX = (26, 52)
_FRUIT_BANANA_BOX = (30, 64)   # bananas in the multi-object scenes
_MAX_FRUIT = 6                 # fruit scenes hold 0..6 objects
_MAX_ASPECT = 1.5          # largest allowed ratio of the two box sides
_MAX_OUTSIDE = 0.12        # at most 12% of a box may leave the frame per side
_MIN_VISIBLE = 0.4         # drop objects with less than 40% left visible
_MIN_SIDE = 6              # ... or with a visible box side below 6 px
_PNG_COMPRESSION = 1       # fastest zlib level; PNG bytes stay deterministic
_IMAGES_PER_CHUNK = 10     # images a drawing thread takes at a time (about 0.3 s of work)

# Photos inside skimage/data (no network needed), split in two. The datasets
# are drawn on BACKGROUND_FILES only; every test scene and "new photo" uses
# HELD_OUT_FILES, which no model here has seen in training. Colour photos map
# to None; grey ones map to the RGB tint they are coloured with.
BACKGROUND_FILES = (
    ("astronaut.png", None), ("chelsea.png", None), ("coffee.png", None),
    ("motorcycle_left.png", None), ("rocket.jpg", None),
    ("brick.png", (1.0, 0.72, 0.58)), ("grass.png", (0.78, 0.95, 0.55)),
    ("gravel.png", (0.95, 0.88, 0.78)), ("camera.png", (1.0, 0.97, 0.92)),
)
HELD_OUT_FILES = (
    ("ihc.png", None), ("hubble_deep_field.jpg", None), ("retina.jpg", None),
    ("coins.png", (1.0, 0.9, 0.75)), ("moon.png", (0.85, 0.9, 1.0)),
)
_TEST_SCENE_FILES = ("ihc.png", "hubble_deep_field.jpg", "retina.jpg")  # the held-out colour photos

# sRGB colours (0..1) of a banana peel at increasing ripeness.
_RIPENESS_COLOURS = (
    (0.55, 0.66, 0.20),   # green
    (0.80, 0.82, 0.25),   # green-yellow
    (0.97, 0.84, 0.24),   # yellow
    (0.95, 0.79, 0.22),   # ripe, deep yellow
)


# A1. Drawing helpers
def _smoothstep(edge0, edge1, x):
    """Smooth 0->1 ramp between edge0 and edge1 (works if edge0 > edge1).

    x: float array of any shape; returns float32 array of the same shape.
    """
    u = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return (u * u * (3.0 - 2.0 * u)).astype(np.float32)


def _mix(a, b, weight):
    """Linear blend ``a + (b - a) * weight`` with weight (...,) or (..., 1).

    a, b: colour arrays broadcastable to (..., 3); weight in [0, 1].
    """
    if np.ndim(weight) > 0:
        weight = weight[..., None]
    return a + (b - a) * weight


def _sample_noise(grid, u, v):
    """Bilinearly sample a 2-D noise grid at normalised coordinates.

    grid: float32 (gu, gv); u, v: float arrays of equal shape, in [0, 1]
    (values outside are clamped). Returns float32 array shaped like u.
    """
    gu, gv = grid.shape
    x = np.clip(u, 0.0, 1.0) * (gu - 1)
    y = np.clip(v, 0.0, 1.0) * (gv - 1)
    x0 = np.minimum(x.astype(np.int32), gu - 2)
    y0 = np.minimum(y.astype(np.int32), gv - 2)
    fx, fy = _smoothstep(0, 1, x - x0), _smoothstep(0, 1, y - y0)  # rounder blobs
    top = grid[x0, y0] * (1 - fy) + grid[x0, y0 + 1] * fy
    bottom = grid[x0 + 1, y0] * (1 - fy) + grid[x0 + 1, y0 + 1] * fy
    return (top * (1 - fx) + bottom * fx).astype(np.float32)


def _random_light(rng):
    """A random key-light direction: unit float32 vector (x, y, z).

    x points right and y down in the image, z towards the camera; the
    light always comes from the camera's side (z between 0.45 and 0.8).
    """
    azimuth = rng.uniform(0, 2 * math.pi)
    z = rng.uniform(0.45, 0.8)
    r = math.sqrt(1 - z * z)
    return np.array([r * math.cos(azimuth), r * math.sin(azimuth), z],
                    dtype=np.float32)


def _local_grid(canvas_hw, scale, angle, center):
    """Map supersampled canvas pixel centres into an object's local frame.

    canvas_hw: (h, w) of the final sprite in pixels; scale: pixels per
    local unit; angle: rotation in radians (local -> image); center: local
    (x, y) drawn at the canvas centre. Returns float32 arrays (x, y) of
    shape (h * _SUPERSAMPLE, w * _SUPERSAMPLE).
    """
    h, w = canvas_hw
    ys = (np.arange(h * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - h / 2
    xs = (np.arange(w * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - w / 2
    gx, gy = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    c, s = math.cos(angle), math.sin(angle)
    x = (c * gx + s * gy) / scale + center[0]
    y = (-s * gx + c * gy) / scale + center[1]
    return x, y


def _to_local(vector_xy, angle):
    """Rotate an image-space 2-D direction into the local frame (floats)."""
    c, s = math.cos(angle), math.sin(angle)
    return c * vector_xy[0] + s * vector_xy[1], -s * vector_xy[0] + c * vector_xy[1]


def _rotated_extent(points, angle):
    """Bounding-box centre and size of local points after rotation.

    points: float (N, 2) local (x, y). Returns (center_xy, (width, height))
    in local units, the centre given back in local coordinates.
    """
    c, s = math.cos(angle), math.sin(angle)
    rx = c * points[:, 0] - s * points[:, 1]
    ry = s * points[:, 0] + c * points[:, 1]
    mid = np.array([(rx.min() + rx.max()) / 2, (ry.min() + ry.max()) / 2])
    center = np.array([c * mid[0] + s * mid[1], -s * mid[0] + c * mid[1]])
    return center, (rx.max() - rx.min(), ry.max() - ry.min())


def _finish_sprite(linear_rgb, coverage):
    """Turn supersampled linear colour + coverage into a premultiplied sprite.

    linear_rgb: float32 (H*S, W*S, 3) linear-light colour; coverage:
    float32 (H*S, W*S) in [0, 1]. Box-filters S x S blocks (anti-aliasing),
    converts to sRGB (gamma 2.2) and returns float32 (H, W, 4) premultiplied.
    """
    hs, ws = coverage.shape
    h, w, k = hs // _SUPERSAMPLE, ws // _SUPERSAMPLE, _SUPERSAMPLE
    premult = np.concatenate([linear_rgb * coverage[..., None],
                              coverage[..., None]], axis=2)
    small = premult.reshape(h, k, w, k, 4).mean(axis=(1, 3))
    alpha = small[..., 3:]
    straight = np.clip(small[..., :3] / np.maximum(alpha, 1e-6), 0, 1)
    srgb = straight ** (1 / 2.2)
    return np.concatenate([srgb * alpha, alpha], axis=2).astype(np.float32)


# A2. The banana sprite
@dataclasses.dataclass(frozen=True)
class _BananaShape:
    """Random parameters of one banana, in local units (body length = 1).

    The spine is a circular arc of angle ``bend`` (radians) and length 1;
    ``t`` runs along it from 0 (stem end of the body) to 1 (flower tip).
    The neck (stem) continues to ``t = -neck_len``, the tip nub to
    ``1 + tip_len``. half_width: largest half-thickness; peak, fullness:
    where the body is thickest and how blunt its ends are. Colours are
    sRGB 0..1; green_ends, speckle, blotch: amounts of green ends, sugar
    spots and brown bruises; facet: strength of the ridges; gloss: shine;
    mirrored: stem on the other side; texture_seed: seeds the peel noise.
    """
    bend: float
    half_width: float
    peak: float
    fullness: float
    neck_len: float
    neck_width: float
    tip_len: float
    colour: tuple
    neck_colour: tuple
    green_ends: float
    speckle: float
    blotch: float
    facet: float
    facet_offset: float
    gloss: float
    mirrored: bool
    texture_seed: int


def _random_banana_shape(rng):
    """Draw a random _BananaShape (curvature, thickness, ripeness, ...)."""
    ripeness = rng.uniform(1.7, 3.0) if rng.random() < 0.75 else rng.uniform(0.5, 1.7)
    palette, i = np.array(_RIPENESS_COLOURS), min(int(ripeness), 2)
    colour = palette[i] + (ripeness - i) * (palette[i + 1] - palette[i])
    colour = np.clip(colour * rng.uniform(0.92, 1.05) + rng.normal(0, 0.02, 3), 0, 1)
    neck = np.array([0.42, 0.50, 0.16]) + (ripeness / 3) * np.array([0.16, 0.06, 0.02])
    w = rng.uniform(0.095, 0.135)
    return _BananaShape(
        bend=rng.uniform(0.8, 1.6), half_width=w,
        peak=rng.uniform(0.85, 1.2), fullness=rng.uniform(0.45, 0.7),
        neck_len=rng.uniform(0.1, 0.17), neck_width=w * rng.uniform(0.34, 0.44),
        tip_len=rng.uniform(0.015, 0.03),
        colour=tuple(map(float, colour)), neck_colour=tuple(map(float, neck)),
        green_ends=rng.uniform(0.2, 0.8) * (1.3 - ripeness / 3),
        speckle=max(0.0, ripeness - 2.0) * rng.uniform(0.2, 1.0),
        blotch=rng.uniform(0, 0.6) * (ripeness / 3),
        facet=rng.uniform(0.5, 0.9), facet_offset=rng.uniform(-0.4, 0.4),
        gloss=rng.uniform(0.1, 0.3), mirrored=bool(rng.random() < 0.5),
        texture_seed=int(rng.integers(2**31)))


def _banana_half_width(shape, t):
    """Half-width (local units) of the banana at spine positions t (array).

    A sin-shaped body (thick middle, rounded ends) merged smoothly into a
    thin neck that flares a little at the cut stem end, plus a small nub
    at the flower tip. Returns float32 array shaped like t.
    """
    u = np.clip(t, 0, 1) ** shape.peak
    body = shape.half_width * np.maximum(np.sin(np.pi * u), 0) ** shape.fullness
    flare = 1 + 0.3 * _smoothstep(-shape.neck_len + 0.04, -shape.neck_len, t)
    neck = shape.neck_width * flare * (1 - _smoothstep(0.15, 0.45, t))
    k = 0.5 * shape.neck_width  # softness of the body/neck junction
    width = 0.5 * (body + neck + np.sqrt((body - neck) ** 2 + k * k))
    nub = 0.25 * shape.half_width * np.sqrt(np.clip(1 - ((t - 1) / shape.tip_len) ** 2, 0, 1))
    return np.maximum(width, nub).astype(np.float32)


def _banana_outline(shape, n=64):
    """Outline points of the banana in local (x, y): float (2n, 2).

    The arc's centre is the local origin; the spine point at angle a is
    R * (sin a, cos a) with R = 1 / bend (so the banana hangs below it).
    """
    t = np.linspace(-shape.neck_len, 1 + shape.tip_len, n)
    w = _banana_half_width(shape, t)
    radius = 1 / shape.bend
    a = (t - 0.5) * shape.bend * (-1 if shape.mirrored else 1)
    side = np.concatenate([radius + w, radius - w])
    a = np.concatenate([a, a])
    return np.stack([side * np.sin(a), side * np.cos(a)], axis=1)


def _banana_geometry(shape, x, y):
    """Spine coordinates of local points x, y (float arrays, same shape).

    Returns a dict of arrays: t (position along the spine), s (signed
    across-position, -1..1 from inner to outer edge), a (polar angle),
    dw (slope of the half-width) and sd (approximate signed distance to
    the outline in local units, negative inside).
    """
    sign = -1.0 if shape.mirrored else 1.0
    a = np.arctan2(x, y)
    t = 0.5 + sign * a / shape.bend
    d = np.hypot(x, y) - 1 / shape.bend
    table_t = np.linspace(-shape.neck_len - 0.01, 1 + shape.tip_len + 0.01, 256)
    table_w = _banana_half_width(shape, table_t)
    w = np.interp(t, table_t, table_w).astype(np.float32)
    dw = np.interp(t, table_t, np.gradient(table_w, table_t)).astype(np.float32)
    sd = (np.abs(d) - w) / np.sqrt(1 + dw * dw)
    sd = np.maximum(sd, np.maximum(-shape.neck_len - t, t - 1 - shape.tip_len))
    s = np.clip(d / np.maximum(w, 1e-4), -1, 1)
    return dict(t=t, s=s, a=a, dw=dw, sd=sd)


def _banana_albedo(shape, g):
    """Peel colour (sRGB, float32 (..., 3)) at banana coordinates g.

    g: dict from _banana_geometry. Adds lengthwise streaks, green ends, the
    neck and its dark cut end, the dark flower tip, brown blotches and
    sugar speckles; colour of the edges is slightly darker/olive.
    """
    noise = np.random.default_rng(shape.texture_seed)
    t, s = g["t"], g["s"]
    u = (t + shape.neck_len) / (1 + shape.neck_len + shape.tip_len)
    v = (s + 1) / 2
    streak = _sample_noise(noise.random((6, 40), dtype=np.float32), u, v)
    colour = np.asarray(shape.colour, np.float32) * (0.93 + 0.14 * streak)[..., None]
    green = np.maximum(_smoothstep(0.22, 0.0, t), 0.6 * _smoothstep(0.8, 1.0, t))
    colour = _mix(colour, np.float32([0.50, 0.60, 0.16]), shape.green_ends * green)
    colour = _mix(colour, np.float32(shape.neck_colour), _smoothstep(0.02, -0.05, t))
    colour = _mix(colour, np.float32([0.30, 0.22, 0.10]),
                 _smoothstep(-shape.neck_len + 0.035, -shape.neck_len + 0.01, t))
    colour = _mix(colour, np.float32([0.16, 0.11, 0.06]), _smoothstep(0.955, 0.99, t))
    blotch = _sample_noise(noise.random((9, 4), dtype=np.float32), u, v)
    blotch = blotch * (0.7 + 0.6 * streak)  # ragged, not grid-aligned, edges
    colour = _mix(colour, np.float32([0.55, 0.38, 0.12]),
                 shape.blotch * _smoothstep(0.6, 1.0, blotch))
    speck = _sample_noise(noise.random((110, 18), dtype=np.float32), u, v)
    threshold = 0.93 - 0.12 * shape.speckle
    colour = _mix(colour, np.float32([0.35, 0.22, 0.08]),
                 min(1.0, 2 * shape.speckle) * _smoothstep(threshold, threshold + 0.05, speck))
    return _mix(colour, colour * np.float32([0.75, 0.72, 0.55]), _smoothstep(0.7, 1.0, np.abs(s)))


def _banana_shading(shape, g, light):
    """Diffuse and specular light (float32 arrays) on the banana surface.

    The body is treated as a tube whose cross-section is a rounded polygon
    (the ridges of a banana): the normal turns across the width with angle
    asin(s) and tilts along the spine where the width changes (dw). The
    faces come from bending that angle with a sine: nearly flat in the
    middle of a face, turning fast at a ridge. light: unit (x, y, z) in
    the local frame. Returns (diffuse in [0, 1], specular >= 0).
    """
    angle = np.arcsin(g["s"])  # angle of the normal around the tube
    face = math.pi / 2.6       # angular width of one face of the peel
    phase = 2 * math.pi * (angle - shape.facet_offset) / face
    angle = angle - shape.facet * face / (2 * math.pi) * np.sin(phase)
    sign = -1.0 if shape.mirrored else 1.0
    sin_a, cos_a = np.sin(g["a"]), np.cos(g["a"])
    norm = np.sqrt(1 + g["dw"] ** 2)
    n_r, n_z, n_t = np.sin(angle) / norm, np.cos(angle) / norm, -g["dw"] / norm

    def dot(vec):  # normal . vec, with vec given in local (x, y, z)
        along = sign * (vec[0] * cos_a - vec[1] * sin_a)
        radial = vec[0] * sin_a + vec[1] * cos_a
        return n_t * along + n_r * radial + n_z * vec[2]

    wrap = 0.15  # soft, slightly translucent look of the peel
    diffuse = np.clip((dot(light) + wrap) / (1 + wrap), 0, 1)
    half = light + np.float32([0, 0, 1])
    half = half / np.linalg.norm(half)
    specular = shape.gloss * np.clip(dot(half), 0, 1) ** 12
    return diffuse.astype(np.float32), specular.astype(np.float32)


def _draw_banana(shape, scale, angle, light):
    """Render a banana sprite: float32 premultiplied RGBA (h, w, 4).

    scale: pixels per local unit (about the body length in px); angle:
    rotation in radians; light: unit (x, y, z) key-light in image space.
    The sprite is centred on the banana's bounding box with 2 px margin.
    """
    center, (bw, bh) = _rotated_extent(_banana_outline(shape), angle)
    canvas = (math.ceil(bh * scale) + 4, math.ceil(bw * scale) + 4)
    x, y = _local_grid(canvas, scale, angle, center)
    g = _banana_geometry(shape, x, y)
    coverage = np.clip(0.5 - g["sd"] * scale * _SUPERSAMPLE, 0, 1)
    inside = coverage > 0  # only colour the samples that are covered
    g = {key: value[inside] for key, value in g.items()}
    lx, ly = _to_local(light[:2], angle)
    diffuse, specular = _banana_shading(shape, g, np.float32([lx, ly, light[2]]))
    albedo = _banana_albedo(shape, g) ** 2.2
    lit = np.zeros(coverage.shape + (3,), np.float32)
    lit[inside] = albedo * (0.2 + 0.9 * diffuse)[..., None] + specular[..., None]
    return _finish_sprite(lit, coverage)


def banana_sprite(rng, size=64, angle=None, light=None):
    """A random banana sprite whose box's longer side is about `size` px. Shown in 06_data.

    rng: np.random.Generator; angle: radians (random if None); light: unit
    (x, y, z) (random if None). Returns float32 (h, w, 4) PREMULTIPLIED
    RGBA in [0, 1] with a 2 px transparent margin.
    """
    shape = _random_banana_shape(rng)
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    light = _random_light(rng) if light is None else light
    _, (bw, bh) = _rotated_extent(_banana_outline(shape), angle)
    return _draw_banana(shape, size / max(bw, bh), angle, light)


# A3. The orange sprite (second class of the multi-object variant)
@dataclasses.dataclass(frozen=True)
class _OrangeShape:
    """Random parameters of one orange (local units: radius 1).

    squash: height/width ratio; colour: sRGB peel colour; navel: local
    (x, y) of the stem scar on the visible hemisphere (|navel| < 0.75).
    """
    squash: float
    colour: tuple
    navel: tuple
    navel_size: float
    bumpiness: float
    gloss: float
    texture_seed: int


def _random_orange_shape(rng):
    """Draw a random _OrangeShape (from yellow-orange to deep mandarin)."""
    hue = rng.uniform(0, 1)
    colour = np.array([0.98, 0.62, 0.10]) + hue * np.array([-0.02, -0.22, -0.06])
    colour = np.clip(colour * rng.uniform(0.88, 1.02) + rng.normal(0, 0.015, 3), 0, 1)
    radius, angle = 0.75 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
    return _OrangeShape(
        squash=rng.uniform(0.88, 1.0), colour=tuple(map(float, colour)),
        navel=(radius * math.cos(angle), radius * math.sin(angle)),
        navel_size=rng.uniform(0.06, 0.11), bumpiness=rng.uniform(0.08, 0.18),
        gloss=rng.uniform(0.12, 0.3), texture_seed=int(rng.integers(2**31)))


def _orange_albedo(shape, x, y, z, noise):
    """Peel colour (sRGB float32 (..., 3)) at visible sphere points x, y, z.

    Slightly mottled, deeper orange towards the rim, with a dark olive stem
    scar ringed by a small green calyx at shape.navel.
    """
    u, v = (x + 1) / 2, (y + 1) / 2
    mottle = _sample_noise(noise.random((7, 7), dtype=np.float32), u, v)
    colour = np.float32(shape.colour) * (0.92 + 0.14 * mottle)[..., None]
    colour = _mix(colour, colour * np.float32([0.95, 0.75, 0.6]), 0.5 * (1 - z) ** 2)
    nx, ny = shape.navel
    nz = math.sqrt(max(0.0, 1 - nx * nx - ny * ny))
    dist = np.sqrt((x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2)
    calyx = _smoothstep(1.8 * shape.navel_size, 1.2 * shape.navel_size, dist)
    colour = _mix(colour, np.float32([0.55, 0.55, 0.18]), 0.6 * calyx)
    scar = _smoothstep(0.7 * shape.navel_size, 0.35 * shape.navel_size, dist)
    return _mix(colour, np.float32([0.28, 0.24, 0.10]), scar)


def _draw_orange(shape, scale, angle, light):
    """Render an orange sprite: float32 premultiplied RGBA (h, w, 4).

    scale: pixels per local unit (the radius in px); angle: radians;
    light: unit (x, y, z) key-light in image space. Dimpled peel = the
    sphere normal perturbed by fine noise, which also breaks up the
    specular highlight.
    """
    side = math.ceil(2 * scale) + 4  # the rotated ellipse fits in the unit circle
    canvas = (side, side)
    x, y = _local_grid(canvas, scale, angle, (0.0, 0.0))
    r = np.sqrt(x * x + (y / shape.squash) ** 2)
    coverage = np.clip(0.5 - (r - 1) * scale * _SUPERSAMPLE, 0, 1)
    inside = coverage > 0
    x, y = x[inside], y[inside] / shape.squash
    z = np.sqrt(np.clip(1 - x * x - y * y, 0, 1))
    noise = np.random.default_rng(shape.texture_seed)
    u, v = (x + 1) / 2, (y + 1) / 2
    bump = [_sample_noise(noise.random((48, 48), dtype=np.float32), u, v) - 0.5 for _ in range(2)]
    normal = np.stack([x + shape.bumpiness * bump[0], y + shape.bumpiness * bump[1], z])
    normal /= np.linalg.norm(normal, axis=0)
    lx, ly = _to_local(light[:2], angle)
    light = np.float32([lx, ly, light[2]])
    diffuse = np.clip((light @ normal.reshape(3, -1) + 0.2) / 1.2, 0, 1)
    half = (light + np.float32([0, 0, 1])) / np.linalg.norm(light + np.float32([0, 0, 1]))
    specular = shape.gloss * np.clip(half @ normal.reshape(3, -1), 0, 1) ** 60
    albedo = _orange_albedo(shape, x, y, z, noise) ** 2.2
    lit = np.zeros(coverage.shape + (3,), np.float32)
    lit[inside] = albedo * (0.25 + 0.85 * diffuse)[:, None] + specular[:, None]
    return _finish_sprite(lit, coverage)


def orange_sprite(rng, size=48, angle=None, light=None):
    """A random orange sprite whose box's longer side is about `size` px. Shown in 06_data.

    Same conventions as banana_sprite: float32 (h, w, 4) PREMULTIPLIED
    RGBA in [0, 1] with a 2 px transparent margin.
    """
    shape = _random_orange_shape(rng)
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    light = _random_light(rng) if light is None else light
    return _draw_orange(shape, size / 2, angle, light)


# A4. Backgrounds: real photos bundled with scikit-image
def load_backgrounds(names=None):
    """Load the background photos bundled with scikit-image (no download). Shown in 06_data.

    names: file names to load, from BACKGROUND_FILES or HELD_OUT_FILES
    (default: all of BACKGROUND_FILES, the photos the datasets are drawn on).
    Returns a list of (PIL.Image, tint) pairs: colour photos are RGB
    images with tint None; grey photos are mode "L" images with an RGB
    tint (3 floats) used to colour them.
    """
    folder = pathlib.Path(skimage.data.__file__).parent
    tints = dict(BACKGROUND_FILES + HELD_OUT_FILES)
    photos = []
    for name in names or dict(BACKGROUND_FILES):
        tint = tints[name]
        with Image.open(folder / name) as image:
            photos.append((image.convert("L" if tint else "RGB"), tint))
    return photos


def _colour_jitter(rng, image):
    """Random brightness, contrast, saturation and hue shift.

    image: float32 (H, W, 3) in [0, 1]; returns a new array, same shape.
    The hue shift rotates the colour around the grey axis (YIQ space).
    """
    grey = image @ np.float32([0.299, 0.587, 0.114])
    image = grey[..., None] + rng.uniform(0.6, 1.3) * (image - grey[..., None])
    image = image.mean() + rng.uniform(0.7, 1.2) * (image - image.mean())
    image = image * rng.uniform(0.65, 1.2)
    rgb_to_yiq = np.float32([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                             [0.211, -0.523, 0.312]])
    hue = rng.uniform(-0.25, 0.25)  # radians
    c, s = math.cos(hue), math.sin(hue)
    rotate = np.float32([[1, 0, 0], [0, c, -s], [0, s, c]])
    matrix = np.linalg.inv(rgb_to_yiq) @ rotate @ rgb_to_yiq
    return np.clip(image @ matrix.T.astype(np.float32), 0, 1)


def random_background(rng, photos, size=_IMAGE_SIZE):
    """A random crop of a random photo: float32 (size, size, 3) in [0, 1]. Shown in 06_data.

    The square crop covers 30-100% of the photo's shorter side, is
    resized to `size`, maybe mirrored, tinted if grey and colour-jittered.
    """
    image, tint = photos[rng.integers(len(photos))]
    w, h = image.size
    side = rng.uniform(0.3, 1.0) * min(w, h)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    crop = image.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    pixels = np.asarray(crop, dtype=np.float32) / 255
    if tint is not None:
        tint = np.float32(tint) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
        pixels = pixels[..., None] * tint / tint.max()
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return _colour_jitter(rng, pixels)


# A5. Scenes: sprites pasted on backgrounds, with exact boxes
def _orange_outline(shape, n=64):
    """Outline points of the orange in local (x, y): float (n, 2)."""
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(a), shape.squash * np.sin(a)], axis=1)


def _sprite_functions(class_id):
    """(random shape, outline points, renderer) functions for a class id."""
    if class_id == _BANANA:
        return _random_banana_shape, _banana_outline, _draw_banana
    return _random_orange_shape, _orange_outline, _draw_orange


def _sample_sprite(rng, class_id, side_range, light):
    """Render a random object whose box sides fall inside side_range (px).

    Tries random shapes/angles until the box aspect (long side / short
    side) is at most min(_MAX_ASPECT, hi / lo), then picks a scale so that
    both box sides lie in [lo, hi] (after 50 failed tries the last shape
    is used at the smallest fitting scale). Returns
    (sprite float32 (h, w, 4) premultiplied, (box_w, box_h) predicted px).
    """
    random_shape, outline, draw = _sprite_functions(class_id)
    lo, hi = side_range
    for _ in range(50):
        shape, angle = random_shape(rng), rng.uniform(0, 2 * math.pi)
        _, (bw, bh) = _rotated_extent(outline(shape), angle)
        if max(bw, bh) <= min(_MAX_ASPECT, hi / lo) * min(bw, bh):
            break
    low, high = lo / min(bw, bh), hi / max(bw, bh)
    scale = rng.uniform(low, max(low, high))
    return draw(shape, scale, angle, light), (bw * scale, bh * scale)


def _random_position(rng, sprite_hw, box_wh, size):
    """Top-left (y0, x0) ints for a sprite so that at most _MAX_OUTSIDE of
    its box (centred in the sprite) leaves the frame on any side."""
    (h, w), (bw, bh) = sprite_hw, box_wh
    keep = 0.5 - _MAX_OUTSIDE
    cx = rng.uniform(keep * bw, size - keep * bw)
    cy = rng.uniform(keep * bh, size - keep * bh)
    return int(round(cy - h / 2)), int(round(cx - w / 2))


def _overlap(y0, x0, h, w, size):
    """Slices (frame, sprite) where an (h, w) sprite at (y0, x0) meets a
    size x size frame; either may be empty."""
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + h, size), min(x0 + w, size)
    frame = (slice(ya, max(ya, yb)), slice(xa, max(xa, xb)))
    sprite = (slice(ya - y0, max(ya, yb) - y0), slice(xa - x0, max(xa, xb) - x0))
    return frame, sprite


def _frame_alpha(sprite, y0, x0, size):
    """The sprite's alpha pasted into an empty float32 (size, size) frame."""
    alpha = np.zeros((size, size), np.float32)
    frame, part = _overlap(y0, x0, *sprite.shape[:2], size)
    alpha[frame] = sprite[part][..., 3]
    return alpha


def _tight_box(mask):
    """Tight box of a non-empty bool (H, W) mask: ints (xmin, ymin, xmax,
    ymax) with exclusive max (xmax = last column + 1)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _visible_masks(alphas, full_counts):
    """Decide which objects stay visible once later ones are drawn on top.

    alphas: list of float32 (H, W) frame alphas, in drawing order;
    full_counts: pixels each sprite would cover if alone and unclipped.
    An object's visible alpha is its alpha times the transparency of every
    KEPT object drawn after it; its mask is visible alpha > _ALPHA_THRESHOLD.
    Objects keeping < _MIN_VISIBLE of their pixels or with a box side
    < _MIN_SIDE are dropped. Returns {index: bool mask} for kept objects.
    """
    cover = np.ones_like(alphas[0]) if alphas else None
    kept = {}
    for i in reversed(range(len(alphas))):
        mask = alphas[i] * cover > _ALPHA_THRESHOLD
        if mask.sum() < _MIN_VISIBLE * max(full_counts[i], 1):
            continue
        x0, y0, x1, y1 = _tight_box(mask)
        if min(x1 - x0, y1 - y0) >= _MIN_SIDE:
            kept[i] = mask
            cover = cover * (1 - alphas[i])
    return kept


def _blur(image, radius):
    """Gaussian blur of a float32 (H, W) or (H, W, 3) image in [0, 1]."""
    if radius <= 0:
        return image
    pil = Image.fromarray(np.uint8(np.clip(image, 0, 1) * 255 + 0.5))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255


def _cast_shadow(rng, image, sprite, y0, x0, light):
    """Darken image (float32 (H, W, 3)) under a soft, offset copy of the
    alpha of a sprite that will be pasted at (y0, x0).

    The shadow falls away from the light: offset = -light.xy * 2..6 px,
    blurred by 2..4 px, darkening by up to 30..50%. Returns a new image.
    """
    distance = rng.uniform(2, 6)
    dy, dx = (int(round(-light[i] * distance)) for i in (1, 0))
    shifted = _frame_alpha(sprite, y0 + dy, x0 + dx, image.shape[0])
    shadow = _blur(shifted, rng.uniform(2, 4))
    return image * (1 - rng.uniform(0.3, 0.5) * shadow)[..., None]


def _match_lighting(sprite, patch):
    """Nudge a sprite's colour towards the scene behind it (subtle).

    sprite: float32 (h, w, 4) premultiplied; patch: float32 (h, w, 3) of
    the image behind it. Darker scenes darken the sprite a little and the
    scene's average colour tints it slightly. Returns a new sprite.
    """
    weight = sprite[..., 3:] + 1e-6
    mean = (patch * weight).sum(axis=(0, 1)) / weight.sum()
    level = max(float(mean.mean()), 1e-3)
    gain = np.clip((level / 0.45) ** 0.2, 0.8, 1.1)
    tint = np.clip((mean / level) ** 0.05, 0.96, 1.04)
    out = sprite.copy()
    out[..., :3] = np.minimum(sprite[..., :3] * gain * tint, sprite[..., 3:])
    return out


def _paste(image, sprite, y0, x0):
    """Alpha-composite a premultiplied sprite onto image in place."""
    frame, part = _overlap(y0, x0, *sprite.shape[:2], image.shape[0])
    piece = sprite[part]
    image[frame] = piece[..., :3] + (1 - piece[..., 3:]) * image[frame]


def _camera_finish(rng, image):
    """Slight optical blur and sensor noise; float32 (H, W, 3) -> uint8.

    The noise is the same in the three channels (brightness noise only),
    which is cheaper to draw and looks like a photo's grain.
    """
    if rng.random() < 0.7:
        image = _blur(image, rng.uniform(0.3, 0.8))
    noise = rng.standard_normal(image.shape[:2] + (1,), dtype=np.float32)
    image = image + noise * np.float32(rng.uniform(0.5, 2.5) / 255)
    return np.uint8(np.clip(image, 0, 1) * 255 + 0.5)


def render_scene(rng, photos, objects, size=_IMAGE_SIZE):
    """Render one photo-like scene with fruit on a real photo background. Shown in 06_data.

    rng: np.random.Generator; photos: list from load_backgrounds();
    objects: list of (class_id, min_side, max_side), box sides in px, in
    drawing order (later objects occlude earlier ones).
    Returns (image uint8 (size, size, 3), boxes int64 (n, 5) with rows
    (class_id, xmin, ymin, xmax, ymax), masks bool (n, size, size) of the
    visible pixels). n <= len(objects): nearly hidden objects are dropped
    (and not drawn). Boxes are the tight boxes of the masks, xmax/ymax
    exclusive (see module docstring).
    """
    light = _random_light(rng)
    image = random_background(rng, photos, size)
    placed = []
    for class_id, lo, hi in objects:
        sprite, box_wh = _sample_sprite(rng, class_id, (lo, hi), light)
        y0, x0 = _random_position(rng, sprite.shape[:2], box_wh, size)
        placed.append((class_id, sprite, y0, x0))
    alphas = [_frame_alpha(s, y0, x0, size) for _, s, y0, x0 in placed]
    counts = [(s[..., 3] > _ALPHA_THRESHOLD).sum() for _, s, _, _ in placed]
    kept = _visible_masks(alphas, counts)
    boxes, masks = [], []
    for i, (class_id, sprite, y0, x0) in enumerate(placed):
        if i in kept:
            image = _cast_shadow(rng, image, sprite, y0, x0, light)
            frame, part = _overlap(y0, x0, *sprite.shape[:2], size)
            sprite = sprite.copy()
            sprite[part] = _match_lighting(sprite[part], image[frame])
            _paste(image, sprite, y0, x0)
            boxes.append((class_id, *_tight_box(kept[i])))
            masks.append(kept[i])
    boxes = np.array(boxes, dtype=np.int64).reshape(-1, 5)
    masks = np.array(masks, dtype=bool).reshape(-1, size, size)
    return _camera_finish(rng, image), boxes, masks


# A6. Writing datasets in d2l's on-disk format, atomically


def _image_rng(seed, name, index):
    """Independent random generator for one image.

    The generator is seeded with the triple (seed, tag, index), where tag
    is a 32-bit number derived from the string `name` (e.g.
    "bananas:train") with sha256. So every image has its own stream of
    random numbers: it does not depend on which images were made before
    it, and train/val/other datasets never share streams.
    """
    tag = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, tag, index])


def _banana_scene(rng, photos, side_range=_BANANA_BOX):
    """One image with exactly one banana: (uint8 (256, 256, 3), boxes (1, 5)).

    Re-renders (with the same rng, so still deterministic) in the rare case
    the banana ends up mostly outside the frame and gets dropped.
    """
    while True:
        image, boxes, _ = render_scene(rng, photos, [(_BANANA, *side_range)])
        if len(boxes) == 1:
            return image, boxes


def _fruit_scene(rng, photos):
    """One image with 0..MAX_FRUIT bananas/oranges: (uint8 image, boxes (n, 5)).

    Classes are drawn 50/50. Boxes may be fewer than the objects asked
    for: objects hidden behind others are dropped (see render_scene).
    """
    count = int(rng.integers(0, _MAX_FRUIT + 1))
    ranges = {_BANANA: _FRUIT_BANANA_BOX, _ORANGE: _ORANGE_BOX}
    objects = [(c, *ranges[c]) for c in rng.integers(0, 2, count).tolist()]
    image, boxes, _ = render_scene(rng, photos, objects)
    return image, boxes


def _csv_rows(img_name, boxes):
    """CSV rows for one image: one [img_name, label, xmin, ymin, xmax, ymax]
    per box; an image without boxes gets one row with five empty fields."""
    if len(boxes) == 0:
        return [[img_name, "", "", "", "", ""]]
    return [[img_name, *(int(v) for v in box)] for box in boxes]


def _write_csv(path, rows):
    """Write _CSV_HEADER and rows to path (Unix newlines, deterministic)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_CSV_HEADER)
        writer.writerows(rows)


def _write_split(folder, tag, seed, count, scene, tick, workers):
    """Render `count` images into folder/images/N.png plus folder/label.csv.

    scene(rng, photos) -> (uint8 image, boxes (n, 5)); the rng of image N
    is _image_rng(seed, tag, N), tag naming dataset and split, such as
    "bananas:train". No image depends on another, so `workers` threads
    draw chunks of _IMAGES_PER_CHUNK images at once (numpy and PIL release
    the GIL for most of the work); the files are the same bytes for any
    number of workers. tick(n) is called as each chunk of n images is done.
    On an error or Ctrl-C the threads stop after the image they are on.
    """
    (folder / "images").mkdir(parents=True)
    chunks = [range(start, min(start + _IMAGES_PER_CHUNK, count))
              for start in range(0, count, _IMAGES_PER_CHUNK)]
    own, stop = threading.local(), threading.Event()

    def draw(indices):
        if not hasattr(own, "photos"):
            own.photos = load_backgrounds()  # each thread its own copies, loaded once
        rows = []
        for index in indices:
            if stop.is_set():
                break
            image, boxes = scene(_image_rng(seed, tag, index), own.photos)
            Image.fromarray(image).save(folder / "images" / f"{index}.png",
                                        compress_level=_PNG_COMPRESSION)
            rows += _csv_rows(f"{index}.png", boxes)
        return rows

    rows = []
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        for indices, chunk_rows in zip(chunks, pool.map(draw, chunks)):  # in order
            rows += chunk_rows
            tick(len(indices))
    finally:  # on an error or Ctrl-C, no thread may still write when the caller deletes the folder
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    _write_csv(folder / "label.csv", rows)


def _default_workers():
    """How many threads draw a dataset's images: the cores this process may use, at most 8. (Two
    threads draw 1.5x as fast as one, so the GIL keeps about a third of the work serial: more
    threads add little.)"""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return min(cores, 8)


# Ownership. Whatever the series writes into a folder (a dataset, an export, detect_folder's
# drawings, a notebook's scratch folder) is recorded there, in _MANIFEST_FILE: each file's path,
# size and SHA-256. A rebuild removes or replaces only files that are in that record and unchanged
# since; any other file, or a changed one, stops it before it touches anything. Names prove nothing.
# Checkpoints and ONNX files carry their marker inside instead (save_checkpoint, export_onnx).

_MANIFEST_FILE = ".tinyssd-manifest.json"
_MADE_BY = "tinyssd-notebooks"


def _file_record(path):
    """{"size": bytes, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def _read_manifest(folder):
    """The manifest of ``folder`` (made_by, kind, params, files), or None if it has none the series
    wrote.

    files: {relative POSIX path: _file_record}, or None for a scratch folder, all of which is a
    notebook's.
    """
    path = pathlib.Path(folder) / _MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError):  # unreadable, or not JSON: not a record the series wrote
        return None
    if not (isinstance(manifest, dict) and manifest.get("made_by") == _MADE_BY
            and isinstance(manifest.get("files"), (dict, type(None)))):
        return None
    return manifest


def _write_manifest(folder, kind, params=None, files="all"):
    """Record what the series wrote in ``folder``; written atomically, and last.

    files: "all" (every file now under folder), None (scratch: the whole folder), or
    {relative path: _file_record}.
    """
    folder = pathlib.Path(folder)
    if files == "all":
        files = {p.relative_to(folder).as_posix(): _file_record(p)
                 for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != _MANIFEST_FILE}
    text = json.dumps({"made_by": _MADE_BY, "kind": kind, "params": params, "files": files},
                      indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{_MANIFEST_FILE}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, folder / _MANIFEST_FILE)


def _is_unchanged(path, record):
    """True if the file at ``path`` still has the size and hash ``record`` holds."""
    return (isinstance(record, dict) and os.path.getsize(path) == record.get("size")
            and _file_record(path)["sha256"] == record.get("sha256"))


def _why_not_ours(path, record, writer="the series"):
    """None if the file at ``path`` is what ``record`` (a _file_record, or None) says the series
    wrote, unchanged; else why the series may not replace or remove it."""
    if path.is_symlink():
        return "a link"
    if record is None:
        return f"not written by {writer}"
    if not _is_unchanged(path, record):
        return f"changed since {writer} wrote it"
    return None


def _unowned_files(folder, files=(), base=None):
    """[(path, why)] for every file under ``folder`` the series may not remove.

    Each file must be recorded, unchanged, in the manifest of its nearest folder that has one. A
    link, or a file that no manifest lists, is the user's.
    """
    folder = pathlib.Path(folder)
    manifest = _read_manifest(folder)
    # a scratch folder: all of it is a notebook's
    if manifest is not None and manifest["files"] is None:
        return []
    if manifest is not None:
        files, base = manifest["files"], folder
    found = []
    for path in sorted(folder.iterdir()):
        if manifest is not None and path.name == _MANIFEST_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            found += _unowned_files(path, files, base)
            continue
        record = None if base is None else files.get(path.relative_to(base).as_posix())
        why = _why_not_ours(path, record)
        if why is not None:
            found.append((path, why))
    return found


def _listing(root, found, limit=8):
    """'a.png (why), b/c.csv (why), ...' with paths relative to root."""
    shown = [f"{pathlib.Path(path).relative_to(root).as_posix()} ({why})"
             for path, why in found[:limit]]
    return ", ".join(shown) + (f" and {len(found) - limit} more" if len(found) > limit else "")


def _check_replaceable(root, advice="Pass a new or empty folder."):
    """Raise FileExistsError unless the series may remove everything in ``root``.

    It may when root does not exist, is an empty folder, or holds only files that the manifests in
    it record and that nobody changed since. Anything else is the user's and is never deleted.
    """
    root = pathlib.Path(root)
    if not root.exists() and not root.is_symlink():
        return
    if pathlib.Path.cwd().resolve().is_relative_to(root.resolve()):
        raise FileExistsError(f"{root} is the current folder (or holds it): pass a new subfolder, "
                              "such as 'data/bananas'. Nothing was changed.")
    if root.is_symlink() or not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; nothing was changed. {advice}")
    found = _unowned_files(root)
    if found:
        raise FileExistsError(f"{root} holds files that the series did not write, or that were "
                              "changed since: "
                              f"{_listing(root, found)}. Nothing was changed. {advice}")


@contextlib.contextmanager
def _sigterm_as_exit():
    """Within the block, SIGTERM (a `kill`, a closed terminal) raises SystemExit, so that `finally`
    clauses remove temporary files. Only the main thread can handle signals; elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _is_complete(root, params):
    """True if root holds a finished dataset or export made with exactly ``params``."""
    manifest = _read_manifest(root)
    return manifest is not None and manifest.get("params") == params


def _progress_ticker(progress, total):
    """Turn the `progress` argument into (tick, close) callables.

    progress: None/False (silent), True (a tqdm bar) or a callable
    f(done, total) called as images are done. tick(n) counts n more.
    """
    if callable(progress):
        done = [0]

        def tick(n):
            done[0] += n
            progress(done[0], total)
        return tick, lambda: None
    if progress:
        bar = progress_bar(total=total, desc="generating images")
        return bar.update, bar.close
    return lambda n: None, lambda: None


def build_atomically(root, params, write, advice="Pass a new or empty folder."):
    """Create the folder `root` all at once, or reuse a finished one made with the same params.
    Used by every dataset and export the series writes; shown in 06_data.

    Otherwise write(tmp) fills a fresh temporary sibling folder, the manifest of every file in it is
    written last, and the folder is renamed to root. root is replaced only if everything in it is
    the series' own and unchanged (_check_replaceable): otherwise FileExistsError, ending with
    ``advice``, before anything is written. A crash, an error, Ctrl-C or SIGTERM never leaves a
    half-written root behind. Returns root (Path).
    """
    root = pathlib.Path(os.path.abspath(root))
    if _is_complete(root, params):
        return root
    _check_replaceable(root, advice)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        with _sigterm_as_exit():
            write(tmp)
            _write_manifest(tmp, params["kind"], params)
            if not _is_complete(root, params):  # another process may have won
                _check_replaceable(root, advice)  # again, right before deleting anything
                if root.is_dir():
                    shutil.rmtree(root)
                os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _generate_detection_dataset(root, prefix, scene, seed, num_train, num_val,
                               progress, kind, workers=None):
    """Shared body of the generate_* functions: writes root/<prefix>_train
    and root/<prefix>_val with `scene` (see _write_split); returns root.
    workers: threads that draw the images (default: one per usable core)."""
    workers = workers or _default_workers()
    params = dict(kind=kind, version=_FORMAT_VERSION, seed=seed,
                  num_train=num_train, num_val=num_val)

    def write(tmp):
        tick, close = _progress_ticker(progress, num_train + num_val)
        try:
            for split, count in (("train", num_train), ("val", num_val)):
                _write_split(tmp / f"{prefix}_{split}", f"{kind}:{split}",
                            seed, count, scene, tick, workers)
        finally:
            close()
    return build_atomically(root, params, write)


def _boxes_overlap(boxes):
    """True if any two (class, xmin, ymin, xmax, ymax) rows intersect."""
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i, 1:], boxes[j, 1:]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                return True
    return False


def make_test_scene(path_jpg="img/banana.jpg", path_csv="img/banana.csv", seed=0, overwrite=False):
    """Write a 256x256 JPEG (quality 95) with 3-4 separate bananas + labels. Named in 06_data; made
    img/banana.jpg.

    Banana box sides are spread over ~30..80 px, at random angles, on a held-out colour photo
    (_TEST_SCENE_FILES, never in a training set); scenes are re-drawn until no two boxes overlap and
    all bananas lie fully inside the frame. path_csv gets the usual header and one row per banana,
    img_name being the JPEG's file name. Deterministic in seed. Returns boxes int64 (n, 5). An
    existing file with other contents is replaced only with overwrite=True.
    """
    rng = _image_rng(seed, "test-scene", 0)
    photos = load_backgrounds(_TEST_SCENE_FILES)
    sizes = [(30, 46), (38, 58), (46, 70), (54, 80)]
    count = int(rng.integers(3, 5))
    picked = sorted(rng.choice(len(sizes), count, replace=False).tolist())
    objects = [(_BANANA, *sizes[i]) for i in picked]
    size = _IMAGE_SIZE
    while True:
        image, boxes, _ = render_scene(rng, photos, objects, size)
        if (len(boxes) == count and boxes[:, 1:3].min() > 0
                and boxes[:, 3:5].max() < size and not _boxes_overlap(boxes)):
            break
    path_jpg, path_csv = pathlib.Path(path_jpg), pathlib.Path(path_csv)
    jpg = io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=95)
    table = io.StringIO()
    rows = [_CSV_HEADER, *_csv_rows(path_jpg.name, boxes)]
    csv.writer(table, lineterminator="\n").writerows(rows)
    contents = {path_jpg: jpg.getvalue(), path_csv: table.getvalue().encode()}
    for path, data in contents.items():
        if path.exists() and path.read_bytes() != data and not overwrite:
            raise FileExistsError(f"{path} exists and differs from the test scene; nothing was "
                                  "written. Pass another path, or overwrite=True to replace it.")
    for path, data in contents.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return boxes


if __name__ == "__main__":
    raise SystemExit(main())
