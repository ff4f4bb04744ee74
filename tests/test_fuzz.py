"""Property tests (hypothesis) for what users hand the series: datasets, image files, checkpoints.

What is fuzzed:
- read_dataset and validate_dataset. A small valid dataset (1..4 PNG images of 8..48 pixels a
  side, 0..3 boxes each) is drawn and written by this file's own writers as a Pascal VOC folder,
  a COCO .json or a .csv. Unchanged, it must read back to exactly the labels computed here. Then
  one mutation is drawn and applied to the written files: a key or element dropped or retyped,
  ids duplicated, a stray quote, a BOM, UTF-16 or Latin-1 text, columns shuffled, 0, negative,
  NaN, inf and huge numbers, broken XML or JSON, image files renamed, deleted, re-encoded or
  resized, names like "./a.png" or "A.PNG". Each mutation says what a correct reader does: read
  the labels the files now describe, refuse with DatasetError, either of the two, or (when the
  change cannot be detected) return any well-formed data. Whatever happens, the only exception
  allowed is DatasetError itself, its message names a file involved, and validate_dataset agrees
  (report.ok exactly when read_dataset reads the data).
- to_image_tensor on bytes: random bytes, and small PNG, JPEG, TIFF, BMP and GIF files in many
  pixel modes, whole, truncated or with bytes flipped: a uint8 (3, H, W) tensor or DatasetError
  naming the path.
- load_model on bytes: random bytes, a real checkpoint truncated or with bytes flipped, and
  torch.save of edited checkpoint dicts (keys dropped, config values of the wrong type or
  nesting, weights of the wrong shape or type, NaN): a usable (net, config) or CheckpointError
  naming the path.

Profiles (registered in tests/conftest.py): "default" runs a few examples per test, for make test;
the long profile runs about a thousand per test:

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider
"""
import csv
import dataclasses
import io
import json
import math
import pathlib
import tempfile
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import ExifTags, Image

import ssd_helpers as H

SIZE = 64  # the side read_dataset scales to: small, so each example is quick
FORMATS = ("voc", "coco", "csv")
CLASS_NAMES = ("cat", "dog", "owl")
MIN_SIDE = 2  # a 1-pixel box in a corner, (0, 0, 1, 1), looks normalised: the reader may refuse it
VOC_LIST = "ImageSets/Main/train.txt"
ANNOTATION = {"coco": "labels.json", "csv": "labels.csv"}
CSV_HEADER = ["image", "class", "xmin", "ymin", "xmax", "ymax"]

# What a correct reader does with a mutated dataset:
EXACT = "the labels of the data the files describe"
EITHER = "those labels, or DatasetError"
REFUSE = "DatasetError"
SANE = "well-formed labels, or DatasetError"  # the change cannot be told from valid data


# ------------------------------------------------------------------ 1. valid datasets

@dataclasses.dataclass(frozen=True)
class Box:
    name: str
    x0: int  # pixels, max exclusive: the box covers columns x0..x1-1
    y0: int
    x1: int
    y1: int
    flag: bool | None = False  # VOC's difficult, COCO's iscrowd; None: either is right


@dataclasses.dataclass(frozen=True)
class Pic:
    stem: str  # the VOC id
    file: str  # the image's name on disk
    width: int
    height: int
    boxes: tuple = ()


@dataclasses.dataclass(frozen=True)
class Data:
    pics: tuple
    categories: tuple  # COCO: ((id, name), ...) in the file's order


@st.composite
def boxes_in(draw, width, height):
    x0 = draw(st.integers(0, width - MIN_SIDE))
    y0 = draw(st.integers(0, height - MIN_SIDE))
    x1 = draw(st.integers(x0 + MIN_SIDE, width))
    y1 = draw(st.integers(y0 + MIN_SIDE, height))
    return Box(draw(st.sampled_from(CLASS_NAMES)), x0, y0, x1, y1, draw(st.booleans()))


@st.composite
def pictures(draw, index, min_boxes=0):
    width, height = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    boxes = draw(st.lists(boxes_in(width, height), min_size=min_boxes, max_size=3,
                          unique_by=lambda b: (b.name, b.x0, b.y0, b.x1, b.y1)))
    return Pic(f"p{index}", f"p{index}.png", width, height, tuple(boxes))


@st.composite
def datasets(draw, boxed=False):
    """1..4 pictures with 0..3 boxes each (boxed: at least one box in all)."""
    count = draw(st.integers(1, 4))
    pics = tuple(draw(pictures(i, min_boxes=int(boxed and i == 0))) for i in range(count))
    ids = draw(st.lists(st.integers(0, 9), min_size=3, max_size=3, unique=True))
    return Data(pics, tuple(zip(ids, draw(st.permutations(CLASS_NAMES)))))


def replace_box(data, i, j, **changes):
    boxes = list(data.pics[i].boxes)
    boxes[j] = dataclasses.replace(boxes[j], **changes)
    return replace_pic(data, i, boxes=tuple(boxes))


def drop_box(data, i, j):
    boxes = data.pics[i].boxes
    return replace_pic(data, i, boxes=boxes[:j] + boxes[j + 1:])


def replace_pic(data, i, **changes):
    pics = list(data.pics)
    pics[i] = dataclasses.replace(pics[i], **changes)
    return dataclasses.replace(data, pics=tuple(pics))


def drop_pic(data, i):
    return dataclasses.replace(data, pics=data.pics[:i] + data.pics[i + 1:])


def rename_class(data, old, new):
    pics = tuple(dataclasses.replace(p, boxes=tuple(
        dataclasses.replace(b, name=new) if b.name == old else b for b in p.boxes))
        for p in data.pics)
    categories = tuple((cid, new if name == old else name) for cid, name in data.categories)
    return Data(pics, categories)


def box_refs(data):
    return [(i, j) for i, pic in enumerate(data.pics) for j in range(len(pic.boxes))]


def is_valid(data, fmt):
    """True if the dataset is one a reader must accept: boxes inside, distinct, named."""
    if not data.pics:
        return False
    for pic in data.pics:
        keys = [(b.name, b.x0, b.y0, b.x1, b.y1) for b in pic.boxes]
        if len(set(keys)) != len(keys):
            return False
        for b in pic.boxes:
            if not (b.name.strip() and 0 <= b.x0 < b.x1 <= pic.width
                    and 0 <= b.y0 < b.y1 <= pic.height):
                return False
    if fmt == "coco":
        ids, names = [c for c, _ in data.categories], [n for _, n in data.categories]
        used = {b.name for pic in data.pics for b in pic.boxes}
        return len(set(ids)) == len(ids) and len(set(names)) == len(names) and used <= set(names)
    return True


# ------------------------------------------------------------------ 2. writers

