"""Your own data (notebook 11): VOC, COCO and CSV readers, the validation report, detect_folder and
the shell."""
import json
import re
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageDraw

import ssd_helpers as H

NAMES = ("banana", "orange")


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    root = H.generate_fruit_detection(tmp_path_factory.mktemp("f") / "fruit", num_train=16,
                                      num_val=6)
    return {split: H.read_detection_folder(root / f"fruit_{split}", num_classes=2)
            for split in ("train", "val")}


@pytest.fixture(scope="module")
def exported(fruit, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    return {fmt: H.export_dataset(base / fmt, fmt, fruit, NAMES) for fmt in ("voc", "coco", "csv")}


def path_of(exported, fmt, split):
    return {"voc": exported["voc"], "coco": exported["coco"] / f"{split}.json",
            "csv": exported["csv"] / f"{split}.csv"}[fmt]


@pytest.mark.parametrize("fmt", ["voc", "coco", "csv"])
def test_every_format_reads_back_to_the_native_labels(fruit, exported, fmt):
    for split in ("train", "val"):
        data = H.read_dataset(path_of(exported, fmt, split), split=split)
        assert data.class_names == NAMES
        assert (torch.equal(data.images, fruit[split][0])
                and torch.equal(data.labels, fruit[split][1]))
        assert data.difficult.shape == data.labels.shape[:2] and not data.difficult.any()


def test_training_from_any_format_is_training_from_the_native_reader(fruit, exported):
    histories = []
    for source in ("native", "voc", "csv"):
        data = fruit["train"]
        if source != "native":
            read = H.read_dataset(path_of(exported, source, "train"))
            data = (read.images, read.labels)
        H.set_seed(0)
        net = H.TinySSD(H.default_config(class_names=NAMES))
        histories.append(H.train_ssd(net, data, H.TrainConfig(epochs=1, batch_size=8, bf16="off"),
                                     torch.device("cpu"), progress=False)["loss"])
    assert histories[0] == histories[1] == histories[2]


def test_voc_keeps_difficult_and_counts_pixels_from_one(tmp_path):
    root = tmp_path / "voc"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    Image.new("RGB", (200, 100), (90, 90, 90)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>200</width><height>100</height></size>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>11</ymin>"
        "<xmax>50</xmax><ymax>60</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    data = H.read_dataset(root)
    assert data.class_names == ("cat",) and data.difficult[0, 0]
    # 200x100 is scaled to 256x128 and padded below: x by 256/200, y by 128/100, both then / 256
    torch.testing.assert_close(data.labels[0, 0],
                               torch.tensor([0, 0 / 200, 10 / 200, 50 / 200, 60 / 200]))
    assert data.images.shape == (1, 3, 256, 256)
    # the padding
    assert (data.images[0, :, 128:] == torch.tensor([124, 116, 104]).view(3, 1, 1)).all()


def test_coco_maps_category_ids_and_keeps_negatives(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    coco = {"images": [{"id": 10, "file_name": "a.png", "width": 64, "height": 64},
                       {"id": 11, "file_name": "b.png", "width": 64, "height": 64}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 8, 20, 10],
                             "iscrowd": 1}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    data = H.read_dataset(tmp_path / "ann.json")
    assert data.class_names == ("cat", "dog")  # category ids 3, 7 -> 0, 1
    torch.testing.assert_close(data.labels[0, 0],
                               torch.tensor([1, 4 / 64, 8 / 64, 24 / 64, 18 / 64]))
    assert (data.labels[1] == -1).all() and data.difficult[0, 0]  # b.png: a negative image


def broken_csv(exported, tmp_path):
    import shutil
    folder = tmp_path / "broken"
    shutil.copytree(exported["csv"], folder)
    path = folder / "val.csv"
    lines = path.read_text().splitlines()
    name = lambda row: lines[row - 1].split(",")[0]  # noqa: E731
    lines[1] = f"{name(2)},banana,50,50,40,60"
    lines[2] = f"{name(3)},banan,10,10,40,60"
    lines[3] = f"{name(4)},orange,0.1,0.1,0.5,0.5"
    lines[4] = f"{name(5)},orange,10,10,400,60"
    lines.append(lines[5])
    lines.append("images/missing.png,banana,1,1,20,20")
    # an image none of the edited rows are in
    (folder / name(len(lines) - 2)).write_bytes(b"not an image")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_report_lists_every_problem_at_once(exported, tmp_path):
    path = broken_csv(exported, tmp_path)
    report = H.validate_dataset(path, class_names=NAMES)
    problems = [(p["where"], p["problem"].split(" ")[0]) for p in report.problems]
    expected = {"row 2": "box", "row 3": "unknown", "row 4": "box", "row 5": "box"}
    for where, word in expected.items():
        assert (where, word) in problems, (where, problems)
    kinds = " ".join(p["problem"] for p in report.problems)
    for phrase in ("empty or inverted", "unknown class name 'banan'", "looks normalised",
                   "outside the 256x256", "duplicate box", "cannot decode",
                   "missing.png is missing"):
        assert phrase in kinds
    assert not report.ok and all(p["fix"] for p in report.problems)
    text = str(report)
    assert "7 problem(s)" in text and "anchor IoU >= 0.5" in text and "banana" in text
    with pytest.raises(H.DatasetError, match=r"7 problem\(s\).*row 2.*H.validate_dataset"):
        H.read_dataset(path, class_names=NAMES)


def test_the_report_counts_empty_images_and_compares_sizes_with_anchors(exported):
    report = H.validate_dataset(exported["csv"] / "train.csv")
    assert report.ok and report.num_images == 16
    assert report.num_without_objects == sum(
        1 for line in (exported["csv"] / "train.csv").read_text().splitlines()
        if line.endswith(",,,,,"))
    banana = next(row for row in report.classes if row["class"] == "banana")
    assert 25 <= banana["smallest px"] <= banana["median px"] <= banana["largest px"] <= 80
    assert 0 < banana["anchor IoU >= 0.5"] <= 1 and report.anchor_sides[0] == 51


def test_other_broken_formats(tmp_path, exported):
    import shutil
    voc = tmp_path / "voc"
    shutil.copytree(exported["voc"], voc)
    first = sorted((voc / "Annotations").iterdir())[0]
    first.write_text("<annotation><object>")
    second = sorted((voc / "Annotations").iterdir())[1]
    second.write_text(second.read_text().replace("<width>256</width>", "<width>300</width>"))
    report = H.validate_dataset(voc, split="train")
    texts = [(p["file"], p["problem"]) for p in report.problems]
    assert any(f == str(first) and "not valid XML" in t for f, t in texts)
    assert any(f == str(second) and "says 300x256, the image is 256x256" in t for f, t in texts)
    coco = json.loads((exported["coco"] / "val.json").read_text())
    coco["annotations"][0]["category_id"] = 99
    (tmp_path / "c.json").write_text(json.dumps(coco))
    (tmp_path / "images").symlink_to(exported["coco"] / "images")
    report = H.validate_dataset(tmp_path / "c.json")
    assert [p["problem"][:26] for p in report.problems] == ["unknown category_id 99 (kn"]
    expected = ("expected one of: a VOC folder (with Annotations/, JPEGImages/ and "
                "ImageSets/Main/), a COCO .json file, a .csv file")
    with pytest.raises(H.DatasetError, match=re.escape(f"nothing.txt does not exist: {expected}")):
        H.validate_dataset(tmp_path / "nothing.txt")
    (tmp_path / "notes.txt").write_text("image,class\n")
    with pytest.raises(H.DatasetError, match=re.escape(f"notes.txt: {expected}")):
        H.validate_dataset(tmp_path / "notes.txt")


def test_export_refuses_an_unknown_format(fruit, tmp_path):
    message = "fmt must be one of ['coco', 'csv', 'voc'], got 'yaml'"
    with pytest.raises(H.ConfigError, match=re.escape(message)):
        H.export_dataset(tmp_path / "export", "yaml", fruit, NAMES)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_each_image_is_decoded_once(exported, monkeypatch):
    opened = []
    real = H.open_image
    monkeypatch.setattr(H, "open_image",
                        lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    H.validate_dataset(exported["csv"] / "train.csv")
    assert len(opened) == len(set(opened)) == 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model.pt"
    H.set_seed(0)
    H.save_checkpoint(path, H.TinySSD(H.default_config(class_names=NAMES)))
    return path


def test_class_names_travel_with_the_model(model):
    net, config = H.load_model(model)
    assert config.class_names == NAMES and net.config.num_classes == 2
    with pytest.raises(H.ConfigError, match="class_names must be None or 3 distinct"):
        H.TinySSD(H.SSDConfig(num_classes=3, class_names=NAMES))


def drawn(monkeypatch, *args):
    """(image, label texts, box outline colours) of draw_detections(*args), in drawing order."""
    texts, outlines = [], []
    real_text, real_rectangle = ImageDraw.ImageDraw.text, ImageDraw.ImageDraw.rectangle

    def text(draw, xy, words, *more, **kwargs):
        texts.append(words)
        return real_text(draw, xy, words, *more, **kwargs)

    def rectangle(draw, xy, *more, **kwargs):
        if kwargs.get("outline") is not None:
            outlines.append(tuple(kwargs["outline"]))
        return real_rectangle(draw, xy, *more, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(ImageDraw.ImageDraw, "text", text)
        patch.setattr(ImageDraw.ImageDraw, "rectangle", rectangle)
        return H.draw_detections(*args), texts, outlines


@pytest.mark.parametrize("class_names", [("banana", "orange"), None])
def test_draw_detections_names_and_colours_classes_as_show_detections_does(monkeypatch,
                                                                            class_names):
    """One naming rule (a class id that class_names does not list is "class <id>") and one
    palette, for drawings saved to files and for matplotlib."""
    detections = torch.tensor([[0, 0.9, 4, 4, 20, 20], [1, 0.5, 30, 30, 60, 60],
                               [7, 0.25, 10, 40, 30, 60]])  # best first, as detect returns them
    pixels = torch.zeros(3, 64, 80, dtype=torch.uint8)
    image, texts, outlines = drawn(monkeypatch, pixels, detections, class_names)
    assert image.size == (80, 64) and image.mode == "RGB"
    assert texts[0] == "class 7 0.25"  # labels are drawn weakest first
    ax = matplotlib.figure.Figure().subplots()
    H.show_detections(ax, pixels, detections, class_names)
    assert texts == [t.get_text() for t in reversed(ax.texts)]
    assert outlines == [tuple(round(255 * v) for v in p.get_edgecolor()[:3]) for p in ax.patches]


def test_detect_folder_writes_drawn_images_and_a_csv_but_never_over_a_users_file(
        model, exported, tmp_path):
    net, config = H.load_model(model)
    images = exported["csv"] / "images"
    rows = H.detect_folder(net, [images], tmp_path / "out", config.class_names, threshold=0.0)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert ("detections.csv" in written
            and sum(name.endswith("_detections.png") for name in written) == 22)
    assert rows and {row[1] for row in rows} <= set(NAMES)
    H.detect_folder(net, [images], tmp_path / "out", config.class_names)  # its own files: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "detections.csv").write_text("my numbers")
    with pytest.raises(FileExistsError, match="not written by detect_folder"):
        H.detect_folder(net, [images], tmp_path / "mine", config.class_names)
    assert (tmp_path / "mine" / "detections.csv").read_text() == "my numbers"


def test_the_shell_command(model, exported, tmp_path, capsys):
    images = sorted((exported["csv"] / "images").iterdir())[:2]
    (tmp_path / "broken.png").write_bytes(b"nope")
    command = [sys.executable, "-m", "ssd_helpers", "detect", str(model), *map(str, images),
               str(tmp_path / "broken.png"), "--out", str(tmp_path / "out"), "--threshold", "0.001"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("skipped:") and "broken.png" in line for line in lines)
    first = next(line for line in lines if not line.startswith("skipped"))
    path, name, score, box = first.split("\t")
    assert (path == str(images[0]) and name in NAMES and 0 <= float(score) <= 1
            and len(box.split()) == 4)
    assert (tmp_path / "out" / f"{images[0].stem}_detections.png").is_file()
    # The same entry point in this process (one subprocess above is enough to test `python -m`):
    code = H.main(["detect", str(tmp_path / "broken.png"), str(images[0]), "--out",
                   str(tmp_path / "o2")])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error:") and "Traceback" not in error
    code = H.main(["validate", str(exported["csv"] / "val.csv")])
    assert code == 0 and "0 problem(s)" in capsys.readouterr().out


def test_exif_rotated_and_16_bit_images_in_a_csv(tmp_path):
    grey = (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    photo = Image.new("RGB", (64, 48))
    exif = photo.getexif()
    exif[ExifTags.Base.Orientation] = 6
    photo.save(tmp_path / "turned.jpg", exif=exif)
    (tmp_path / "l.csv").write_text("image,class,xmin,ymin,xmax,ymax\ndeep.png,a,1,1,30,30\n"
                                    "turned.jpg,a,1,1,30,30\n")
    report = H.validate_dataset(tmp_path / "l.csv")
    assert [p["image"] for p in report.problems] == ["turned.jpg"]
    assert "EXIF orientation 6" in report.problems[0]["problem"]


def test_coco_categories_with_the_same_name_are_refused(tmp_path):
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    with pytest.raises(H.DatasetError,
                       match=r"category id 2 .*another category has .* the name 'cat'"):
        H.read_dataset(tmp_path / "a.json")


def test_images_elsewhere_are_found_with_image_dir(exported, tmp_path):
    coco = json.loads((exported["coco"] / "val.json").read_text())
    for image in coco["images"]:
        # bare names, as many tools write them
        image["file_name"] = image["file_name"].split("/")[-1]
    (tmp_path / "val.json").write_text(json.dumps(coco))
    report = H.validate_dataset(tmp_path / "val.json")
    assert (len(report.problems) == 6
            and "to image_dir (--image-dir in the shell)" in report.problems[0]["fix"])
    data = H.read_dataset(tmp_path / "val.json", image_dir=exported["coco"] / "images")
    assert torch.equal(data.labels, H.read_dataset(exported["coco"] / "val.json").labels)


def test_own_data_checkpoint_names_its_detections(exported, tmp_path):
    train = H.read_dataset(exported["voc"], split="train")
    H.set_seed(0)
    net = H.TinySSD(H.default_config(class_names=train.class_names))
    H.train_ssd(net, (train.images, train.labels),
                H.TrainConfig(epochs=1, batch_size=8, bf16="off"),
                torch.device("cpu"), checkpoint=tmp_path / "m.pt", progress=False)
    loaded, config = H.load_model(tmp_path / "m.pt")
    assert config.class_names == NAMES
    found = H.detect(loaded, train.images[0], threshold=0.0)
    assert {config.class_names[int(c)] for c in found[:, 0]} <= set(NAMES)


def test_four_shell_commands_from_labelled_photos_to_onnx(exported, tmp_path, capsys):
    """validate, train, evaluate and export on the VOC export, in this process; then the refusals:
    data with a problem, an option out of range, an --out that exists."""
    voc = str(exported["voc"])
    assert H.main(["validate", voc]) == 0
    model = tmp_path / "model.pt"
    assert H.main(["train", voc, "--val", voc, "--epochs", "2", "--batch-size", "8",
                   "--out", str(model)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2: loss" in out and "epoch 2/2: loss" in out and "done: 2 epochs" in out
    history = H.read_checkpoint(model)["history"]
    assert len(history["loss"]) == 2  # saved after every epoch, the last one last
    assert H.main(["evaluate", str(model), voc, "--split", "val", "--out",
                   str(tmp_path / "ap.csv")]) == 0
    rows = (tmp_path / "ap.csv").read_text().splitlines()
    assert rows[0] == "class,voc_ap50,coco_ap" and [r.split(",")[0] for r in rows[1:]] == [
        "all classes", *NAMES]
    assert f"{history['AP50'][-1]:.3f}" in capsys.readouterr().out  # train's last AP, again
    assert H.main(["export", str(model), "--onnx", str(tmp_path / "model.onnx"),
                   "--threshold", "0.01"]) == 0
    assert "ONNX Runtime matches detect" in capsys.readouterr().out
    # refusals: each a one-line error and exit status 2, nothing written
    assert H.main(["evaluate", str(model), voc, "--out", str(tmp_path / "ap.csv")]) == 2
    assert H.main(["train", voc, "--epochs", "0", "--out", str(tmp_path / "m2.pt")]) == 2
    assert H.main(["train", voc, "--device", "tpu", "--out", str(tmp_path / "m2.pt")]) == 2
    broken = tmp_path / "broken.csv"
    broken.write_text("image,class,xmin,ymin,xmax,ymax\nnone.png,banana,1,1,9,9\n")
    assert H.main(["train", str(broken), "--out", str(tmp_path / "m3.pt")]) == 2
    error = capsys.readouterr().err
    assert "ap.csv exists" in error and "epochs must be" in error and "--device tpu" in error
    assert "1 problem(s); nothing was trained" in error and "ssd_helpers validate" in error
    assert not (tmp_path / "m2.pt").exists() and not (tmp_path / "m3.pt").exists()


def test_ctrl_c_in_train_leaves_the_last_complete_epoch_and_resume_goes_on(exported, tmp_path,
                                                                         capsys, monkeypatch):
    voc, model = str(exported["voc"]), tmp_path / "model.pt"
    calls, evaluate = [], H.evaluate_map

    def evaluate_then_stop(detections, labels):  # Ctrl-C while epoch 2 is validated
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(detections, labels)
    monkeypatch.setattr(H, "evaluate_map", evaluate_then_stop)
    assert H.main(["train", voc, "--val", voc, "--epochs", "3", "--batch-size", "8",
                   "--out", str(model)]) == 130
    assert "holds the model of epoch 1, the last complete one" in capsys.readouterr().err
    assert len(H.read_checkpoint(model)["history"]["loss"]) == 1
    monkeypatch.setattr(H, "evaluate_map", evaluate)
    # --resume goes on with the same options; other options are refused, and nothing is written
    before = model.read_bytes()
    assert H.main(["train", voc, "--val", voc, "--epochs", "4", "--batch-size", "8",
                   "--out", str(model), "--resume"]) == 2
    assert H.main(["train", voc, "--val", voc, "--epochs", "3", "--batch-size", "8",
                   "--out", str(tmp_path / "none.pt"), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "was trained with epochs=3, and this run asks for 4" in error
    assert "none.pt does not exist" in error and model.read_bytes() == before
    assert H.main(["train", voc, "--val", voc, "--epochs", "3", "--batch-size", "8",
                   "--out", str(model), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "after epoch 1" in out and "epoch 1/3" not in out
    assert "epoch 2/3" in out and "epoch 3/3" in out and "done: 3 epochs" in out
    assert H.main(["train", voc, "--val", voc, "--epochs", "3", "--batch-size", "8",
                   "--out", str(model), "--resume"]) == 0
    assert "already holds all 3 epochs of this run: nothing to train" in capsys.readouterr().out
    # the same model as a run that never stopped
    straight = tmp_path / "straight.pt"
    assert H.main(["train", voc, "--val", voc, "--epochs", "3", "--batch-size", "8",
                   "--out", str(straight)]) == 0
    a, b = H.read_checkpoint(model), H.read_checkpoint(straight)
    assert a["history"]["loss"] == b["history"]["loss"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_train_refuses_a_half_torchrun_environment_and_an_out_inside_a_file(exported, tmp_path,
                                                                            capsys, monkeypatch):
    voc = str(exported["voc"])
    (tmp_path / "notes").write_text("mine")
    assert H.main(["train", voc, "--epochs", "1", "--out", str(tmp_path / "notes" / "m.pt")]) == 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert H.main(["train", voc, "--epochs", "1", "--out", str(tmp_path / "m.pt")]) == 2
    error = capsys.readouterr().err
    assert "notes is a file, not a folder" in error and "nothing was written" in error
    assert "LOCAL_RANK is set but not RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
