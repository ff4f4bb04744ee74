"""pycocotools reference for the tests only (not part of the teaching code).

Converts our tensor formats into a COCO ground-truth dataset and a COCO
result list, runs COCOeval (bbox) silently and returns (AP, AP50).
"""
import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def image_list(batch):
    """A batch as per-image 2-D tensors: a 3-D tensor (B, rows, cols), or a list of (rows, cols)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.unbind(0))
    return [torch.as_tensor(rows) for rows in batch]


def real_rows(rows):
    """The real rows of (n, cols): padding rows have class id -1."""
    return rows[rows[:, 0] >= 0]


def _xywh(xmin, ymin, xmax, ymax):
    """COCO boxes are [x, y, width, height]; subtract in float64 like COCO."""
    xmin, ymin, xmax, ymax = (float(v) for v in (xmin, ymin, xmax, ymax))
    return [xmin, ymin, xmax - xmin, ymax - ymin]


def to_coco(detections, ground_truths, num_classes):
    """Our batches -> (COCO gt dataset dict, COCO result list).

    Image ids are 1 + image index and category ids are 1 + class id.
    Annotation ids start at 1: COCOeval uses id 0 to mean "unmatched".
    """
    dets = [real_rows(d) for d in image_list(detections)]
    gts = [real_rows(g) for g in image_list(ground_truths)]
    annotations, results = [], []
    for image_index, rows in enumerate(gts):
        for row in rows.tolist():
            box = _xywh(*row[1:5])
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_index + 1,
                "category_id": int(row[0]) + 1, "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0})
    for image_index, rows in enumerate(dets):
        for row in rows.tolist():
            results.append({
                "image_id": image_index + 1, "category_id": int(row[0]) + 1,
                "bbox": _xywh(*row[2:6]), "score": float(row[1])})
    dataset = {
        "images": [{"id": i + 1} for i in range(len(gts))],
        "categories": [{"id": c + 1} for c in range(num_classes)],
        "annotations": annotations,
    }
    return dataset, results


def coco_ap(detections, ground_truths, num_classes):
    """Run pycocotools on our formats.  Returns (AP@[.5:.95], AP50).

    Only the 'all' area range and maxDets=100 are used (stats[0], stats[1]).
    Returns (-1, -1) like pycocotools when no class has ground truth.
    """
    dataset, results = to_coco(detections, ground_truths, num_classes)
    if not results:  # COCO.loadRes cannot load an empty list
        has_gt = bool(dataset["annotations"])
        return (0.0, 0.0) if has_gt else (-1.0, -1.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])
