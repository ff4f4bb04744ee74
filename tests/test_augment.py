"""Box-aware augmentation (notebook 10): boxes follow their objects' pixels through every transform.

Each rendered object travels through the SAME transform call as two mask
channels: its visible pixels and its original box filled in, both holding the
value index + 1. Mask kernels (pad, crop, flip, nearest resize) move pixels
independently of the box kernels, so after the call:

(a) every box contains its object's remaining pixels;
(b) every box equals the tight box of its filled original box (= the original
    box moved, scaled and clipped to the crop);
(c) a box not clipped by a crop is tight around its object's pixels;
and the mask values tell which input object each output row came from.
"""

import copy

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

import ssd_helpers as H
from ssd_helpers import augment_batch, augment_sample, ssd_augmentation

TOL = 1.5  # px: nearest-neighbour resizing of the masks moves an edge by < 1 px
TIGHT_TOL = 3.0  # px: shrinking may also skip a thin sliver of object at an edge
SIZE = 256
SCENE_SEEDS = range(10)
OBJECTS = [(0, 34, 73), (1, 26, 52), (1, 26, 52)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small per-image ops: threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    """[(image uint8 (3, 256, 256), label (n, 5) normalised, masks uint8 (n, 2, 256, 256))]."""
    photos = H.load_backgrounds()
    out = []
    for seed in SCENE_SEEDS:
        image, boxes, masks = H.render_scene(np.random.default_rng(seed), photos, OBJECTS)
        n = len(boxes)
        ids = torch.arange(1, n + 1, dtype=torch.uint8)[:, None, None]
        obj = torch.from_numpy(masks).to(torch.uint8) * ids
        rect = torch.zeros_like(obj)
        for i, (_, x0, y0, x1, y1) in enumerate(boxes.tolist()):
            rect[i, y0:y1, x0:x1] = i + 1
        label = (torch.tensor(boxes, dtype=torch.float32)
                 / torch.tensor([1.0, SIZE, SIZE, SIZE, SIZE]))
        out.append((torch.from_numpy(image).permute(2, 0, 1).contiguous(), label,
                    torch.stack([obj, rect], dim=1)))
    return out


def tight(mask):
    """Tight box (xmin, ymin, xmax exclusive, ymax exclusive) of a 2-D mask, None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def check(image, label, in_label, out, may_cut, stats):
    """Check one augmented sample; ``out`` = augment_sample(..., masks) result."""
    new_image, new_label, masks = out
    assert new_image.dtype == torch.uint8 and new_image.ndim == 3 and new_image.shape[0] == 3
    height, width = new_image.shape[1:]
    assert masks.shape == (len(new_label), 2, height, width)
    assert new_label.dtype == torch.float32 and new_label.shape[1] == 5
    boxes = new_label[:, 1:] * torch.tensor([width, height, width, height])
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (new_label[:, 1:] >= 0).all()
    assert (new_label[:, 1:] <= 1).all()
    indices = []
    for row, box, (obj, rect) in zip(new_label, boxes, masks):
        index = int(rect.max()) - 1  # which input object this row is
        assert set(rect.unique().tolist()) <= {0, index + 1}, "masks mixed up"
        indices.append(index)
        assert row[0] == in_label[index, 0], "class changed"
        # (b) the box is the original box moved and clipped
        expected = tight(rect)
        assert expected is not None, "box survived but its area vanished"
        assert torch.allclose(box, expected, atol=TOL), (box, expected)
        # (a) the box contains what is left of the object
        pixels = tight(obj)
        if pixels is None:
            stats["vanished"] += 1
            continue
        assert ((pixels[:2] >= box[:2] - TOL).all()
                and (pixels[2:] <= box[2:] + TOL).all()), (box, pixels)
        # (c) uncut objects: the box is tight
        clipped = (expected[:2] <= 0).any() or expected[2] >= width or expected[3] >= height
        if may_cut and clipped:
            stats["clipped"] += 1
            continue
        assert torch.allclose(box, pixels, atol=TIGHT_TOL), (box, pixels)
        stats["tight"] += 1
    assert indices == sorted(set(indices)), "rows reordered or duplicated"
    stats["dropped"] += len(in_label) - len(indices)


def photometric(channel_swap=False, p=1.0):
    """ssd_augmentation's photometric distortion on its own, each part applied with probability
    p."""
    [step] = [t for t in ssd_augmentation(channel_swap=channel_swap).transforms
              if isinstance(t, v2.RandomPhotometricDistort)]
    step.p = p
    return step


def mean_fill():
    return {tv_tensors.Image: tuple(round(m) for m in H.IMAGENET_MEAN), "others": 0}


SINGLE = {
    "flip": (lambda: v2.RandomHorizontalFlip(p=1.0), False),
    "zoom_out": (lambda: v2.RandomZoomOut(fill=mean_fill(), side_range=(1.0, 2.5), p=1.0), False),
    "iou_crop": (lambda: v2.Compose([v2.RandomIoUCrop(), v2.SanitizeBoundingBoxes()]), True),
    "photometric": (photometric, False),
    "resize_down": (lambda: v2.Resize((150, 200), antialias=True), False),
    "resize_up": (lambda: v2.Resize((400, 300), antialias=True), False),
}


def run(transform, scenes, seeds, may_cut):
    stats = dict(tight=0, clipped=0, vanished=0, dropped=0)
    for seed in seeds:
        for image, label, masks in scenes:
            torch.manual_seed(seed)
            out = augment_sample(transform, image, label, masks)
            check(image, label, label, out, may_cut, stats)
    return stats


@pytest.mark.parametrize("name", SINGLE)
def test_single_transform_keeps_boxes_on_objects(scenes, name):
    make, may_cut = SINGLE[name]
    stats = run(make(), scenes, range(3), may_cut)
    assert stats["tight"] > 0
    if not may_cut:
        assert stats["clipped"] == stats["dropped"] == stats["vanished"] == 0


def test_single_transforms_change_what_they_should(scenes):
    image, label, _ = scenes[0]
    flipped, rows = augment_sample(v2.RandomHorizontalFlip(p=1.0), image, label)
    assert torch.equal(flipped, image.flip(-1))
    assert torch.allclose(rows[:, [1, 3]], 1 - label[:, [3, 1]])
    torch.manual_seed(0)
    zoomed, rows = augment_sample(SINGLE["zoom_out"][0](), image, label)
    assert zoomed.shape[1] > SIZE and (rows[:, 3] - rows[:, 1] < label[:, 3] - label[:, 1]).all()
    assert torch.equal(zoomed[:, 0, 0], torch.tensor([124, 116, 104], dtype=torch.uint8)) or \
        torch.equal(zoomed[:, -1, -1], torch.tensor([124, 116, 104], dtype=torch.uint8))
    torch.manual_seed(0)
    distorted, rows = augment_sample(photometric(), image, label)
    assert not torch.equal(distorted, image) and torch.equal(rows, label)


def test_photometric_never_swaps_channels_by_default(scenes):
    image = tv_tensors.Image(scenes[0][0])
    for seed in range(20):
        torch.manual_seed(seed)
        assert photometric().make_params([image])["channel_permutation"] is None
    torch.manual_seed(0)
    assert (photometric(channel_swap=True)
            .make_params([image])["channel_permutation"] is not None)


def test_iou_crop_actually_cuts_and_drops(scenes):
    stats = run(SINGLE["iou_crop"][0](), scenes, range(6), True)
    assert stats["clipped"] > 0 and stats["dropped"] > 0 and stats["tight"] > 0


def test_full_pipeline_keeps_boxes_on_objects(scenes):
    stats = run(ssd_augmentation(), scenes, range(20), True)
    assert stats["tight"] > 0 and stats["clipped"] > 0


def test_full_pipeline_output_size(scenes):
    transform = ssd_augmentation(size=128)
    image, label, _ = scenes[1]
    for seed in range(5):
        torch.manual_seed(seed)
        new_image, rows = augment_sample(transform, image, label)
        assert new_image.shape == (3, 128, 128) and new_image.dtype == torch.uint8
        assert 1 <= len(rows) <= len(label)


def make_batch(scenes, num_gt=5):
    """Scenes as a batch, plus an image without objects; labels padded to num_gt rows."""
    images = torch.stack([s[0] for s in scenes])
    labels = torch.full((len(scenes), num_gt, 5), -1.0)
    for i, (_, label, _) in enumerate(scenes):
        labels[i, :len(label)] = label
    labels[-1] = -1  # no objects
    return images, labels


def test_augment_batch_shapes_padding_and_classes(scenes):
    images, labels = make_batch(scenes)
    before = images.clone(), labels.clone()
    out_images, out_labels = augment_batch(ssd_augmentation(), images, labels,
                                           torch.Generator().manual_seed(0))
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1]), "inputs modified"
    assert out_images.shape == images.shape and out_images.dtype == torch.uint8
    assert out_labels.shape == labels.shape and out_labels.dtype == torch.float32
    for new, old in zip(out_labels, labels):
        real = new[:, 0] >= 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any(), "real rows must come first"
        assert (new[n:] == -1).all(), "padding rows must be all -1"
        old_classes = old[old[:, 0] >= 0, 0]
        assert n <= len(old_classes)
        # classes kept in order: the output classes are a subsequence of the input's
        it = iter(old_classes.tolist())
        assert all(c in it for c in new[:n, 0].tolist())
        H.check_boxes(new[:n, 1:])
        assert ((new[:n, 1:] >= 0) & (new[:n, 1:] <= 1)).all()
    assert (out_labels[-1] == -1).all(), "an image without objects stays without objects"
    assert (out_labels[:-1, 0, 0] >= 0).all(), "the IoU crop keeps at least one box"
    # the targets are usable for training
    H.multibox_target(H.multibox_prior(out_images.float(), [0.2, 0.272], [1, 2, 0.5]), out_labels)


def test_augment_batch_is_deterministic(scenes):
    images, labels = make_batch(scenes[:6])
    transform = ssd_augmentation()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = augment_batch(transform, images, labels, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state), "global RNG must be left alone"
    torch.manual_seed(999)  # the global RNG does not matter when a generator is given
    b = augment_batch(transform, images, labels, torch.Generator().manual_seed(7))
    c = augment_batch(transform, images, labels, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # without a generator: reproducible from the global seed
    torch.manual_seed(5)
    d = augment_batch(transform, images, labels)
    torch.manual_seed(5)
    e = augment_batch(transform, images, labels)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_iou_options_must_allow_no_crop():
    with pytest.raises(ValueError):
        ssd_augmentation(iou_options=(0.1, 0.5))


def test_pipeline_is_reusable_copy(scenes):
    """A deep copy of the pipeline gives the same results (for DataLoader workers)."""
    transform = ssd_augmentation()
    image, label, _ = scenes[2]
    torch.manual_seed(3)
    a = augment_sample(transform, image, label)
    torch.manual_seed(3)
    b = augment_sample(copy.deepcopy(transform), image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