def pixels(width, height):
    """A small RGB picture (H, W, 3) uint8; its content does not matter to the labels."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 5 % 256, y * 5 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def encoded(image, fmt="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(width, height):
    return encoded(Image.fromarray(pixels(width, height)))


def image_key(fmt, file):
    """Where an image lies in the dataset folder."""
    return f"JPEGImages/{file}" if fmt == "voc" else f"images/{file}"


def reference(fmt, file):
    """How the annotation file names an image."""
    return file if fmt == "voc" else f"images/{file}"


def voc_tree(pic):
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "filename").text = pic.file
    size = ElementTree.SubElement(root, "size")
    ElementTree.SubElement(size, "width").text = str(pic.width)
    ElementTree.SubElement(size, "height").text = str(pic.height)
    for box in pic.boxes:
        obj = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(obj, "name").text = box.name
        ElementTree.SubElement(obj, "difficult").text = str(int(box.flag))
        bndbox = ElementTree.SubElement(obj, "bndbox")
        # VOC counts pixels from 1 and its xmax is the last pixel inside
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"),
                              (box.x0 + 1, box.y0 + 1, box.x1, box.y1)):
            ElementTree.SubElement(bndbox, tag).text = str(value)
    return root


def xml_bytes(root, encoding="utf-8", declare=False):
    text = ElementTree.tostring(root, encoding="unicode")
    if declare:
        text = f'<?xml version="1.0" encoding="{encoding}"?>\n' + text
    return text.encode(encoding)


def coco_doc(data):
    category = {name: cid for cid, name in data.categories}
    doc = {"images": [], "annotations": [],
           "categories": [{"id": cid, "name": name} for cid, name in data.categories]}
    for i, pic in enumerate(data.pics):
        doc["images"].append({"id": i + 1, "file_name": reference("coco", pic.file),
                              "width": pic.width, "height": pic.height})
        for b in pic.boxes:
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": i + 1,
                "category_id": category[b.name], "bbox": [b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0],
                "iscrowd": int(b.flag)})
    return doc


def json_bytes(doc, encoding="utf-8"):
    return json.dumps(doc, indent=1, ensure_ascii=False).encode(encoding)


def csv_rows(data):
    rows = [list(CSV_HEADER)]
    for pic in data.pics:
        name = reference("csv", pic.file)
        rows += [[name, b.name, str(b.x0), str(b.y0), str(b.x1), str(b.y1)] for b in pic.boxes]
        rows += [] if pic.boxes else [[name, "", "", "", "", ""]]
    return rows


def csv_bytes(rows, encoding="utf-8", quoting=csv.QUOTE_MINIMAL):
    text = io.StringIO()
    csv.writer(text, lineterminator="\n", quoting=quoting).writerows(rows)
    return text.getvalue().encode(encoding)


def write_files(fmt, data, encoding="utf-8", declare=False):
    """The dataset as {path relative to the dataset folder: bytes}."""
    files = {image_key(fmt, pic.file): png(pic.width, pic.height) for pic in data.pics}
    if fmt == "voc":
        for pic in data.pics:
            files[f"Annotations/{pic.stem}.xml"] = xml_bytes(voc_tree(pic), encoding, declare)
        files[VOC_LIST] = "".join(f"{pic.stem}\n" for pic in data.pics).encode()
    elif fmt == "coco":
        files[ANNOTATION[fmt]] = json_bytes(coco_doc(data), encoding)
    else:
        files[ANNOTATION[fmt]] = csv_bytes(csv_rows(data), encoding)
    return files


def put(root, files):
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    for folder in ("Annotations", "JPEGImages", "images"):  # folders stay when their files go
        (root / folder).mkdir(exist_ok=True)


def dataset_path(fmt, root):
    return root if fmt == "voc" else root / ANNOTATION[fmt]


# ------------------------------------------------------------------ 3. what a reader must return

def letterbox_scale(width, height):
    """(sx, sy): pixel x, y -> 0..1 of the padded square, as the image is scaled to fit.

    The picture is resized to round(side * SIZE / longest side) pixels, so a box keeps to its
    pixels when it is scaled by that rounded size over the original one.
    """
    scale = SIZE / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return new_w / width / SIZE, new_h / height / SIZE


def expected_names(data, fmt):
    if fmt == "coco":
        return tuple(name for _, name in sorted(data.categories, key=lambda c: c[0]))
    return tuple(sorted({b.name for pic in data.pics for b in pic.boxes}))


def expected_labels(data, fmt):
    names = expected_names(data, fmt)
    width = max(1, *(len(pic.boxes) for pic in data.pics))
    labels = torch.full((len(data.pics), width, 5), -1.0, dtype=torch.float64)
    for i, pic in enumerate(data.pics):
        sx, sy = letterbox_scale(pic.width, pic.height)
        for j, b in enumerate(pic.boxes):
            labels[i, j] = torch.tensor([names.index(b.name), b.x0 * sx, b.y0 * sy,
                                         b.x1 * sx, b.y1 * sy], dtype=torch.float64)
    return labels.float()


def check_well_formed(data):
    count = len(data.files)
    assert data.images.dtype == torch.uint8 and data.images.shape == (count, 3, SIZE, SIZE)
    assert data.labels.dtype == torch.float32 and data.labels.shape[::2] == (count, 5)
    names = data.class_names
    assert all(isinstance(n, str) and n.strip() for n in names), f"class names {names}"
    assert len(set(names)) == len(names), f"class names {names}"
    real = data.labels[..., 0] != -1
    assert (data.labels[~real] == -1).all(), "a padding row that is not all -1"
    rows = data.labels[real]
    assert torch.isfinite(rows).all(), f"labels not finite: {rows}"
    classes, boxes = rows[:, 0], rows[:, 1:]
    assert ((classes >= 0) & (classes < len(names)) & (classes == classes.round())).all(), rows
    assert ((boxes >= 0) & (boxes <= 1)).all(), f"labels outside 0..1: {rows}"
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all(), f"empty: {rows}"


def check_exact(data, expected, fmt):
    """data (read) holds exactly the dataset ``expected`` describes."""
    assert data.class_names == expected_names(expected, fmt)
    labels = expected_labels(expected, fmt)
    assert data.labels.shape == labels.shape, (data.labels, labels)
    assert torch.allclose(data.labels, labels, atol=1e-6), (data.labels, labels)
    files = [pathlib.Path(f).name.casefold() for f in data.files]
    assert files == [pic.file.casefold() for pic in expected.pics]
    for i, pic in enumerate(expected.pics):
        for j, b in enumerate(pic.boxes):
            flag = False if fmt == "csv" else b.flag
            assert flag is None or bool(data.difficult[i, j]) == flag, (i, j, data.difficult)


def names_a_file(message, files, extra=()):
    """True if the message names one of the dataset's files (its name, not just its folder)."""
    names = {pathlib.PurePosixPath(key).name for key in files} | set(extra)
    return any(name in message for name in names)


def read_or_error(call, path):
    """(result, None) or (None, the DatasetError); any other exception propagates."""
    try:
        return call(path, size=SIZE), None
    except H.DatasetError as error:
        if type(error) is not H.DatasetError:
            raise
        return None, error


