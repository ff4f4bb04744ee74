"""The offline banana dataset (notebook 06): sprites, exact boxes, determinism, atomic writes."""
import csv
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import ssd_helpers as bd


BANANA, ORANGE = 0, 1  # the class ids of the fruit datasets
ALPHA_THRESHOLD = 0.5  # a sprite's pixel belongs to its fruit where its alpha is above this


@pytest.fixture(scope="module")
def photos():
    return bd.load_backgrounds()


def tight_box(mask):
    """Tight box (xmin, ymin, xmax, ymax) of a non-empty bool (H, W) mask, max exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def boxes_overlap(boxes):
    """True if any two (class, xmin, ymin, xmax, ymax) rows intersect (max exclusive)."""
    return any(a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
               for i, a in enumerate(boxes) for b in boxes[:i])


def file_hashes(root):
    """{relative path: sha256} of every file under root."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def mean_hue_degrees(image, mask):
    hsv = np.asarray(Image.fromarray(image).convert("HSV"), dtype=np.float64)
    return hsv[..., 0][mask].mean() * 360 / 255


# ------------------------------------------------------------ sprites
@pytest.mark.parametrize("make", [bd.banana_sprite, bd.orange_sprite])
def test_sprite_is_premultiplied_rgba(make):
    sprite = make(np.random.default_rng(0), size=60)
    assert sprite.dtype == np.float32 and sprite.ndim == 3 and sprite.shape[2] == 4
    assert sprite.min() >= 0 and sprite.max() <= 1
    assert np.all(sprite[..., :3] <= sprite[..., 3:] + 1e-6)  # premultiplied
    assert np.all(sprite[[0, -1], :, 3] == 0) and np.all(sprite[:, [0, -1], 3] == 0)
    box = tight_box(sprite[..., 3] > ALPHA_THRESHOLD)
    assert abs(max(box[2] - box[0], box[3] - box[1]) - 60) <= 2


# ------------------------------------------------------------ boxes
def test_boxes_are_tight_and_masks_disjoint(photos):
    for seed in range(8):
        rng = np.random.default_rng(seed)
        objects = [(BANANA, 30, 64), (ORANGE, 26, 52)] * 3
        image, boxes, masks = bd.render_scene(rng, photos, objects)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert boxes.dtype == np.int64 and boxes.shape == (len(masks), 5)
        assert masks.sum(axis=0).max() <= 1  # a pixel belongs to one object
        for (_, x0, y0, x1, y1), mask in zip(boxes, masks):
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x0 and xs.max() <= x1 - 1    # inside the box
            assert ys.min() >= y0 and ys.max() <= y1 - 1
            assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1  # tight
            assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_object_colours(photos):
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        objects = [(ORANGE, 40, 60), (BANANA, 40, 70)]  # banana on top
        image, boxes, masks = bd.render_scene(rng, photos, objects)
        hues = {label: mean_hue_degrees(image, mask)
                for (label, *_), mask in zip(boxes, masks)}
        assert 33 <= hues[BANANA] <= 80     # yellow (green-yellow ok)
        if len(hues) == 2:
            assert 12 <= hues[ORANGE] <= 40
            assert hues[ORANGE] < hues[BANANA]


def test_banana_box_sizes(tmp_path):
    root = bd.generate_banana_detection(tmp_path / "d", seed=0, num_train=40, num_val=1)
    sides = []
    for _, _, *box in read_rows(root / "bananas_train" / "label.csv")[1:]:
        x0, y0, x1, y1 = map(int, box)
        if 0 < x0 and 0 < y0 and x1 < 256 and y1 < 256:  # not clipped
            sides += [x1 - x0, y1 - y0]
    assert 34 - 3 <= min(sides) and max(sides) <= 73 + 3


