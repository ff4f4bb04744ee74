"""Safety with a user's files and inputs: each test first reproduces a way the series once went
wrong.

The rules live in ssd_helpers section 6 (_image_to_uint8, open_image, check_images, check_labels),
its appendix (_check_replaceable) and in load_model / save_checkpoint; the reader, train_ssd and
detect all use them.
"""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import ssd_helpers as H

MANIFEST = ".tinyssd-manifest.json"  # the record of what the series wrote in a folder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bananas(tmp_path_factory):
    return H.generate_banana_detection(tmp_path_factory.mktemp("d") / "bananas", num_train=8,
                                       num_val=3)


@pytest.fixture(scope="module")
def train_data(bananas):
    return H.read_detection_folder(bananas / "bananas_train")


def split_copy(bananas, tmp_path):
    folder = tmp_path / "split"
    shutil.copytree(bananas / "bananas_val", folder)
    return folder


def quick(epochs=1):
    return H.TrainConfig(epochs=epochs, batch_size=4, bf16="off")


# ---------------------------------------------------------- 1. the generator deletes only its own

def test_generator_keeps_a_users_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes").write_text("mine")
    with pytest.raises(FileExistsError,
                       match=r"x holds files that the series did not write.*: notes \(not written"):
        H.generate_banana_detection(tmp_path / "x", num_train=1, num_val=1)
    assert (tmp_path / "x" / "notes").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_generator_refuses_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "notes").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="current folder"):
        H.generate_banana_detection(".", num_train=1, num_val=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_generator_keeps_d2l_s_own_download(bananas, tmp_path):
    """d2l's banana-detection folder has our layout but no manifest: it is the user's."""
    real = tmp_path / "banana-detection"
    shutil.copytree(bananas, real)
    (real / MANIFEST).unlink()
    before = sorted(str(p.relative_to(real)) for p in real.rglob("*"))
    with pytest.raises(FileExistsError):
        H.generate_banana_detection(real, num_train=2, num_val=1)
    assert sorted(str(p.relative_to(real)) for p in real.rglob("*")) == before


def test_generator_replaces_only_its_own_untouched_dataset(tmp_path):
    root = H.generate_banana_detection(tmp_path / "b", num_train=2, num_val=1)
    H.generate_banana_detection(root, num_train=3, num_val=1)  # other parameters: ours, replaced
    assert len(list((root / "bananas_train" / "images").iterdir())) == 3
    (root / "bananas_train" / "my_labels.csv").write_text("mine")
    with pytest.raises(FileExistsError):
        H.generate_banana_detection(root, num_train=2, num_val=1)
    assert (root / "bananas_train" / "my_labels.csv").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (H.generate_banana_detection(empty, num_train=1, num_val=1) / MANIFEST).is_file()


def test_generator_refuses_a_file_as_root(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder"):
        H.generate_banana_detection(tmp_path / "f", num_train=1, num_val=1)
    assert (tmp_path / "f").read_text() == "mine"


def test_test_scene_does_not_overwrite_a_users_file(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"my holiday")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        H.make_test_scene(photo, tmp_path / "labels.csv")
    assert photo.read_bytes() == b"my holiday" and not (tmp_path / "labels.csv").exists()


def test_save_checkpoint_does_not_overwrite_a_users_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(FileExistsError, match="not written by save_checkpoint"):
        H.save_checkpoint(notes, H.TinySSD())
    assert notes.read_text() == "mine"
    H.save_checkpoint(tmp_path / "model.pt", H.TinySSD())
    H.save_checkpoint(tmp_path / "model.pt", H.TinySSD())  # its own checkpoint may be replaced


# ---------------------------------------------------------- 2. images read as they are meant

def test_float_images_are_0_to_255_and_0_to_1_is_refused():
    with pytest.raises(H.DatasetError, match="within 0..1"):
        H.to_image_tensor(torch.rand(3, 8, 8))
    with pytest.raises(H.DatasetError, match="within 0..1"):
        H.to_image_tensor(np.random.default_rng(0).random((8, 8, 3)))
    pixels = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    assert torch.equal(H.to_image_tensor(pixels), pixels.to(torch.uint8))
    for bad in (torch.full((3, 8, 8), 300.0), torch.full((3, 8, 8), -5.0)):
        with pytest.raises(H.DatasetError, match="outside 0..255"):
            H.to_image_tensor(bad)
    with pytest.raises(H.DatasetError, match="NaN"):
        H.to_image_tensor(torch.full((3, 8, 8), float("nan")))


def test_layouts_numpy_is_channels_last_torch_channels_first():
    chw = np.zeros((3, 64, 64), np.uint8)
    with pytest.raises(H.DatasetError, match="looks channels-first"):
        H.to_image_tensor(chw)
    with pytest.raises(H.DatasetError, match="looks channels-last"):
        H.to_image_tensor(torch.zeros(64, 48, 3, dtype=torch.uint8))
    with pytest.raises(H.DatasetError, match="cannot tell the channels"):
        H.to_image_tensor(np.zeros((3, 8, 4), np.uint8))
    hwc = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert torch.equal(H.to_image_tensor(hwc), torch.from_numpy(hwc).permute(2, 0, 1))
    assert torch.equal(H.to_image_tensor(torch.from_numpy(hwc).permute(2, 0, 1)[None]),
                       torch.from_numpy(hwc).permute(2, 0, 1))


def test_integers_do_not_wrap_around():
    with pytest.raises(H.DatasetError, match="int16 pixel values run 300..300"):
        H.to_image_tensor(torch.full((3, 8, 8), 300, dtype=torch.int16))
    # 16-bit: 1000 / 65535 * 255
    assert int(H.to_image_tensor(np.full((8, 8), 1000, np.uint16)).max()) == 4
    assert int(H.to_image_tensor(np.full((8, 8), 65535, np.uint16)).min()) == 255
    assert int(H.to_image_tensor(torch.full((3, 8, 8), 200, dtype=torch.int64)).max()) == 200
    with pytest.raises(H.DatasetError, match="bool"):
        H.to_image_tensor(np.zeros((8, 8), bool))


def test_exif_orientation_is_applied_by_detect_and_refused_by_the_reader(bananas, tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = image.getexif()
    exif[ExifTags.Base.Orientation] = 6  # "turn 90 degrees clockwise to view"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = H.to_image_tensor(tmp_path / "phone.jpg")
    assert upright.shape == (3, 40, 20)
    assert upright[2, 2, 10] > 200 and upright[0, 2, 10] < 60  # the blue strip is now at the top
    folder = split_copy(bananas, tmp_path)
    pil = Image.open(folder / "images" / "1.png")
    exif = pil.getexif()
    exif[ExifTags.Base.Orientation] = 8
    pil.save(folder / "images" / "1.png", exif=exif)
    with pytest.raises(H.DatasetError, match=r"row 3: image .*1.png carries EXIF orientation 8"):
        H.read_detection_folder(folder)


def test_16_bit_png_is_scaled_not_clipped(bananas, tmp_path):
    folder = split_copy(bananas, tmp_path)
    grey = np.asarray(Image.open(folder / "images" / "0.png").convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(folder / "images" / "0.png")
    assert Image.open(folder / "images" / "0.png").mode.startswith("I")
    images, _ = H.read_detection_folder(folder)
    assert torch.equal(images[0, 0], torch.from_numpy((grey // 257).astype(np.uint8)))


def test_transparent_pixels_become_white_and_cmyk_is_converted(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, but only the left half is opaque
    rgba[:, :4, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        out = H.to_image_tensor(source)
        assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 7].tolist() == [255, 255, 255]
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "c.jpg")
    assert (H.to_image_tensor(tmp_path / "c.jpg")[:, 4, 4].tolist()
            == pytest.approx([255, 0, 255], abs=3))


def test_float_tiff_follows_the_float_rule(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(H.DatasetError, match="within 0..1"):
        H.to_image_tensor(tmp_path / "f.tif")
    Image.fromarray(np.full((8, 8), 128.0, np.float32)).save(tmp_path / "g.tif")
    assert H.to_image_tensor(tmp_path / "g.tif").unique().tolist() == [128]


def test_a_corrupt_or_truncated_image_names_its_row(bananas, tmp_path):
    folder = split_copy(bananas, tmp_path)
    data = (folder / "images" / "1.png").read_bytes()
    (folder / "images" / "1.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(H.DatasetError, match=r"label.csv row 3: cannot decode image .*1.png"):
        H.read_detection_folder(folder)


# ---------------------------------------------------------- 3, 4. class ids and units

def edit_row(folder, row, text):
    lines = (folder / "label.csv").read_text().splitlines()
    lines[row - 1] = text
    (folder / "label.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("text, message", [
    ("0.png,0,0.1,0.2,0.4,0.5", r"row 2: box .* looks normalised .* multiply x by"),
    ("0.png,1e20,10,10,40,60", r"row 2: class id 1e\+20 is not an integer >= 0 \(and below"),
    ("0.png,0,10.2,10,10.8,60", r"row 2: box .* less than one pixel wide"),
])
def test_reader_refuses_units_and_ids_it_cannot_trust(bananas, tmp_path, text, message):
    folder = split_copy(bananas, tmp_path)
    edit_row(folder, 2, text)
    with pytest.raises(H.DatasetError, match=message):
        H.read_detection_folder(folder)


def test_load_data_bananas_checks_class_ids(bananas, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(bananas, root)
    edit_row(root / "bananas_val", 3, "1.png,1,10,10,40,60")
    with pytest.raises(H.DatasetError,
                       match=r"bananas_val.label.csv row 3: class id 1 is out of range for 1"):
        H.load_data_bananas(4, root=root, num_classes=1)


def test_training_refuses_a_class_the_model_does_not_have(train_data):
    images, labels = train_data
    labels = labels.clone()
    labels[5, 0, 0] = 1
    with pytest.raises(H.DatasetError,
                       match=r"train_data image 5, row 0: "
                             r"class id 1 is out of range for 1 classes"):
        H.train_ssd(H.TinySSD(H.default_config()), (images, labels), quick(), CPU, progress=False)


def test_training_refuses_pixel_labels(train_data):
    images, labels = train_data
    pixels = labels.clone()
    pixels[..., 1:] *= 256
    with pytest.raises(H.DatasetError,
                       match=r"train_data image 0, row 0: box .* is not normalised"
                             r".*look like pixels"):
        H.train_ssd(H.TinySSD(H.default_config()), (images, pixels), quick(), CPU, progress=False)


def test_check_labels_finds_inverted_and_non_finite_rows():
    labels = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.5], [-1, -1, -1, -1, -1]],
                           [[0, 0.6, 0.1, 0.5, 0.5], [0, 0.1, 0.1, 0.2, float("nan")]]])
    with pytest.raises(H.DatasetError,
                       match=r"image 1, row 0: box .* is empty or inverted \(1 more rows"):
        H.check_labels(labels)
    labels[1, 0, 1] = 0.2
    with pytest.raises(H.DatasetError, match=r"image 1, row 1: box .* is not finite"):
        H.check_labels(labels)
    labels[1, 1, 4] = 0.3
    H.check_labels(labels, num_classes=1)


# ---------------------------------------------------------- 5. a NaN image leaves the model intact

def test_a_nan_image_is_named_before_training_starts(train_data):
    images, labels = train_data
    images = images.float()
    images[6, 1, 10, 10] = float("nan")
    H.set_seed(0)
    net = H.TinySSD(H.default_config())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(H.DatasetError, match=r"train_data image 6: pixel values are NaN"):
        H.train_ssd(net, (images, labels), quick(), CPU, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net.eval()
    assert len(H.detect(net, images[0], threshold=0.0)) > 0


def test_train_step_alone_keeps_batch_norm_clean(train_data):
    images, labels = train_data
    images = images[:4].float()
    images[2, 0, 0, 0] = float("inf")
    net = H.TinySSD(H.default_config())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(H.DatasetError, match=r"batch image 42: pixel values are NaN or infinite"):
        H.train_step(net, optimizer, images, labels[:4], quick(), CPU,
                     ids=torch.tensor([40, 41, 42, 43]))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------- 6. checkpoints

@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    H.save_checkpoint(path, H.TinySSD(H.default_config()))
    return path


def test_empty_and_random_files_are_not_checkpoints(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(H.CheckpointError, match=r"empty.pt is empty \(0 bytes\)"):
        H.load_model(tmp_path / "empty.pt")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(H.CheckpointError,
                       match="random.pt .* not a readable PyTorch checkpoint") as error:
        H.load_model(tmp_path / "random.pt")
    assert "weights_only=False" not in str(error.value)  # never advise running a stranger's pickle
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        H.load_model(tmp_path / "missing.pt")


def test_a_file_without_config_or_for_other_classes(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"state_dict": state["state_dict"]}, tmp_path / "bare.pt")
    with pytest.raises(H.CheckpointError, match=r"not a TinySSD checkpoint: it needs .*'config'"):
        H.load_model(tmp_path / "bare.pt")
    with pytest.raises(H.CheckpointError, match="num_classes=1, not 2"):
        H.load_model(checkpoint, num_classes=2)
    state["config"]["num_classes"] = 2
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(H.CheckpointError,
                       match=r"cls_heads.0.weight .* weights are for num_classes=1") as error:
        H.load_model(tmp_path / "mixed.pt")
    assert "\n" not in str(error.value)


def test_nan_weights_are_refused_on_load_and_save(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["blks.0.0.0.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(H.CheckpointError, match=r"1 weight tensors hold NaN .* blks.0.0.0.weight"):
        H.load_model(tmp_path / "nan.pt")
    net = H.load_model(checkpoint)[0]
    with torch.no_grad():
        net.cls_heads[1].bias.fill_(float("inf"))
    with pytest.raises(H.CheckpointError, match="not saving"):
        H.save_checkpoint(checkpoint, net)
    H.load_model(checkpoint)  # the good file is still there


# ---------------------------------------------------------- 7. CSV encodings

def test_utf8_bom_is_read(bananas, tmp_path):
    folder = split_copy(bananas, tmp_path)
    text = (folder / "label.csv").read_bytes()
    (folder / "label.csv").write_bytes(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"))
    images, labels = H.read_detection_folder(folder)
    assert torch.equal(labels, H.read_detection_folder(bananas / "bananas_val")[1])


def test_other_encodings_name_the_file_and_row(bananas, tmp_path):
    folder = split_copy(bananas, tmp_path)
    (folder / "images" / "0.png").rename(folder / "images" / "café.png")
    edit_row(folder, 2, "café.png" + (folder / "label.csv").read_text().splitlines()[1][5:])
    text = (folder / "label.csv").read_text()
    H.read_detection_folder(folder)  # UTF-8 with an accent: fine
    (folder / "label.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(H.DatasetError, match=r"label.csv row 2: byte 0xe9 is not UTF-8.*CSV UTF-8"):
        H.read_detection_folder(folder)
    (folder / "label.csv").write_bytes(text.encode("utf-16"))
    with pytest.raises(H.DatasetError, match="label.csv is UTF-16"):
        H.read_detection_folder(folder)
    (folder / "label.csv").write_text(text.replace(",", ";"))
    with pytest.raises(H.DatasetError, match="separate fields with ';'"):
        H.read_detection_folder(folder)
    (folder / "label.csv").write_bytes(b"img_name,label,xmin,ymin,xmax,ymax\n0.png,0,1\x00,2,3,4\n")
    with pytest.raises(H.DatasetError, match="label.csv row 2"):
        H.read_detection_folder(folder)


def test_nothing_outside_the_project_is_touched_by_reading(bananas, tmp_path):
    folder = split_copy(bananas, tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    H.read_detection_folder(folder)
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes())
                      for p in folder.rglob("*") if p.is_file()}
    assert os.listdir(tmp_path) == ["split"]


def test_scratch_folders_never_take_a_users_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for remove in (False, True):
        with pytest.raises(FileExistsError, match="not made by scratch_folder"):
            H.scratch_folder(tmp_path / "mine", remove=remove)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    scratch = H.scratch_folder(tmp_path / "scratch")
    (scratch / "result.txt").write_text("old")
    # emptied
    assert sorted(p.name for p in H.scratch_folder(scratch).iterdir()) == [MANIFEST]
    H.scratch_folder(scratch, remove=True)
    assert not scratch.exists()