def check_reading(fmt, files, expect, expected=None, extra_names=()):
    """Write ``files``, read them, and check the outcome against ``expect``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "dataset"
        put(root, files)
        path = dataset_path(fmt, root)
        data, error = read_or_error(H.read_dataset, path)
        report, refused = read_or_error(H.validate_dataset, path)
    if error is not None:
        assert expect != EXACT, f"read_dataset refused a valid dataset: {error}"
        assert names_a_file(str(error), files, extra_names), f"names no file: {error}"
    else:
        assert expect != REFUSE, "read_dataset accepted data that it must refuse"
        check_well_formed(data)
        if expect in (EXACT, EITHER):
            check_exact(data, expected, fmt)
    if refused is not None:
        assert error is not None, f"validate_dataset raised, read_dataset did not: {refused}"
        assert names_a_file(str(refused), files, extra_names), f"names no file: {refused}"
    else:
        assert report.ok == (error is None), f"report.ok is {report.ok}; read_dataset: {error}"


# ------------------------------------------------------------------ 4. mutations

@dataclasses.dataclass
class Mutation:
    what: str
    expect: str
    data: Data | None = None  # what the mutated files describe (EXACT, EITHER)
    write: Data | None = None  # the dataset to write before ``edit`` (default: the one drawn)
    encoding: str = "utf-8"
    declare: bool = False  # VOC: an XML declaration that names the encoding
    edit: object = None  # edits the {path: bytes} dict in place
    names: tuple = ()  # file names the mutated annotations refer to

    def __repr__(self):
        return f"Mutation({self.what!r}, expect: {self.expect})"

    def _repr_pretty_(self, printer, cycle):  # how hypothesis shows it in a failing example
        printer.text(repr(self))


def judged(what, data, fmt, **fields):
    """EXACT with ``data`` if it is a valid dataset, else REFUSE."""
    if is_valid(data, fmt):
        return Mutation(what, EXACT, data, **fields)
    return Mutation(what, REFUSE, **fields)


TEXT_NUMBERS = ("0", "-3", "nan", "NaN", "inf", "-inf", "1e300", "1" + "0" * 30)
JSON_NUMBERS = (0, -3, math.nan, math.inf, -math.inf, 1e300, 10**30)
TEXT_RETYPES = ("abc", "", "[1, 2]", "true", "null", "{}")
NUMBER_FORMATS = ("{}.0", " {} ", "+{}", "{}e0")  # the same number, written another way


def annotation_keys(fmt, files):
    if fmt == "voc":
        return sorted(k for k in files if k.startswith("Annotations/") or k == VOC_LIST)
    return [ANNOTATION[fmt]]


def edit_bytes(keys, change):
    def edit(files):
        for key in keys:
            files[key] = change(files[key])
    return edit


def coordinate_box(box, k, value):
    """The box after coordinate k (xmin, ymin, xmax, ymax) is set to ``value`` (pixels)."""
    return dataclasses.replace(box, **{("x0", "y0", "x1", "y1")[k]: value})


def coordinate_mutation(what, data, fmt, i, j, k, number, **fields):
    """Writing ``number`` as coordinate k: 0 for xmin or ymin is a box touching the edge."""
    if float(number) == 0 and k < 2:
        box = coordinate_box(data.pics[i].boxes[j], k, 0)
        return judged(what, replace_box(data, i, j, x0=box.x0, y0=box.y0), fmt, **fields)
    return Mutation(what, REFUSE, **fields)


# ---- mutations of any format

@st.composite
def text_encodings(draw, fmt, data):
    keys = annotation_keys(fmt, write_files(fmt, data))  # each file of text
    kind = draw(st.sampled_from(["bom", "crlf", "utf-16"]))
    if kind == "bom":
        return Mutation("a UTF-8 BOM", EXACT, data, edit=edit_bytes(keys, b"\xef\xbb\xbf".__add__))
    if kind == "crlf":
        return Mutation("CRLF line ends", EXACT, data,
                        edit=edit_bytes(keys, lambda b: b.replace(b"\n", b"\r\n")))
    if fmt == "voc":  # XML in UTF-16 with its BOM is valid XML, declared or not
        declare = draw(st.booleans())
        return Mutation(f"XML in UTF-16, declared={declare}", EXACT, data, encoding="utf-16",
                        declare=declare)
    return Mutation("UTF-16 text", EITHER, data, encoding="utf-16")


@st.composite
def non_ascii_names(draw, fmt, data):
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    declare = fmt == "voc" and draw(st.booleans())
    used = sorted({b.name for pic in data.pics for b in pic.boxes})
    if fmt == "coco":
        used = [name for _, name in data.categories]
    if used and draw(st.booleans()):
        old = draw(st.sampled_from(used))
        new, what = "chät", f"class {old!r} renamed 'chät' in {encoding}"
        changed = rename_class(data, old, new)
    else:
        i = draw(st.integers(0, len(data.pics) - 1))
        new, what = f"pé{i}.png", f"image {data.pics[i].file} renamed pé{i}.png in {encoding}"
        changed = replace_pic(data, i, file=new)
    expect = EXACT if encoding == "utf-8" or declare else EITHER
    return Mutation(what + (", declared" if declare else ""), expect, changed, changed,
                    encoding, declare, names=(new,))


@st.composite
def truncated_annotations(draw, fmt, data):
    files = write_files(fmt, data)
    key = draw(st.sampled_from([k for k in annotation_keys(fmt, files) if k != VOC_LIST]))
    size = len(files[key])
    cut = draw(st.integers(0, size - 1))
    expect = SANE if fmt == "csv" else REFUSE
    return Mutation(f"{key} cut to {cut} of {size} bytes", expect,
                    edit=edit_bytes([key], lambda b: b[:cut]))


IMAGE_VARIANTS = (("PNG", "L"), ("PNG", "LA"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "1"),
                  ("PNG", "I;16"), ("JPEG", "RGB"), ("JPEG", "L"), ("BMP", "RGB"), ("GIF", "P"),
                  ("TIFF", "RGB"), ("TIFF", "CMYK"))


def re_encoded(width, height, fmt, mode):
    if mode == "I;16":
        return encoded(Image.fromarray(pixels(width, height)[..., 0].astype(np.uint16) * 257))
    return encoded(Image.fromarray(pixels(width, height)).convert(mode), fmt)


def exif_jpeg(width, height, orientation):
    photo = Image.fromarray(pixels(width, height))
    exif = photo.getexif()
    exif[ExifTags.Base.Orientation] = orientation
    return encoded(photo, "JPEG", exif=exif)


@st.composite
def image_file_mutations(draw, fmt, data):
    i = draw(st.integers(0, len(data.pics) - 1))
    pic = data.pics[i]
    key = image_key(fmt, pic.file)
    kind = draw(st.sampled_from(["delete", "move", "garbage", "truncate", "re-encode", "exif",
                                 "resize"]))

    def setting(content):
        return lambda files: files.__setitem__(key, content)
    if kind in ("delete", "move"):
        moved = f"{pic.stem}.moved.png"

        def edit(files):
            content = files.pop(key)
            if kind == "move":
                files[image_key(fmt, moved)] = content
        return Mutation(f"{key}: {kind}", REFUSE, edit=edit)
    if kind == "garbage":
        content = draw(st.binary(max_size=64))
        return Mutation(f"{key} holds {content!r}", REFUSE, edit=setting(content))
    if kind == "truncate":
        whole = png(pic.width, pic.height)
        cut = draw(st.integers(0, len(whole) - 1))  # an image whole but for its end may be read
        return Mutation(f"{key} cut to {cut} bytes", EITHER, data, edit=setting(whole[:cut]))
    if kind == "re-encode":
        fmt_mode = draw(st.sampled_from(IMAGE_VARIANTS))
        content = re_encoded(pic.width, pic.height, *fmt_mode)
        return Mutation(f"{key} saved as {fmt_mode}", EXACT, data, edit=setting(content))
    if kind == "exif":  # boxes may have been drawn on the stored or the turned pixels
        orientation = draw(st.integers(1, 8))
        expect = (EXACT, data) if orientation == 1 else (REFUSE, None)
        return Mutation(f"{key}: a JPEG with EXIF orientation {orientation}", *expect,
                        edit=setting(exif_jpeg(pic.width, pic.height, orientation)))
    width, height = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    what = f"{key} replaced by a {width}x{height} image"
    edit = setting(png(width, height))
    if (width, height) == (pic.width, pic.height):
        return Mutation(what, EXACT, data, edit=edit)
    if fmt == "csv":  # no size in the file: the boxes are read on the new image
        return judged(what, replace_pic(data, i, width=width, height=height), fmt, edit=edit)
    return Mutation(what, REFUSE, edit=edit)


def set_reference(fmt, data, i, new, only_first=False):
    """An edit that makes the annotations name image i as ``new``."""
    def edit(files):
        if fmt == "voc":
            key = f"Annotations/{data.pics[i].stem}.xml"
            root = ElementTree.fromstring(files[key])
            root.find("filename").text = new
            files[key] = xml_bytes(root)
        elif fmt == "coco":
            doc = json.loads(files[ANNOTATION[fmt]])
            doc["images"][i]["file_name"] = new
            files[ANNOTATION[fmt]] = json_bytes(doc)
        else:
            rows = csv_rows(data)
            hits = [r for r, row in enumerate(rows) if row[0] == reference(fmt, data.pics[i].file)]
            for r in hits[:1] if only_first else hits:
                rows[r][0] = new
            files[ANNOTATION[fmt]] = csv_bytes(rows)
    return edit


@st.composite
def image_references(draw, fmt, data):
    i = draw(st.integers(0, len(data.pics) - 1))
    old = reference(fmt, data.pics[i].file)
    parent, _, name = old.rpartition("/")
    kind = draw(st.sampled_from(["dot", "inner dot", "case"]))
    new = {"dot": f"./{old}", "inner dot": f"{parent}/./{name}".lstrip("/"),
           "case": old.replace(name, name.upper())}[kind]
    only_first = fmt == "csv" and draw(st.booleans())  # one of the image's rows, or all
    what = f"image {old} named {new}" + (" in its first row" if only_first else "")
    expect = EITHER if kind == "case" else EXACT  # case: found on some file systems only
    return Mutation(what, expect, data, edit=set_reference(fmt, data, i, new, only_first),
                    names=(pathlib.PurePosixPath(new).name,))


# ---- Pascal VOC

def edit_xml(stem, change):
    """An edit that parses Annotations/<stem>.xml, calls change(root), and writes it back."""
    key = f"Annotations/{stem}.xml"

    def edit(files):
        root = ElementTree.fromstring(files[key])
        change(root)
        files[key] = xml_bytes(root)
    return edit


def xml_target(root, path, j):
    """(parent, element) at ``path``; "object" is the j-th object."""
    parent, node = None, root
    for tag in path.split("/"):
        parent, node = node, node.findall("object")[j] if tag == "object" else node.find(tag)
    return parent, node


VOC_FIELDS = ("filename", "size", "size/width", "size/height")
VOC_OBJECT_FIELDS = ("object", "object/name", "object/difficult", "object/bndbox",
                     "object/bndbox/xmin", "object/bndbox/ymin", "object/bndbox/xmax",
                     "object/bndbox/ymax")


@st.composite
def voc_targets(draw, data):
    """(picture, box or 0, element path)."""
    refs = box_refs(data)
    if refs and draw(st.booleans()):
        i, j = draw(st.sampled_from(refs))
        return i, j, draw(st.sampled_from(VOC_OBJECT_FIELDS))
    return draw(st.integers(0, len(data.pics) - 1)), 0, draw(st.sampled_from(VOC_FIELDS))


def voc_place(data, i, j, path):
    """Where an element is, for a failing example: "p0.xml object 2 bndbox/xmin"."""
    if path.startswith("object"):
        return f"{data.pics[i].stem}.xml object {j + 1} {path[7:] or ''}".rstrip()
    return f"{data.pics[i].stem}.xml {path}"


@st.composite
def voc_drops(draw, data):
    i, j, path = draw(voc_targets(data))
    what = f"{voc_place(data, i, j, path)} removed"

    def change(root):
        parent, element = xml_target(root, path, j)
        parent.remove(element)
    edit = edit_xml(data.pics[i].stem, change)
    if path == "object":
        return judged(what, drop_box(data, i, j), "voc", edit=edit)
    if path == "object/difficult":
        return Mutation(what, EXACT, replace_box(data, i, j, flag=False), edit=edit)
    if path in ("filename", "size/width", "size/height"):  # <id>.jpg is missing; half a size
        return Mutation(what, EITHER, data, edit=edit)
    if path == "size":  # the image's own size is known
        return Mutation(what, EXACT, data, edit=edit)
    return Mutation(what, REFUSE, edit=edit)


@st.composite
def voc_retypes(draw, data):
    i, j, path = draw(voc_targets(data))
    path = "object/name" if path in ("object", "object/bndbox") else path
    path = "size/width" if path == "size" else path
    value = draw(st.sampled_from(TEXT_RETYPES + ("<nested>",)))
    what = f"{voc_place(data, i, j, path)} written {value!r}"

    def change(root):
        _, element = xml_target(root, path, j)
        if value == "<nested>":
            element.text = None
            ElementTree.SubElement(element, "value").text = "3"
        else:
            element.text = value
    edit = edit_xml(data.pics[i].stem, change)
    if path == "object/name":
        if value in ("", "<nested>"):
            return Mutation(what, REFUSE, edit=edit)
        return judged(what, replace_box(data, i, j, name=value), "voc", edit=edit)
    if path == "object/difficult":
        return Mutation(what, EITHER, replace_box(data, i, j, flag=None), edit=edit)
    if path in ("filename", "size/width", "size/height"):
        return Mutation(what, EITHER, data, edit=edit)
    return Mutation(what, REFUSE, edit=edit)


@st.composite
def voc_numbers(draw, data):
    refs = box_refs(data)
    coordinate = refs and draw(st.booleans())
    number = draw(st.sampled_from(TEXT_NUMBERS))
    if coordinate:
        i, j = draw(st.sampled_from(refs))
        k = draw(st.integers(0, 3))
        path = "object/bndbox/" + ("xmin", "ymin", "xmax", "ymax")[k]
    else:
        i, j, k = draw(st.integers(0, len(data.pics) - 1)), 0, None
        path = draw(st.sampled_from(["size/width", "size/height"]))
    what = f"{voc_place(data, i, j, path)} written {number}"

    def change(root):
        xml_target(root, path, j)[1].text = number
    edit = edit_xml(data.pics[i].stem, change)
    if coordinate:
        return coordinate_mutation(what, data, "voc", i, j, k, number, edit=edit)
    expect = EITHER if float(number) == 0 else REFUSE  # 0: a size the tool did not know
    return Mutation(what, expect, data if expect == EITHER else None, edit=edit)


@st.composite
def voc_number_formats(draw, data):
    i, j = draw(st.sampled_from(box_refs(data)))
    tag = draw(st.sampled_from(("xmin", "ymin", "xmax", "ymax")))
    template = draw(st.sampled_from(NUMBER_FORMATS))

    def change(root):
        element = xml_target(root, f"object/bndbox/{tag}", j)[1]
        element.text = template.format(element.text)
    return Mutation(f"{data.pics[i].stem}.xml object {j + 1} {tag} written {template!r}", EXACT,
                    data, edit=edit_xml(data.pics[i].stem, change))


@st.composite
def voc_duplicate_objects(draw, data):
    i, j = draw(st.sampled_from(box_refs(data)))

    def change(root):
        root.append(root.findall("object")[j])
    return Mutation(f"{data.pics[i].stem}.xml object {j + 1} twice", REFUSE,
                    edit=edit_xml(data.pics[i].stem, change))


@st.composite
def voc_broken_xml(draw, data):
    pic = draw(st.sampled_from(data.pics))
    key = f"Annotations/{pic.stem}.xml"
    text = write_files("voc", data)[key]
    kind = draw(st.sampled_from(["<", "&", "no end tag", "two roots"]))
    if kind in ("<", "&"):
        at = draw(st.integers(0, len(text)))
        change, what = (lambda b: b[:at] + kind.encode() + b[at:]), f"{kind!r} at byte {at}"
    elif kind == "no end tag":
        change, what = (lambda b: b.replace(b"</annotation>", b"")), kind
    else:
        change, what = (lambda b: b + b"<annotation/>"), kind
    return Mutation(f"{key}: {what}", REFUSE, edit=edit_bytes([key], change))


@st.composite
def voc_lists(draw, data):
    i = draw(st.integers(0, len(data.pics) - 1))
    stem = data.pics[i].stem
    kind = draw(st.sampled_from(["empty", "delete list", "delete xml", "unknown id", "drop id",
                                 "duplicate id", "blank lines", "extra column"]))
    lines = [f"{pic.stem}\n" for pic in data.pics]

    def listing(new_lines):
        return lambda files: files.__setitem__(VOC_LIST, "".join(new_lines).encode())
    if kind == "empty":
        return Mutation("an empty list", REFUSE, edit=listing(["\n"]))
    if kind == "delete list":
        return Mutation("no list", REFUSE, edit=lambda files: files.pop(VOC_LIST))
    if kind == "delete xml":
        return Mutation(f"no {stem}.xml", REFUSE,
                        edit=lambda files: files.pop(f"Annotations/{stem}.xml"))
    if kind == "unknown id":
        return Mutation("the list names p9", REFUSE, edit=listing([*lines, "p9\n"]))
    if kind == "drop id":
        return judged(f"the list leaves out {stem}", drop_pic(data, i), "voc",
                      edit=listing(lines[:i] + lines[i + 1:]))
    if kind == "duplicate id":
        return Mutation(f"the list names {stem} twice", SANE, edit=listing([*lines, lines[i]]))
    if kind == "blank lines":
        return Mutation("blank lines and spaces in the list", EXACT, data,
                        edit=listing(["\n", *(f"  {line.strip()} \t\n\n" for line in lines)]))
    return Mutation("the list has a second column", EITHER, data,
                    edit=listing([f"{line.strip()}  1\n" for line in lines]))


# ---- COCO

def edit_json(change):
    def edit(files):
        doc = json.loads(files[ANNOTATION["coco"]])
        change(doc)
        files[ANNOTATION["coco"]] = json_bytes(doc)
    return edit


def annotation_index(data, i, j):
    return sum(len(pic.boxes) for pic in data.pics[:i]) + j


def json_retypes(value):
    """Values of other types than ``value`` (and a string that only looks like it)."""
    found = [str(value), None, [value], True, {"value": value}, "abc"]
    return [v for v in found if repr(v) != repr(value)]


@st.composite
def coco_targets(draw, data):
    """(section, index in it, key, (picture, box) or None)."""
    refs = box_refs(data)
    sections = ["images", "categories"] + (["annotations"] * bool(refs))
    section = draw(st.sampled_from(sections))
    if section == "images":
        i = draw(st.integers(0, len(data.pics) - 1))
        return section, i, draw(st.sampled_from(["id", "file_name", "width", "height"])), (i, None)
    if section == "categories":
        c = draw(st.integers(0, len(data.categories) - 1))
        return section, c, draw(st.sampled_from(["id", "name"])), None
    i, j = draw(st.sampled_from(refs))
    key = draw(st.sampled_from(["id", "image_id", "category_id", "bbox", "iscrowd"]))
    return section, annotation_index(data, i, j), key, (i, j)


@st.composite
def coco_drops(draw, data):
    if draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        return Mutation(f"no {key!r}", REFUSE, edit=edit_json(lambda doc: doc.pop(key)))
    section, index, key, where = draw(coco_targets(data))
    edit = edit_json(lambda doc: doc[section][index].pop(key))
    what = f"{section}[{index}] without {key!r}"
    if key == "iscrowd":
        return Mutation(what, EITHER, replace_box(data, *where, flag=False), edit=edit)
    optional = {("images", "id"), ("images", "width"), ("images", "height"), ("annotations", "id")}
    if (section, key) in optional:
        return Mutation(what, EITHER, data, edit=edit)
    return Mutation(what, REFUSE, edit=edit)


@st.composite
def coco_retypes(draw, data):
    section, index, key, where = draw(coco_targets(data))
    doc = coco_doc(data)
    element = None
    if key == "bbox" and draw(st.booleans()):
        element = draw(st.integers(0, 3))
        value = draw(st.sampled_from(json_retypes(doc[section][index][key][element])))
    else:
        value = draw(st.sampled_from(json_retypes(doc[section][index][key])))

    def change(doc):
        if element is None:
            doc[section][index][key] = value
        else:
            doc[section][index][key][element] = value
    what = f"{section}[{index}][{key!r}]{'' if element is None else [element]} = {value!r}"
    edit = edit_json(change)
    if key == "iscrowd":
        return Mutation(what, EITHER, replace_box(data, *where, flag=None), edit=edit)
    if (section, key) == ("categories", "name") and isinstance(value, str):
        return judged(what, rename_class(data, data.categories[index][1], value), "coco",
                      edit=edit)
    coercible = isinstance(value, str) and value != "abc"  # "3" where 3 belongs
    if (section, key) in (("images", "file_name"), ("categories", "name")) or (
            key == "bbox" and not (element is not None and coercible)):
        return Mutation(what, REFUSE, edit=edit)
    return Mutation(what, EITHER, data, edit=edit)


@st.composite
def coco_numbers(draw, data):
    refs = box_refs(data)
    number = draw(st.sampled_from(JSON_NUMBERS))
    if refs and draw(st.booleans()):
        i, j = draw(st.sampled_from(refs))
        m = draw(st.integers(0, 3))
        index = annotation_index(data, i, j)
        what = f"annotations[{index}]['bbox'][{m}] = {number!r}"
        edit = edit_json(lambda doc: doc["annotations"][index]["bbox"].__setitem__(m, number))
        if number == 0 and m < 2:  # the box moves to the edge and keeps its size
            box = data.pics[i].boxes[j]
            moved = {"x0": 0, "x1": box.x1 - box.x0} if m == 0 else {"y0": 0, "y1": box.y1 - box.y0}
            return judged(what, replace_box(data, i, j, **moved), "coco", edit=edit)
        return Mutation(what, REFUSE, edit=edit)
    i = draw(st.integers(0, len(data.pics) - 1))
    key = draw(st.sampled_from(["width", "height"]))
    edit = edit_json(lambda doc: doc["images"][i].__setitem__(key, number))
    expect = EITHER if number == 0 else REFUSE  # 0: a size the tool did not know
    return Mutation(f"images[{i}][{key!r}] = {number!r}", expect,
                    data if expect == EITHER else None, edit=edit)


@st.composite
def coco_new_ids(draw, data):
    """An image's or a category's id changed everywhere it appears."""
    new = draw(st.sampled_from([0, -1, 10**30, 1.5, math.nan]))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(data.pics) - 1))

        def change(doc):
            for entry in doc["images"][i:i + 1] + doc["annotations"]:
                key = "id" if "file_name" in entry else "image_id"
                entry[key] = new if entry[key] == i + 1 else entry[key]
        expect = EXACT if isinstance(new, int) else EITHER
        return Mutation(f"image id {i + 1} is {new!r} everywhere", expect, data,
                        edit=edit_json(change))
    c = draw(st.integers(0, len(data.categories) - 1))
    old = data.categories[c][0]

    def change(doc):
        doc["categories"][c]["id"] = new
        for ann in doc["annotations"]:
            ann["category_id"] = new if ann["category_id"] == old else ann["category_id"]
    categories = list(data.categories)
    categories[c] = (new, categories[c][1])
    what = f"category id {old} is {new!r} everywhere"
    if isinstance(new, int):
        return judged(what, dataclasses.replace(data, categories=tuple(categories)), "coco",
                      edit=edit_json(change))
    if math.isnan(new):  # NaN has no place in the id order
        return Mutation(what, SANE, edit=edit_json(change))
    return Mutation(what, EITHER, dataclasses.replace(data, categories=tuple(categories)),
                    edit=edit_json(change))


@st.composite
def coco_duplicates(draw, data):
    refs = box_refs(data)
    kinds = ["category id", "category entry", "image entry"]
    kinds += ["image id"] * (len(data.pics) > 1) + ["annotation id"] * (len(refs) > 1)
    kinds += ["annotation entry"] * bool(refs)
    kind = draw(st.sampled_from(kinds))
    if kind in ("image id", "category id", "annotation id"):
        section = {"image id": "images", "category id": "categories"}.get(kind, "annotations")
        size = {"images": len(data.pics), "categories": 3}.get(section, len(refs))
        a, b = draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))

        def change(doc):
            doc[section][b]["id"] = doc[section][a]["id"]
        expect = EITHER if kind == "annotation id" else REFUSE  # annotation ids are unused
        return Mutation(f"{section}[{b}] has the id of {section}[{a}]", expect,
                        data if expect == EITHER else None, edit=edit_json(change))
    section = {"category entry": "categories", "image entry": "images"}.get(kind, "annotations")
    size = {"images": len(data.pics), "categories": 3}.get(section, len(refs))
    a = draw(st.integers(0, size - 1))

    def change(doc):
        doc[section].append(dict(doc[section][a], id=len(doc[section]) + 100)
                            if section == "annotations" else doc[section][a])
    expect = REFUSE if section == "annotations" else EITHER  # a second, identical box: refused
    return Mutation(f"{section}[{a}] twice", expect, data if expect == EITHER else None,
                    edit=edit_json(change))


@st.composite
def coco_structure(draw, data):
    kind = draw(st.sampled_from(["extra keys", "no annotations", "drop image", "top level",
                                 "entry"]))
    if kind == "extra keys":
        def change(doc):
            doc.update(info={"year": 2024}, licenses=[])
            for entry in doc["annotations"]:
                entry.update(area=1.0, segmentation=[[0, 0, 1, 0, 1, 1]])
            for entry in doc["images"]:
                entry.update(license=1, coco_url="")
        return Mutation("extra keys", EXACT, data, edit=edit_json(change))
    if kind == "no annotations":
        cleared = Data(tuple(dataclasses.replace(p, boxes=()) for p in data.pics), data.categories)
        return Mutation("'annotations' empty", EXACT, cleared,
                        edit=edit_json(lambda doc: doc.__setitem__("annotations", [])))
    if kind == "drop image":
        i = draw(st.integers(0, len(data.pics) - 1))

        def change(doc):
            doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != i + 1]
            del doc["images"][i]
        return judged(f"no image {i + 1}", drop_pic(data, i), "coco", edit=edit_json(change))
    value = draw(st.sampled_from([{}, "abc", None, 3, []]))
    if kind == "top level":
        key = draw(st.sampled_from(["images", "annotations", "categories", "whole file"]))
        if key == "whole file":
            return Mutation(f"the file is {value!r}", REFUSE,
                            edit=lambda files: files.__setitem__("labels.json", json_bytes(value)))
        if value == [] and key != "images":
            value = "abc"  # an empty list of annotations or categories can be valid
        return Mutation(f"{key!r} = {value!r}", REFUSE,
                        edit=edit_json(lambda doc: doc.__setitem__(key, value)))
    key = draw(st.sampled_from(["images", "categories"] + ["annotations"] * bool(box_refs(data))))
    return Mutation(f"{key}[0] = {value!r}", REFUSE,
                    edit=edit_json(lambda doc: doc[key].__setitem__(0, value)))


# ---- CSV

def csv_refs(data):
    """(picture, box or None) of each data row, in the order csv_rows writes them."""
    return [(i, j) for i, pic in enumerate(data.pics)
            for j in (range(len(pic.boxes)) if pic.boxes else [None])]


def csv_described(data, refs):
    """The dataset that rows ``refs`` describe: images in order of their first row."""
    order, boxes = [], {}
    for i, j in refs:
        if i not in boxes:
            order.append(i)
            boxes[i] = []
        if j is not None:
            boxes[i].append(data.pics[i].boxes[j])
    return dataclasses.replace(data, pics=tuple(
        dataclasses.replace(data.pics[i], boxes=tuple(boxes[i])) for i in order))


def edit_rows(change, quoting=csv.QUOTE_MINIMAL):
    """An edit that calls change(rows) on the CSV's rows (lists of fields) and writes them back."""
    def edit(files):
        text = files[ANNOTATION["csv"]].decode()
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
        files[ANNOTATION["csv"]] = csv_bytes(change(rows) or rows, quoting=quoting)
    return edit


