"""Boundaries of what the series accepts and what it may touch: one regression test per known bug.

Each test names the bug it reproduces (numbered as in the bug list): a rebuild that deletes a user's
files, a checkpoint of another project replaced, readers that crash or guess on malformed VOC, COCO
and CSV files, settings that are not checked, a training step that leaves broken weights, drawn
images that overwrite each other, and a shell command that does not tell the truth.
"""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ssd_helpers as H

MANIFEST = ".tinyssd-manifest.json"  # the record of what the series wrote in a folder

CPU = torch.device("cpu")
NAMES = ("banana", "orange")
CSV_TOP = "image,class,xmin,ymin,xmax,ymax\n"


# ---------------------------------------------- helpers

def snapshot(root):
    """{path relative to root: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def photo(path, colour=(120, 120, 120), size=(64, 48)):
    """Write a small solid-colour image (PIL picks the format from the suffix); returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def only_dataset_error(function, *args, **kwargs):
    """The DatasetError function raises; any other exception type propagates and fails the test."""
    with pytest.raises(H.DatasetError) as info:
        function(*args, **kwargs)
    assert type(info.value) is H.DatasetError, type(info.value)
    return info.value


def report_or_error(path, **kwargs):
    """validate_dataset's report, or the DatasetError it may raise for a structural failure."""
    try:
        return H.validate_dataset(path, **kwargs)
    except H.DatasetError as error:
        assert type(error) is H.DatasetError, type(error)
        return error


def exit_code(argv):
    """H.main's exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return H.main(argv)
    except SystemExit as stop:
        return stop.code


def write_voc(root, annotations):
    """A VOC folder with split train: {image id: XML body inside <annotation>}; 64x48 images."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, body in annotations.items():
        photo(root / "JPEGImages" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename>{body}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in annotations))
    return root


def voc_size(width=64, height=48):
    return f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"