# ------------------------------------------------------------ writing
def test_same_seed_same_bytes(tmp_path):
    a = bd.generate_banana_detection(tmp_path / "a", seed=0, num_train=8, num_val=4)
    b = bd.generate_banana_detection(tmp_path / "b", seed=0, num_train=8, num_val=4)
    c = bd.generate_banana_detection(tmp_path / "c", seed=1, num_train=8, num_val=4)
    ha, hb, hc = file_hashes(a), file_hashes(b), file_hashes(c)
    assert len(ha) == 8 + 4 + 2 + 1 and ha == hb
    assert all(ha[k] != hc[k] for k in ha if k.endswith(".png"))


def fruit_on_cores(root, cores):
    """generate_fruit_detection(root, 25 + 3 images) with this thread held to `cores` (the
    drawing threads inherit them); returns (root, the most threads that ran beside this one)."""
    allowed, before, alive = os.sched_getaffinity(0), set(threading.enumerate()), []
    os.sched_setaffinity(0, cores)
    try:
        root = bd.generate_fruit_detection(
            root, num_train=25, num_val=3,
            progress=lambda done, total: alive.append(len(set(threading.enumerate()) - before)))
    finally:
        os.sched_setaffinity(0, allowed)
    return root, max(alive)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores that this process may use")
def test_the_same_bytes_for_any_number_of_drawing_threads(tmp_path):
    """The generator draws with a thread per core it may use; its files do not depend on that."""
    allowed = os.sched_getaffinity(0)
    one, one_thread = fruit_on_cores(tmp_path / "one", {min(allowed)})
    every, threads = fruit_on_cores(tmp_path / "every", allowed)
    assert one_thread == 1 and threads >= 2
    one, every = file_hashes(one), file_hashes(every)
    assert len(one) == 25 + 3 + 2 + 1 and one == every


def test_images_do_not_depend_on_order(tmp_path):
    """Image N of a split depends on the seed, the split and N only: not on how many images are
    drawn before or after it, nor on the other split."""
    a = bd.generate_banana_detection(tmp_path / "a", seed=3, num_train=6, num_val=2)
    b = bd.generate_banana_detection(tmp_path / "b", seed=3, num_train=3, num_val=5)
    ha, hb = file_hashes(a), file_hashes(b)
    for split, shared in (("bananas_train", 3), ("bananas_val", 2)):
        for index in range(shared):
            key = str(pathlib.Path(split, "images", f"{index}.png"))
            assert ha[key] == hb[key], key
        rows_a, rows_b = (read_rows(root / split / "label.csv") for root in (a, b))
        assert rows_a[:1 + shared] == rows_b[:1 + shared]
    assert all(ha[str(pathlib.Path("bananas_train", "images", f"{i}.png"))]
               != ha[str(pathlib.Path("bananas_val", "images", f"{i}.png"))] for i in range(2))


def test_banana_csv_format(tmp_path):
    root = bd.generate_banana_detection(tmp_path / "d", seed=0, num_train=8, num_val=4)
    for split, count in (("bananas_train", 8), ("bananas_val", 4)):
        rows = read_rows(root / split / "label.csv")
        assert rows[0] == ["img_name", "label", "xmin", "ymin", "xmax", "ymax"]
        assert [r[0] for r in rows[1:]] == [f"{i}.png" for i in range(count)]
        for name, label, *box in rows[1:]:
            x0, y0, x1, y1 = map(int, box)
            assert label == "0" and 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            image = Image.open(root / split / "images" / name)
            assert image.mode == "RGB" and image.size == (256, 256)


def test_second_call_reuses_dataset(tmp_path):
    root = tmp_path / "bananas"
    bd.generate_banana_detection(root, num_train=4, num_val=2)
    label = root / "bananas_train" / "label.csv"
    before = label.stat().st_mtime_ns
    start = time.perf_counter()
    assert bd.generate_banana_detection(root, num_train=4, num_val=2) == root
    assert time.perf_counter() - start < 0.1
    assert label.stat().st_mtime_ns == before
    bd.generate_banana_detection(root, num_train=5, num_val=2)  # new params
    assert len(read_rows(label)) == 1 + 5