@st.composite
def csv_headers(draw, data):
    kind = draw(st.sampled_from(["no header", "upper case", "spaces", "extra column"]))
    change = {"no header": lambda rows: rows[1:],
              "upper case": lambda rows: [[h.upper() for h in rows[0]], *rows[1:]],
              "spaces": lambda rows: [[f" {h} " for h in rows[0]], *rows[1:]],
              "extra column": lambda rows: [[*row, "score" if r == 0 else "0.5"]
                                            for r, row in enumerate(rows)]}[kind]
    return Mutation(f"header: {kind}", EITHER, data, edit=edit_rows(change))


@st.composite
def csv_columns(draw, data):
    if draw(st.booleans()):
        c = draw(st.integers(0, 5))
        return Mutation(f"column {CSV_HEADER[c]} removed", REFUSE,
                        edit=edit_rows(lambda rows: [row[:c] + row[c + 1:] for row in rows]))
    order = draw(st.permutations(range(6)))
    scope = draw(st.sampled_from(["all rows", "data rows", "header"]))
    first, last = {"all rows": (0, None), "data rows": (1, None), "header": (0, 1)}[scope]

    def change(rows):
        return [[row[c] for c in order] if first <= r < (last or len(rows)) else row
                for r, row in enumerate(rows)]
    what = f"columns of the {scope} in the order {order}"
    if list(order) == list(range(6)):
        return Mutation(what, EXACT, data, edit=edit_rows(change))
    return Mutation(what, EITHER if scope == "all rows" else SANE,
                    data if scope == "all rows" else None, edit=edit_rows(change))


