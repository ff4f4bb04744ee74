"""Reading d2l's on-disk format (notebook 06): round trip and clear errors on bad input."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ssd_helpers as H


@pytest.fixture(scope="module")
def bananas(tmp_path_factory):
    return H.generate_banana_detection(tmp_path_factory.mktemp("d") / "bananas", num_train=6,
                                       num_val=3)


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    return H.generate_fruit_detection(tmp_path_factory.mktemp("f") / "fruit", num_train=12,
                                      num_val=2)


def test_round_trip(bananas):
    images, labels = H.read_detection_folder(bananas / "bananas_train")
    assert images.shape == (6, 3, 256, 256) and images.dtype == torch.uint8
    assert labels.shape == (6, 1, 5) and labels.dtype == torch.float32
    rows = (bananas / "bananas_train" / "label.csv").read_text().splitlines()[1:]
    for i, row in enumerate(rows):
        name, label, *box = row.split(",")
        assert torch.equal(labels[i, 0],
                           torch.tensor([float(label)] + [float(v) / 256 for v in box]))
        saved = np.asarray(Image.open(bananas / "bananas_train" / "images" / name))
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), saved)


def test_multi_object_padding(fruit):
    images, labels = H.read_detection_folder(fruit / "fruit_train", num_classes=2)
    counts = (labels[:, :, 0] >= 0).sum(dim=1)
    assert images.shape[0] == 12 and labels.shape[1] == counts.max() <= 6
    assert counts.min() == 0  # an image without objects is kept, all padding
    for lab, n in zip(labels, counts):
        assert (lab[n:] == -1).all() and (lab[:n, 0] >= 0).all()
    with pytest.raises(H.DatasetError, match="out of range for 1 classes"):
        H.read_detection_folder(fruit / "fruit_train", num_classes=1)


def test_load_data_bananas_keeps_the_seeds_meaning(bananas):
    train_iter, val_iter = H.load_data_bananas(4, root=bananas)
    X, Y = next(iter(train_iter))
    assert X.shape == (4, 3, 256, 256) and X.dtype == torch.float32 and X.max() > 1
    assert Y.shape == (4, 1, 5)
    again = next(iter(H.load_data_bananas(4, root=bananas)[0]))[1]
    assert torch.equal(Y, again)  # same seed, same order
    assert len(val_iter.dataset) == 3


def broken_copy(bananas, tmp_path):
    folder = tmp_path / "split"
    shutil.copytree(bananas / "bananas_val", folder)
    return folder


def edit_csv(folder, row, text):
    lines = (folder / "label.csv").read_text().splitlines()
    lines[row - 1] = text
    (folder / "label.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("row, text, message", [
    (1, "img_name,label,xmin,ymin,xmax", "header"),
    (3, "1.png,0,10,10,40", "row 3: expected 6 columns"),
    (2, "0.png,0,50,10,40,60", "row 2: box .* is empty or inverted"),
    (2, "0.png,0,10,60,40,60", "row 2: box .* is empty or inverted"),
    (3, "1.png,0,-5,10,40,60", "row 3: box .* outside"),
    (3, "1.png,0,10,10,300,60", "row 3: box .* outside"),
    (2, "0.png,0,10,nan,40,60", "row 2: box .* is not finite"),
    (2, "0.png,-2,10,10,40,60", "row 2: class id -2 is not an integer >= 0"),
    (2, "0.png,banana,10,10,40,60", "row 2: label and box must be numbers"),
    (3, "9.png,0,10,10,40,60", "row 3: image file .*9.png is missing"),
])
def test_bad_csv_names_file_and_row(bananas, tmp_path, row, text, message):
    folder = broken_copy(bananas, tmp_path)
    edit_csv(folder, row, text)
    with pytest.raises(H.DatasetError, match=message) as error:
        H.read_detection_folder(folder)
    assert "label.csv" in str(error.value)


def test_corrupt_image_names_file_and_row(bananas, tmp_path):
    folder = broken_copy(bananas, tmp_path)
    (folder / "images" / "2.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(H.DatasetError, match=r"row 4: cannot decode image .*2.png"):
        H.read_detection_folder(folder)


def test_missing_csv(tmp_path):
    with pytest.raises(H.DatasetError, match="label.csv is missing"):
        H.read_detection_folder(tmp_path)


def test_any_image_mode_is_read_as_rgb(bananas, tmp_path):
    folder = broken_copy(bananas, tmp_path)
    path = folder / "images" / "0.png"
    Image.open(path).convert("L").save(path)
    images, _ = H.read_detection_folder(folder)
    assert images.shape == (3, 3, 256, 256)