def test_a_root_without_marker_is_refused_and_kept(tmp_path):
    root = tmp_path / "bananas"
    (root / "bananas_train" / "images").mkdir(parents=True)  # d2l's layout, but not made by us
    (root / "bananas_train" / "images" / "0.png").write_bytes(b"junk")
    with pytest.raises(FileExistsError, match=r"0.png \(not written by the series\)"):
        bd.generate_banana_detection(root, num_train=4, num_val=2)
    assert (root / "bananas_train" / "images" / "0.png").read_bytes() == b"junk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bananas"]  # no temporary left either


def test_sigterm_leaves_no_temporary_and_an_old_one_is_left_alone(tmp_path):
    """A run stopped by SIGTERM removes its temporary folder. A folder that looks like an old run's
    is never deleted: its name proves nothing."""
    old = tmp_path / "bananas.tmp-abcd1234"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    code = ("import ssd_helpers as H; "
            f"H.generate_banana_detection({str(tmp_path / 'bananas')!r}, num_train=500, num_val=1)")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=pathlib.Path(bd.__file__).parent)
    deadline = time.time() + 60
    while time.time() < deadline and not any((p / "bananas_train" / "images").is_dir()
                                             for p in tmp_path.glob("bananas.tmp-*") if p != old):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]
    assert (old / "notes.txt").read_text() == "mine"


def test_progress_counts_every_image_once_in_order(tmp_path):
    calls = []
    bd.generate_banana_detection(tmp_path / "b", seed=0, num_train=23, num_val=4,
                                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(10, 27), (20, 27), (23, 27), (27, 27)]


def test_interrupted_run_leaves_nothing(tmp_path):
    def stop_after_the_first_chunk(done, total):
        raise KeyboardInterrupt  # while the other thread is still drawing its chunk
    with pytest.raises(KeyboardInterrupt):
        bd.generate_banana_detection(tmp_path / "bananas", seed=0, num_train=60, num_val=2,
                                     progress=stop_after_the_first_chunk)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ fruit + test scene
def test_fruit_dataset(tmp_path):
    root = bd.generate_fruit_detection(tmp_path / "fruit", num_train=30, num_val=3)
    lines = (root / "fruit_train" / "label.csv").read_text().splitlines()
    rows = read_rows(root / "fruit_train" / "label.csv")[1:]
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), key=lambda n: int(n[:-4]))
    assert {r[0] for r in rows} == {f"{i}.png" for i in range(30)}
    counts = {f"{i}.png": 0 for i in range(30)}
    labels = set()
    for name, label, *box in rows:
        if label == "":
            assert box == ["", "", "", ""] and f"{name},,,,," in lines
            assert sum(r[0] == name for r in rows) == 1
        else:
            counts[name] += 1
            labels.add(int(label))
    assert max(counts.values()) <= 6 and min(counts.values()) == 0
    assert max(counts.values()) >= 4 and labels == {0, 1}


def test_test_scene(tmp_path):
    jpg, table = tmp_path / "img" / "banana.jpg", tmp_path / "img" / "banana.csv"
    boxes = bd.make_test_scene(jpg, table, seed=0)
    first = jpg.read_bytes(), table.read_bytes()
    bd.make_test_scene(jpg, table, seed=0)
    assert (jpg.read_bytes(), table.read_bytes()) == first
    assert Image.open(jpg).size == (256, 256) and 3 <= len(boxes) <= 4
    rows = read_rows(table)
    header = ["img_name", "label", "xmin", "ymin", "xmax", "ymax"]  # d2l's label.csv
    assert rows[0] == header and len(rows) == 1 + len(boxes)
    assert not boxes_overlap(boxes)
    sides = np.concatenate([boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]])
    assert 27 <= sides.min() and sides.max() <= 83