@st.composite
def csv_row_edits(draw, data):
    refs = csv_refs(data)
    kind = draw(st.sampled_from(["drop", "duplicate", "shuffle", "blank lines", "quoted",
                                 "short row", "long row"]))
    r = draw(st.integers(0, len(refs) - 1))
    what = f"row {r + 2}: {kind}"
    if kind == "drop":
        return judged(what, csv_described(data, refs[:r] + refs[r + 1:]), "csv",
                      edit=edit_rows(lambda rows: rows[:r + 1] + rows[r + 2:]))
    if kind == "duplicate":
        return judged(what, csv_described(data, refs[:r + 1] + refs[r:]), "csv",
                      edit=edit_rows(lambda rows: rows[:r + 2] + rows[r + 1:]))
    if kind == "shuffle":
        order = draw(st.permutations(range(len(refs))))
        described = csv_described(data, [refs[k] for k in order])
        return judged(f"data rows in the order {order}", described, "csv",
                      edit=edit_rows(lambda rows: [rows[0], *(rows[k + 1] for k in order)]))
    if kind == "blank lines":
        return Mutation("blank lines", EXACT, data, edit=edit_bytes(
            ["labels.csv"], lambda b: b.replace(b"\n", b"\n\n")))
    if kind == "quoted":
        return Mutation("every field quoted", EXACT, data,
                        edit=edit_rows(lambda rows: None, quoting=csv.QUOTE_ALL))
    if kind == "short row":
        return Mutation(what, REFUSE, edit=edit_rows(lambda rows: rows.__setitem__(
            r + 1, rows[r + 1][:-1])))
    return Mutation(what, REFUSE, edit=edit_rows(lambda rows: rows.__setitem__(
        r + 1, [*rows[r + 1], "1"])))