def voc_object(box, name="<name>cat</name>"):
    xmin, ymin, xmax, ymax = box
    return (f"<object>{name}<difficult>0</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


# ---------------------------------------------- bug 1: a rebuild deletes a user's files

USER_FILES = ["results.csv", "predictions.json", "images/my_photo.png",
              "bananas_train/images/100.png"]


@pytest.mark.parametrize("name", USER_FILES)
def test_bug1_rebuild_refuses_and_keeps_a_users_file_in_the_dataset(tmp_path, name):
    root = H.generate_banana_detection(tmp_path / "bananas", num_train=10, num_val=5)
    if name.endswith(".png"):
        photo(root / name, (10, 200, 30))  # a user's labelled photo, in a name the series uses
    else:
        (root / name).write_text("my numbers\n")
    before = snapshot(root)
    with pytest.raises(FileExistsError) as info:
        H.generate_banana_detection(root, num_train=12, num_val=5)
    assert name in str(info.value)
    assert snapshot(root) == before  # the user's file and the old dataset, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["bananas"]


@pytest.mark.parametrize("generate", [H.generate_banana_detection, H.generate_small_bananas,
                                      H.generate_fruit_detection])
def test_bug1_every_generator_keeps_a_users_results_csv(tmp_path, generate):
    root = generate(tmp_path / "data", num_train=3, num_val=1)
    (root / "results.csv").write_text("epoch,AP\n1,0.5\n")
    before = snapshot(root)
    with pytest.raises(FileExistsError, match="results.csv"):
        generate(root, num_train=4, num_val=1)
    assert snapshot(root) == before


def test_bug1_rebuild_refuses_when_a_generated_file_was_edited(tmp_path):
    root = H.generate_banana_detection(tmp_path / "bananas", num_train=10, num_val=5)
    label = root / "bananas_train" / "label.csv"
    lines = label.read_text().splitlines()
    lines[1] = "0.png,0,1,1,30,30"  # the user corrected a box by hand
    label.write_text("\n".join(lines) + "\n")
    before = snapshot(root)
    with pytest.raises(FileExistsError, match="bananas_train/label.csv"):
        H.generate_banana_detection(root, num_train=12, num_val=5)
    assert snapshot(root) == before


def test_bug1_rebuild_of_an_untouched_dataset_still_replaces_it(tmp_path):
    root = H.generate_banana_detection(tmp_path / "bananas", num_train=10, num_val=5)
    assert H.generate_banana_detection(root, num_train=12, num_val=5) == root
    assert len(list((root / "bananas_train" / "images").glob("*.png"))) == 12
    images, _ = H.read_detection_folder(root / "bananas_train")
    assert len(images) == 12
    H.generate_banana_detection(root, num_train=10, num_val=5)  # and back again
    assert len(list((root / "bananas_train" / "images").glob("*.png"))) == 10


@pytest.fixture(scope="module")
def fruit_splits(tmp_path_factory):
    root = H.generate_fruit_detection(tmp_path_factory.mktemp("fruit") / "fruit", num_train=6,
                                      num_val=1)
    images, labels = H.read_detection_folder(root / "fruit_train", num_classes=2)
    first = {"train": (images[:4], labels[:4]), "val": (images[4:], labels[4:])}
    other = {"train": (images[:2], labels[:2])}
    return first, other


@pytest.mark.parametrize("fmt, name", [
    ("csv", "mine.csv"), ("coco", "mine.csv"), ("voc", "mine.csv"),
    ("csv", "images/kitchen_01.png"), ("coco", "images/kitchen_01.png"),
    ("voc", "JPEGImages/kitchen_01.png"),
])
def test_bug1_export_again_keeps_a_users_file(fruit_splits, tmp_path, fmt, name):
    first, other = fruit_splits
    root = H.export_dataset(tmp_path / "export", fmt, first, NAMES)
    if name.endswith(".png"):
        photo(root / name, (200, 180, 20))
    else:
        (root / name).write_text("image,class,xmin,ymin,xmax,ymax\nkitchen.png,cup,1,1,9,9\n")
    before = snapshot(root)
    with pytest.raises(FileExistsError) as info:
        H.export_dataset(root, fmt, other, NAMES)
    assert name in str(info.value)
    assert snapshot(root) == before


def test_bug1_export_again_refuses_when_an_exported_file_was_edited(fruit_splits, tmp_path):
    first, other = fruit_splits
    root = H.export_dataset(tmp_path / "export", "csv", first, NAMES)
    with open(root / "train.csv", "a") as f:
        f.write("images/train_000000.png,orange,1,1,30,30\n")  # a box the user added by hand
    before = snapshot(root)
    with pytest.raises(FileExistsError, match="train.csv"):
        H.export_dataset(root, "csv", other, NAMES)
    assert snapshot(root) == before


def test_bug1_export_again_over_an_untouched_export_replaces_it(fruit_splits, tmp_path):
    first, other = fruit_splits
    root = H.export_dataset(tmp_path / "export", "csv", first, NAMES)
    H.export_dataset(root, "csv", other, NAMES)
    data = H.read_dataset(root / "train.csv", class_names=NAMES)
    images, labels = other["train"]
    width = data.labels.shape[1]  # the read labels are padded to this data's most objects
    assert torch.equal(data.images, images) and torch.equal(data.labels, labels[:, :width])
    assert (labels[:, width:] == -1).all() and not (root / "val.csv").exists()


@pytest.fixture(scope="module")
def tiny_net():
    H.set_seed(0)
    return H.TinySSD(H.default_config()).eval()


def test_bug1_detect_folder_keeps_a_detections_csv_the_user_edited(tiny_net, tmp_path):
    photo(tmp_path / "in" / "a.png", size=(64, 64))
    out = tmp_path / "out"
    H.detect_folder(tiny_net, [tmp_path / "in"], out, threshold=0.99, echo=[].append)
    H.detect_folder(tiny_net, [tmp_path / "in"], out, threshold=0.99, echo=[].append)  # its own
    with open(out / "detections.csv", "a") as f:
        f.write("my note: checked by hand\n")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="detections.csv"):
        H.detect_folder(tiny_net, [tmp_path / "in"], out, threshold=0.99, echo=[].append)
    assert snapshot(out) == before