@st.composite
def csv_fields(draw, data):
    """One field of a data row rewritten: retyped, a special number, or a number in another form."""
    refs = csv_refs(data)
    r = draw(st.integers(0, len(refs) - 1))
    i, j = refs[r]
    c = draw(st.integers(0, 5))
    old = csv_rows(data)[r + 1][c]
    value = draw(st.sampled_from(TEXT_RETYPES + TEXT_NUMBERS + NUMBER_FORMATS))
    value = value.format(old) if value in NUMBER_FORMATS else value
    what = f"row {r + 2} {CSV_HEADER[c]} {old!r} written {value!r}"
    edit = edit_rows(lambda rows: rows[r + 1].__setitem__(c, value))
    if value == old:
        return Mutation(what, EXACT, data, edit=edit)
    if value.strip() == old:  # spaces around a field: stripped, or refused
        return Mutation(what, EITHER, data, edit=edit)
    if c == 0 and j is None and not value.strip():  # the row is blank now: skipped, or refused
        blank = judged(what, csv_described(data, refs[:r] + refs[r + 1:]), "csv", edit=edit)
        return dataclasses.replace(blank, expect=EITHER) if blank.expect == EXACT else blank
    if c == 0 or j is None:  # another image's name; a box half written in an empty row
        return Mutation(what, REFUSE, edit=edit)
    if c == 1:
        if not value.strip():
            return Mutation(what, REFUSE, edit=edit)
        return judged(what, replace_box(data, i, j, name=value), "csv", edit=edit)
    try:
        same = float(value) == float(old)
    except ValueError:
        return Mutation(what, REFUSE, edit=edit)
    if same:
        return Mutation(what, EXACT, data, edit=edit)
    return coordinate_mutation(what, data, "csv", i, j, c - 2, value, edit=edit)


@st.composite
def csv_stray_quotes(draw, data):
    lines = csv_bytes(csv_rows(data)).decode().split("\n")[:-1]
    n = draw(st.integers(0, len(lines) - 1))
    at = draw(st.integers(0, len(lines[n])))

    def change(content):
        found = content.decode().split("\n")
        found[n] = found[n][:at] + '"' + found[n][at:]
        return "\n".join(found).encode()
    return Mutation(f"a '\"' in line {n + 1} at {at}", SANE,
                    edit=edit_bytes(["labels.csv"], change))


# Each family of mutations is a test of its own, so that each is tried in every run.
COMMON = {"encodings": text_encodings, "non_ascii": non_ascii_names,
          "truncated": truncated_annotations, "image_files": image_file_mutations,
          "image_names": image_references}
SPECIFIC = {
    "voc": {"drops": voc_drops, "retypes": voc_retypes, "numbers": voc_numbers,
            "number_formats": voc_number_formats, "duplicate_objects": voc_duplicate_objects,
            "broken_xml": voc_broken_xml, "lists": voc_lists},
    "coco": {"drops": coco_drops, "retypes": coco_retypes, "numbers": coco_numbers,
             "new_ids": coco_new_ids, "duplicates": coco_duplicates, "structure": coco_structure},
    "csv": {"headers": csv_headers, "columns": csv_columns, "rows": csv_row_edits,
            "fields": csv_fields, "stray_quotes": csv_stray_quotes},
}
NEED_BOXES = {("voc", "number_formats"), ("voc", "duplicate_objects")}
FAMILIES = [(fmt, name) for fmt in FORMATS for name in [*COMMON, *SPECIFIC[fmt]]]


def mutations(fmt, name, data):
    if name in COMMON:
        return COMMON[name](fmt, data)
    return SPECIFIC[fmt][name](data)


# ------------------------------------------------------------------ 5. dataset tests

@pytest.mark.parametrize("fmt", FORMATS)
@given(data=datasets())
def test_a_valid_dataset_reads_back_to_its_labels(fmt, data):
    check_reading(fmt, write_files(fmt, data), EXACT, data)


@pytest.mark.parametrize("fmt, family", FAMILIES, ids=[f"{f}-{n}" for f, n in FAMILIES])
@given(draw=st.data())
def test_a_mutated_dataset_reads_right_or_names_the_file(fmt, family, draw):
    data = draw.draw(datasets(boxed=(fmt, family) in NEED_BOXES), label="dataset")
    mutation = draw.draw(mutations(fmt, family, data), label="mutation")
    files = write_files(fmt, mutation.write or data, mutation.encoding, mutation.declare)
    before = set(files)
    if mutation.edit is not None:
        mutation.edit(files)
    names = tuple(pathlib.PurePosixPath(key).name for key in before) + mutation.names
    check_reading(fmt, files, mutation.expect, mutation.data, names)


# ------------------------------------------------------------------ 6. to_image_tensor on bytes

IMAGE_MODES = {  # what PIL writes in each format
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
    "BMP": ("1", "L", "P", "RGB"),
    "GIF": ("L", "P"),
}
LOSSLESS_RGB = {("PNG", "RGB"), ("TIFF", "RGB"), ("BMP", "RGB")}


def sample_image(mode, width, height, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    if mode == "F":  # 0..255 as the series reads floats; above 1, so not refused as 0..1
        return Image.fromarray(rng.uniform(2, 255, (height, width)).astype(np.float32))
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


@st.composite
def damages(draw, size):
    kind = draw(st.sampled_from(["none", "truncate", "flip"]))
    if kind == "truncate":
        return "truncate", draw(st.integers(0, size - 1))
    if kind == "flip":
        flips = st.tuples(st.integers(0, size - 1), st.integers(1, 255))
        return "flip", tuple(draw(st.lists(flips, min_size=1, max_size=4)))
    return ("none",)


def damaged(content, damage):
    if damage[0] == "truncate":
        return content[:damage[1]]
    data = bytearray(content)
    for position, xor in damage[1] if damage[0] == "flip" else ():
        data[position] ^= xor
    return bytes(data)


@st.composite
def image_files(draw):
    """(what, bytes, expected (H, W) or None, expected pixels or None)."""
    if draw(st.integers(0, 4)) == 0:
        content = draw(st.binary(max_size=300))
        return f"random bytes {content!r}", content, None, None
    fmt = draw(st.sampled_from(sorted(IMAGE_MODES)))
    mode = draw(st.sampled_from(IMAGE_MODES[fmt]))
    width, height, seed = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers())
    image = sample_image(mode, width, height, seed % 2**32)
    options, shape = {}, (height, width)
    if fmt == "JPEG" and draw(st.booleans()):
        exif = image.getexif()
        exif[ExifTags.Base.Orientation] = orientation = draw(st.integers(1, 8))
        options["exif"] = exif
        shape = (width, height) if orientation >= 5 else shape  # 5..8 turn it a quarter
    content = encoded(image, fmt, **options)
    damage = draw(damages(len(content)))
    whole = damage == ("none",)
    rgb = np.asarray(image.convert("RGB")) if whole and (fmt, mode) in LOSSLESS_RGB else None
    exif = f" EXIF orientation {orientation}" if options else ""
    what = f"{fmt} {mode} {width}x{height} seed {seed}{exif}, damage {damage}"
    return what, damaged(content, damage), shape if whole else None, rgb


@given(sample=image_files())
def test_to_image_tensor_reads_an_image_or_names_the_path(sample):
    what, content, shape, rgb = sample
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "photo.img"
        path.write_bytes(content)
        try:
            image = H.to_image_tensor(str(path))
        except H.DatasetError as error:
            if type(error) is not H.DatasetError:
                raise
            assert shape is None, f"{what}: refused a valid image: {error}"
            assert str(path) in str(error), f"{what}: names no path: {error}"
            return
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, what
    assert image.shape[1] > 0 and image.shape[2] > 0, what
    if shape is not None:
        assert tuple(image.shape[1:]) == shape, what
    if rgb is not None:
        assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1)), what