# ---------------------------------------------- bug 2: another project's checkpoint

def test_bug2_save_checkpoint_keeps_another_projects_checkpoint(tmp_path):
    net = H.TinySSD(H.default_config())
    path = tmp_path / "my_resnet.pt"
    torch.save({"state_dict": net.state_dict(), "config": {"lr": 0.1}, "epoch": 90}, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        H.save_checkpoint(path, net)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["my_resnet.pt"]  # no temporary left


def test_bug2_save_checkpoint_still_replaces_its_own_file(tmp_path):
    path = tmp_path / "model.pt"
    H.save_checkpoint(path, H.TinySSD(H.default_config()))
    H.set_seed(1)
    net = H.TinySSD(H.default_config(class_names=NAMES))
    H.save_checkpoint(path, net)
    loaded, config = H.load_model(path)
    assert config.class_names == NAMES
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


# ---------------------------------------------- bug 3: two COCO images, one id

def test_bug3_coco_images_sharing_an_id_are_a_problem(tmp_path):
    photo(tmp_path / "a.png", (200, 20, 20))
    photo(tmp_path / "b.png", (20, 20, 200))
    coco = {"images": [{"id": 4242, "file_name": "a.png", "width": 64, "height": 48},
                       {"id": 4242, "file_name": "b.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 4242, "category_id": 1, "bbox": [2, 2, 20, 20]}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    report = H.validate_dataset(path, size=64)  # a problem to list, not a reason to stop
    assert not report.ok
    assert any("4242" in p["problem"] + p["where"] for p in report.problems), report.problems
    only_dataset_error(H.read_dataset, path, size=64)


# ---------------------------------------------- bug 4: a box without a class name

def test_bug4_csv_box_with_an_empty_class_is_a_problem(tmp_path):
    photo(tmp_path / "a.png")
    photo(tmp_path / "b.png")
    path = tmp_path / "labels.csv"
    path.write_text(CSV_TOP + "a.png,,10,10,40,40\nb.png,cat,5,5,30,30\n")
    report = H.validate_dataset(path, size=64)
    assert not report.ok
    assert any(p["where"] == "row 2" for p in report.problems), report.problems
    error = only_dataset_error(H.read_dataset, path, size=64)
    assert "row 2" in str(error)


def test_bug4_voc_object_without_a_name_is_a_problem(tmp_path):
    root = write_voc(tmp_path / "voc", {
        "a": voc_size() + voc_object((5, 5, 20, 20), name=""),
        "b": voc_size() + voc_object((5, 5, 30, 30)),
    })
    report = H.validate_dataset(root, size=64)
    assert not report.ok
    assert any(p["file"].endswith("a.xml") for p in report.problems), report.problems
    assert "" not in {row["class"] for row in report.classes}
    error = only_dataset_error(H.read_dataset, root, size=64)
    assert "a.xml" in str(error)


def test_bug4_a_row_with_all_five_fields_empty_is_still_an_image_without_objects(tmp_path):
    photo(tmp_path / "a.png")
    photo(tmp_path / "b.png")
    path = tmp_path / "labels.csv"
    path.write_text(CSV_TOP + "a.png,,,,,\nb.png,cat,16,16,48,32\n")
    assert H.validate_dataset(path, size=64).ok
    data = H.read_dataset(path, size=64)
    assert data.class_names == ("cat",)
    assert (data.labels[0] == -1).all()
    torch.testing.assert_close(data.labels[1, 0], torch.tensor([0, .25, .25, .75, .5]))


# ---------------------------------------------- bug 5: settings and a step that diverges

@pytest.mark.parametrize("field, value", [
    ("momentum", math.nan), ("lr", math.nan), ("weight_decay", math.inf), ("batch_size", 0),
    ("epochs", -1), ("lr", 0), ("neg_ratio", -1), ("schedule", "linear"), ("bf16", "yes"),
    ("batch_size", 2.5),
])
def test_bug5_train_config_refuses_a_bad_value_and_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        H.TrainConfig(**{field: value})
    assert isinstance(info.value, H.ConfigError), type(info.value)


@pytest.mark.parametrize("field, value", [
    ("num_classes", 0), ("sizes", ((math.nan, 0.2),) * 5),
])
def test_bug5_ssd_config_refuses_a_bad_value_and_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        H.SSDConfig(**{field: value})
    assert isinstance(info.value, H.ConfigError), type(info.value)


def test_bug5_valid_settings_are_still_accepted():
    H.TrainConfig()
    H.TrainConfig.book_recipe()
    H.TrainConfig(epochs=1, batch_size=1, momentum=0.9, neg_ratio=0, warmup_epochs=0,
                  schedule="constant", bf16="off", weight_decay=0)
    H.SSDConfig()
    H.default_config(class_names=NAMES)


def test_bug5_train_step_that_breaks_the_weights_blames_lr_and_keeps_the_model():
    torch.manual_seed(0)
    net = H.TinySSD(H.default_config())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([[[0, .2, .2, .6, .6]], [[0, .2, .2, .6, .6]]])
    optimizer = torch.optim.SGD(net.parameters(), lr=1e38)  # finite loss and gradients, inf weights
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(FloatingPointError) as info:
        H.train_step(net, optimizer, images, labels, H.TrainConfig(bf16="off"), CPU)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    message = str(info.value)
    assert "lr" in message or "learning rate" in message, message
    assert "image(s)" not in message and "batch image" not in message, message


# ---------------------------------------------- bug 6: a stray quote in a large CSV

def stray_quote_rows(first, quoted):
    """Rows 2 and 3, then 5000 rows: row 3 opens a quote that never closes (> 131072 characters)."""
    rows = [first, quoted] + [f"photo_{i:05d}.png,cat,1,1,20,20" for i in range(5000)]
    return "\n".join(rows) + "\n"


def test_bug6_stray_quote_in_a_large_csv_dataset_names_file_and_row(tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text(CSV_TOP + stray_quote_rows("a.png,cat,1,1,5,5", 'b.png,"cat,1,1,5,5'))
    assert len(path.read_text()) > 131072 + 10000
    error = only_dataset_error(H.read_dataset, path, size=64)
    assert "big.csv" in str(error) and re.search(r"\brows? 3\b", str(error)), str(error)
    assert H.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "big.csv" in err and "Traceback" not in err


def test_bug6_stray_quote_in_d2l_label_csv_names_the_row_of_the_quote(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    text = stray_quote_rows("0.png,0,1,1,5,5", '1.png,"0,1,1,5,5').replace(",cat,", ",0,")
    (folder / "label.csv").write_text("img_name,label,xmin,ymin,xmax,ymax\n" + text)
    error = only_dataset_error(H.read_detection_folder, folder)
    assert "label.csv" in str(error) and re.search(r"\brows? 3\b", str(error)), str(error)


# ---------------------------------------------- bug 7: a VOC size that is not a number

@pytest.mark.parametrize("width", ["abc", "640px"])
def test_bug7_voc_size_that_is_not_a_number_is_reported_and_the_rest_still_checked(tmp_path, width):
    root = write_voc(tmp_path / "voc", {
        "a": voc_size(width=width) + voc_object((5, 5, 20, 20)),
        "b": voc_size() + voc_object((5, 5, 200, 20)),  # a real problem: outside the 64x48 image
        "c": voc_size() + voc_object((5, 5, 30, 30)),
    })
    report = H.validate_dataset(root, size=64)
    files = [p["file"] for p in report.problems]
    assert any(f.endswith("a.xml") for f in files), report.problems
    assert any(f.endswith("b.xml") for f in files), report.problems
    assert not any(f.endswith("c.xml") for f in files), report.problems
    error = only_dataset_error(H.read_dataset, root, size=64)
    assert "a.xml" in str(error)


# ---------------------------------------------- bug 8: malformed COCO

def drop(key):
    return lambda part: part.pop(key)


MALFORMED_COCO = {
    "category without name": ("categories", 0, drop("name")),
    "image without file_name": ("images", 0, drop("file_name")),
    "images is null": (None, None, lambda coco: coco.update(images=None)),
    "annotation without bbox": ("annotations", 0, drop("bbox")),
    "bbox of 3 numbers": ("annotations", 0, lambda ann: ann.update(bbox=[2, 2, 20])),
    "bbox with a string": ("annotations", 0, lambda ann: ann.update(bbox=[2, 2, "wide", 20])),
    "categories is a string": (None, None, lambda coco: coco.update(categories="x")),
}


@pytest.mark.parametrize("case", list(MALFORMED_COCO))
def test_bug8_malformed_coco_is_a_dataset_error_naming_the_file(tmp_path, case):
    photo(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]}]}
    key, index, edit = MALFORMED_COCO[case]
    edit(coco if key is None else coco[key][index])
    path = tmp_path / "broken_ann.json"
    path.write_text(json.dumps(coco))
    error = only_dataset_error(H.read_dataset, path, size=64)
    assert "broken_ann.json" in str(error)
    found = report_or_error(path, size=64)  # never KeyError or TypeError
    assert isinstance(found, H.DatasetError) or not found.ok


def test_bug8_the_well_formed_coco_of_those_cases_reads(tmp_path):
    photo(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    data = H.read_dataset(tmp_path / "ann.json", size=64)
    expected = torch.tensor([0, 2, 2, 22, 22]) / torch.tensor([1, 64, 64, 64, 64])
    torch.testing.assert_close(data.labels[0, 0], expected)


# ---------------------------------------------- bug 9: one photo, two spellings

def test_bug9_one_photo_under_two_spellings_is_one_image_with_both_boxes(tmp_path):
    photo(tmp_path / "a.png")
    path = tmp_path / "labels.csv"
    path.write_text(CSV_TOP + "a.png,cat,16,16,48,32\n./a.png,cat,0,8,32,40\n")
    data = H.read_dataset(path, size=64)
    assert len(data.files) == 1 and data.images.shape[0] == 1, data.files
    rows = sorted(map(tuple, data.labels[0].tolist()))
    assert rows == [(0, 0, .125, .5, .625), (0, .25, .25, .75, .5)]


# ---------------------------------------------- bug 10: drawn images collide

def drawn_colours(out_dir):
    """The median RGB colour of each drawn image written into out_dir."""
    colours = []
    for path in sorted(out_dir.glob("*.png")):
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
        colours.append(tuple(pixels.reshape(-1, 3).median(dim=0).values.tolist()))
    return colours


def is_red(colour):
    return colour[0] > 150 and colour[2] < 100


def is_blue(colour):
    return colour[2] > 150 and colour[0] < 100


def test_bug10_same_stem_different_suffix_gives_two_drawn_images(tiny_net, tmp_path):
    photo(tmp_path / "in" / "x.jpg", (220, 20, 20), (64, 64))
    photo(tmp_path / "in" / "x.png", (20, 20, 220), (64, 64))
    H.detect_folder(tiny_net, [tmp_path / "in"], tmp_path / "out", threshold=0.99, echo=[].append)
    colours = drawn_colours(tmp_path / "out")
    assert len(colours) == 2, sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(map(is_red, colours)) and any(map(is_blue, colours)), colours


def test_bug10_same_name_in_folders_of_the_same_name_gives_two_drawn_images(tiny_net, tmp_path):
    first = photo(tmp_path / "p" / "a.jpg", (220, 20, 20), (64, 64))
    second = photo(tmp_path / "q" / "p" / "a.jpg", (20, 20, 220), (64, 64))
    H.detect_folder(tiny_net, [first, second], tmp_path / "out", threshold=0.99, echo=[].append)
    colours = drawn_colours(tmp_path / "out")
    assert len(colours) == 2, sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(map(is_red, colours)) and any(map(is_blue, colours)), colours


# ---------------------------------------------- bug 11: VOC boxes at pixel 0

@pytest.mark.parametrize("xmin, ymin", [(0, 0), (0, 1), (1, 0)])
def test_bug11_voc_zero_means_the_box_touches_the_edge(tmp_path, xmin, ymin):
    root = write_voc(tmp_path / "voc", {"a": voc_size() + voc_object((xmin, ymin, 20, 30))})
    data = H.read_dataset(root, size=64)  # 64x48: scale 1, padded below
    torch.testing.assert_close(data.labels[0, 0], torch.tensor([0, 0, 0, 20 / 64, 30 / 64]))


# ---------------------------------------------- the shell tells the truth

@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_net):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    H.save_checkpoint(path, tiny_net)
    return path


def test_shell_validate_finds_csv_images_elsewhere_with_image_dir(tmp_path, capsys):
    photo(tmp_path / "pictures" / "a.png")
    (tmp_path / "labels").mkdir()
    path = tmp_path / "labels" / "train.csv"
    path.write_text(CSV_TOP + "a.png,cat,5,5,30,30\n")
    assert exit_code(["validate", str(path)]) == 1  # a.png is not next to the CSV
    capsys.readouterr()
    assert exit_code(["validate", str(path), "--image-dir", str(tmp_path / "pictures")]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_shell_validate_finds_coco_images_elsewhere_with_image_dir(tmp_path, capsys):
    photo(tmp_path / "pictures" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20]}]}
    (tmp_path / "labels").mkdir()
    path = tmp_path / "labels" / "train.json"
    path.write_text(json.dumps(coco))
    assert exit_code(["validate", str(path)]) == 1
    capsys.readouterr()
    assert exit_code(["validate", str(path), "--image-dir", str(tmp_path / "pictures")]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_shell_detect_fails_when_an_input_path_is_missing(model, tmp_path, capsys):
    good = photo(tmp_path / "in" / "a.png", size=(64, 64))
    missing = tmp_path / "in" / "typo.png"
    code = exit_code(["detect", str(model), str(good), str(missing), "--out", str(tmp_path / "o")])
    output = capsys.readouterr()
    assert code in (1, 2), code
    assert "typo.png" in output.out + output.err


def test_shell_detect_fails_when_no_image_could_be_read(model, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code = exit_code(["detect", str(model), str(tmp_path / "broken.png"), "--out",
                      str(tmp_path / "o")])
    capsys.readouterr()
    assert code in (1, 2), code


@pytest.mark.parametrize("threshold", ["1.5", "0", "-1", "nan"])
def test_shell_detect_refuses_a_threshold_outside_0_to_1(model, tmp_path, capsys, threshold):
    good = photo(tmp_path / "in" / "a.png", size=(64, 64))
    out = tmp_path / "out"
    code = exit_code(["detect", str(model), str(good), "--out", str(out), "--threshold", threshold])
    capsys.readouterr()
    assert code == 2 and not out.exists()


def test_shell_detect_accepts_a_threshold_inside_0_to_1(model, tmp_path, capsys):
    good = photo(tmp_path / "in" / "a.png", size=(64, 64))
    code = exit_code(["detect", str(model), str(good), "--out", str(tmp_path / "out"),
                      "--threshold", "0.99"])
    capsys.readouterr()
    assert code == 0 and (tmp_path / "out" / "detections.csv").is_file()


def test_shell_detect_refuses_out_that_is_an_existing_file(model, tmp_path, capsys):
    good = photo(tmp_path / "in" / "a.png", size=(64, 64))
    (tmp_path / "notes.txt").write_text("mine")
    code = exit_code(["detect", str(model), str(good), "--out", str(tmp_path / "notes.txt")])
    assert code == 2 and capsys.readouterr().err.startswith("error:")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_shell_detect_refuses_out_that_is_the_input_folder(model, tmp_path, capsys):
    folder = tmp_path / "holiday"
    photo(folder / "beach.png", (30, 90, 200), (64, 64))
    photo(folder / "hill.jpg", (30, 160, 40), (64, 64))
    before = snapshot(folder)
    code = exit_code(["detect", str(model), str(folder), "--out", str(folder)])
    assert code == 2 and capsys.readouterr().err.startswith("error:")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == [
        "beach.png", "hill.jpg"]


# ------------------------------------------------------------ data of the wrong shape, in memory

@pytest.mark.parametrize("data, message", [
    (lambda images, labels: [images], "must be \\(images, labels\\), two tensors"),
    (lambda images, labels: (images, labels[:-1]), "holds 2 images and 1 labels"),
    (lambda images, labels: (images[:0], labels[:0]), "holds 0 images"),
])
def test_train_ssd_names_data_of_the_wrong_shape(data, message):
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    labels = torch.tensor([[[0, 0.2, 0.2, 0.6, 0.6]]] * 2)
    net = H.TinySSD(H.default_config())
    with pytest.raises(H.DatasetError, match=message):
        H.train_ssd(net, data(images, labels), H.TrainConfig(epochs=1, bf16="off"), CPU,
                    progress=False)


def test_load_model_names_a_float_stride_and_a_weight_of_no_dimensions(tmp_path):
    """Two checkpoints the fuzzing found: first_stride 2.0 was kept as a float, and a 0-dim head
    weight raised IndexError from the hint about the number of classes."""
    path = tmp_path / "model.pt"
    H.save_checkpoint(path, H.TinySSD(H.default_config()))
    for edit, message in [(lambda c: c["config"].update(first_stride=2.0), "first_stride"),
                          (lambda c: c["state_dict"].update(
                              {"cls_heads.0.weight": torch.tensor(1.0)}),
                           "cls_heads.0.weight")]:
        checkpoint = torch.load(path, weights_only=True)
        edit(checkpoint)
        torch.save(checkpoint, tmp_path / "edited.pt")
        with pytest.raises(H.CheckpointError, match=message):
            H.load_model(tmp_path / "edited.pt")


# ------------------------------------------------------------------ found in review

def test_detect_folder_and_export_onnx_never_replace_a_manifest_or_a_link_they_did_not_write(
        tiny_net, tmp_path):
    photo(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("my notes")
    with pytest.raises(FileExistsError, match="was not written by the series"):
        H.detect_folder(tiny_net, [tmp_path / "a.png"], out)
    assert (out / MANIFEST).read_text() == "my notes"
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(FileExistsError, match="not written by export_onnx"):
        H.export_onnx(tiny_net, tmp_path / "link.onnx")
    assert (tmp_path / "link.onnx").is_symlink()


def test_numbers_and_names_python_cannot_convert_are_problems_not_crashes(tmp_path):
    photo(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10**400, 1, 5, 5]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    problem = H.validate_dataset(tmp_path / "c.json").problems[0]["problem"]
    assert "bbox must be four numbers" in problem
    (tmp_path / "d.json").write_text('{"images": [{"id": ' + "9" * 5000 + "}]}")
    only_dataset_error(H.read_dataset, tmp_path / "d.json")
    (tmp_path / "e.csv").write_text("image,class,xmin,ymin,xmax,ymax\n" + "y" * 300
                                    + ".png,cat,1,1,5,5\n")
    assert "is missing" in H.validate_dataset(tmp_path / "e.csv").problems[0]["problem"]
    assert exit_code(["validate", str(tmp_path / ("x" * 300 + ".csv"))]) == 2