# ------------------------------------------------------------------ 7. load_model on bytes

class Reference:
    """A real checkpoint: its path and its contents (read with weights_only=True)."""

    def __init__(self, path):
        self.path = path
        self.contents = torch.load(path, map_location="cpu", weights_only=True)

    def __repr__(self):  # failing examples print it: not its weights
        return f"Reference({self.path.name})"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    H.set_seed(0)
    H.save_checkpoint(path, H.TinySSD(H.default_config()))
    return Reference(path)


def load_or_error(path):
    try:
        return H.load_model(path), None
    except H.CheckpointError as error:
        if type(error) is not H.CheckpointError:
            raise
        return None, error


def positive(value):
    """A finite number above 0 (bools are not numbers)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value < math.inf)


def check_loaded(loaded, finite=True):
    """A model load_model returned is usable: a sound config, and it runs."""
    net, config = loaded
    assert isinstance(net, H.TinySSD) and isinstance(config, H.SSDConfig)
    n = config.num_classes
    assert isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"num_classes {n!r}"
    names = config.class_names
    assert names is None or (isinstance(names, tuple) and len(names) == n and len(set(names)) == n
                             and all(isinstance(x, str) and x for x in names)), names
    assert type(config.first_stride) is int and config.first_stride in (1, 2), config
    for field in ("sizes", "ratios"):
        scales = getattr(config, field)
        assert isinstance(scales, tuple) and all(isinstance(s, tuple) and s for s in scales), config
        assert all(positive(v) for scale in scales for v in scale), config
    for stats in (config.pixel_mean, config.pixel_std):
        assert stats is None or (isinstance(stats, tuple) and len(stats) == 3), config
    assert config.pixel_mean is None or all(positive(v + 1e9) for v in config.pixel_mean), config
    assert config.pixel_std is None or all(positive(v) for v in config.pixel_std), config
    with torch.no_grad():
        anchors, cls_preds, bbox_preds = net(torch.zeros(1, 3, SIZE, SIZE))
    assert cls_preds.shape[-1] == n + 1
    if finite:
        assert torch.isfinite(cls_preds).all() and torch.isfinite(bbox_preds).all(), config


def check_checkpoint_file(content, finite):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.pt"
        path.write_bytes(content)
        loaded, error = load_or_error(path)
        if error is not None:
            assert str(path) in str(error), f"names no path: {error}"
            return
        check_loaded(loaded, finite)


@st.composite
def checkpoint_damages(draw):
    kind = draw(st.sampled_from(["random", "truncate", "flip", "prefix"]))
    if kind == "random":
        return "random", draw(st.binary(max_size=300))
    if kind == "prefix":
        return "prefix", draw(st.binary(min_size=1, max_size=16))
    if kind == "truncate":  # cut at a fraction of the file, so it shrinks to its start
        return "truncate", draw(st.floats(0, 1, exclude_max=True))
    flips = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255))
    return "flip", tuple(draw(st.lists(flips, min_size=1, max_size=8)))


@given(damage=checkpoint_damages())
def test_load_model_on_damaged_bytes_loads_or_names_the_file(checkpoint, damage):
    real = checkpoint.path.read_bytes()
    kind, value = damage
    if kind == "random":
        content = value
    elif kind == "prefix":
        content = value + real
    elif kind == "truncate":
        content = real[:int(value * len(real))]
    else:
        content = bytearray(real)
        for where, xor in value:
            content[int(where * len(real))] ^= xor
        content = bytes(content)
    check_checkpoint_file(content, finite=False)  # flipped weights may be finite yet huge


CONFIG_VALUES = {
    "num_classes": ["2", 2.5, 0, -1, None, [1], True, math.nan, 2**40],
    "sizes": [[0.2] * 5, [[[0.2, 0.27]]] * 5, [[0.2, 0.27]] * 4, [["0.2", "0.27"]] * 5,
              [[-0.2, 0.27]] * 5, [[math.nan, 0.27]] * 5, [[math.inf, 0.27]] * 5, [[]] * 5,
              "abc", None],
    "ratios": [[[1, 2, 0.5]] * 4, [[0, 2, 0.5]] * 5, [["1", "2", "0.5"]] * 5, [[1]] * 5,
               [[-1, 2, 0.5]] * 5, [[1, 2, math.nan]] * 5, [1, 2, 0.5], None],
    "pixel_mean": [[1, 2], ["a", "b", "c"], [math.nan, 0, 0], 5, None, [1, 2, 3, 4]],
    "pixel_std": [[0, 0, 0], [1, 2], [-1, 1, 1], [math.inf, 1, 1], None, "abc"],
    "class_names": ["ab", "a", [1], [""], ["x", "y"], ["x"], {"a": 1}],
    "first_stride": [3, "2", True, 2.0, 0, None],
}
STATE_VALUES = ([0.5, 0.5], 3, "abc", None, {"a": 1})


@st.composite
def checkpoint_edits(draw):
    """An edit of the checkpoint dict: (part, key or key index, value)."""
    part = draw(st.sampled_from(["config", "drop config key", "unknown config key", "state",
                                 "drop weight", "extra weight", "top"]))
    if part == "config":
        key = draw(st.sampled_from(sorted(CONFIG_VALUES)))
        return part, key, draw(st.sampled_from(CONFIG_VALUES[key]))
    if part == "drop config key":
        return part, draw(st.sampled_from(sorted(CONFIG_VALUES))), None
    if part in ("unknown config key", "extra weight"):
        return part, "surprise", 1
    if part == "top":
        return part, None, draw(st.sampled_from(
            [[], 3, "abc", None, "tensor", "no state_dict", "no config", "state list",
             "config str"]))
    index = draw(st.integers(0, 10**6))  # taken modulo the number of weights
    if part == "drop weight":
        return part, index, None
    return part, index, draw(st.sampled_from(
        ["nan", "inf", "flat", "scalar", "float64", "float16", "int64", "bool", *STATE_VALUES]))


def changed_tensor(tensor, how):
    if how in ("nan", "inf"):
        tensor = tensor.clone().float()
        tensor.view(-1)[0] = float(how)
        return tensor
    if how == "flat":
        return tensor.reshape(-1)
    if how == "scalar":
        return torch.tensor(1.0)
    if how in ("float64", "float16", "int64", "bool"):
        return tensor.to(getattr(torch, how))
    return how


def edited_checkpoint(base, edit):
    part, key, value = edit
    state, config = dict(base["state_dict"]), dict(base["config"])
    names = sorted(state)
    if part == "top":
        top = {"tensor": torch.zeros(3), "no state_dict": {"config": config},
               "no config": {"state_dict": state},
               "state list": {"state_dict": [1], "config": config},
               "config str": {"state_dict": state, "config": "abc"}}
        return top.get(value, value) if isinstance(value, str) else value
    if part == "config":
        config[key] = value
    elif part == "drop config key":
        del config[key]
    elif part == "unknown config key":
        config[key] = value
    elif part == "extra weight":
        state[key] = torch.zeros(1)
    elif part == "drop weight":
        del state[names[key % len(names)]]
    else:
        name = names[key % len(names)]
        state[name] = changed_tensor(state[name], value) if isinstance(value, str) and \
            value not in STATE_VALUES else value
    return {**base, "state_dict": state, "config": config}


@given(edit=checkpoint_edits())
def test_load_model_on_edited_checkpoints_loads_or_names_the_file(checkpoint, edit):
    buffer = io.BytesIO()
    torch.save(edited_checkpoint(checkpoint.contents, edit), buffer)
    check_checkpoint_file(buffer.getvalue(), finite=True)
