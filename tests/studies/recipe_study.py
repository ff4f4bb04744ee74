"""Why the book's training recipe does poorly here, and what fixes it:
`python tests/studies/recipe_study.py`.

Trains TinySSD with one recipe per row, on the same data and seed, and writes
tests/studies/results/recipe_study.csv (notebook 07 loads it): validation AP@0.5 (VOC
all-point) and AP@[.5:.95] (COCO), the last epoch's training class error on
foreground anchors, and the training time. Each 5-epoch row takes about two
minutes on a 2-core CPU with bf16 (the schedule spans the run); the 20-epoch
row about eight. `--rows 0 5` runs only those rows and prints them without
writing the file.
"""
import argparse
import dataclasses
import pathlib
import time

import ssd_helpers as H
import study_csv

RESULTS = pathlib.Path(__file__).parent / "results" / "recipe_study.csv"

# The study was run with the book's first block (first_stride=1), before default_config switched
# to 2.
BOOKS_BLOCK = dataclasses.replace(H.default_config(), first_stride=1)
RAW, STANDARDISED = H.SSDConfig(), BOOKS_BLOCK  # model input: raw 0..255, or ImageNet mean/std
# (name, model config, TrainConfig overrides, start from the book's recipe?); "epochs" overrides
# the 5 epochs
ROWS = [
    ("book's recipe: raw pixels, lr 0.2 constant, loss averaged over all anchors", RAW, {}, True),
    ("book's recipe, the book's full 20 epochs", RAW, {"epochs": 20}, True),
    ("book's recipe + ImageNet standardisation", STANDARDISED, {}, True),
    ("book's loss and lr 0.2, with standardisation, warm-up + cosine, flips", STANDARDISED,
     {"neg_ratio": 0.0, "loss_norm": "anchors", "lr": 0.2}, False),
    ("book's loss at lr 0.02, with standardisation, warm-up + cosine, flips", STANDARDISED,
     {"neg_ratio": 0.0, "loss_norm": "anchors", "lr": 0.02}, False),
    ("new loss (3:1 hard negatives, sums / #positives) at lr 0.2", STANDARDISED,
     {"lr": 0.2}, False),
    ("new loss, lr 0.05", STANDARDISED, {"lr": 0.05}, False),
    ("new loss, lr 0.02: TrainConfig(), the default", STANDARDISED, {}, False),
    ("default without input standardisation", RAW, {}, False),
    ("default without warm-up + cosine (constant lr 0.02)", STANDARDISED,
     {"warmup_epochs": 0.0, "schedule": "constant"}, False),
    ("default without flips", STANDARDISED, {"hflip": False}, False),
]


def run(name, model_config, overrides, book_recipe, data, epochs, device):
    """Train one row from scratch; returns its results as a dict."""
    make = H.TrainConfig.book_recipe if book_recipe else H.TrainConfig
    config = make(**{"epochs": epochs, **overrides})
    H.set_seed(config.seed)
    net = H.TinySSD(model_config)
    start = time.perf_counter()
    row = {"recipe": name, "epochs": config.epochs}
    try:
        history = H.train_ssd(net, data["train"], config, device, progress=False)
    except FloatingPointError as error:
        return row | {"AP50": "", "AP": "", "fg_err": "", "minutes": "",
                      "note": f"diverged: {error}"}
    result = H.evaluate_map(H.detect_images(net, data["val"][0]), data["val"][1])
    return row | {"AP50": f"{result['AP50_voc']:.3f}", "AP": f"{result['AP']:.3f}",
                  "fg_err": f"{history['fg_err'][-1]:.3f}",
                  "minutes": f"{(time.perf_counter() - start) / 60:.1f}", "note": ""}


def compare_precision(data, device):
    """The default recipe, full length, in fp32 and in bf16: speed-ups must not cost accuracy."""
    print("| precision | AP@0.5 (VOC) | AP@[.5:.95] | training time | examples/s |\n"
          "|---|---|---|---|---|")
    for bf16 in ("off", "on"):
        config = H.TrainConfig(bf16=bf16)
        H.set_seed(config.seed)
        net = H.TinySSD(BOOKS_BLOCK)
        history = H.train_ssd(net, data["train"], config, device, progress=False)
        result = H.evaluate_map(H.detect_images(net, data["val"][0]), data["val"][1])
        seconds = sum(history["time"])
        print(f"| {'bf16' if history['bf16'] else 'fp32'} + channels_last | "
              f"{result['AP50_voc']:.3f} | {result['AP']:.3f} | {seconds / 60:.1f} min | "
              f"{len(data['train'][0]) * config.epochs / seconds:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="*", help="row numbers to run (default: all)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="instead: the full default recipe in fp32 and in bf16 "
                             "(about 25 minutes)")
    args = parser.parse_args()
    root = H.generate_banana_detection()
    data = {"train": H.read_detection_folder(root / "bananas_train"),
            "val": H.read_detection_folder(root / "bananas_val")}
    device = H.pick_device()
    if args.compare_precision:
        return compare_precision(data, device)
    print(f"{args.epochs} epochs per row unless it says otherwise, device {device.type}, "
          f"bf16 {H.pick_precision(device)[0]}\n")
    rows = []
    for i, row in enumerate(ROWS):
        if args.rows is None or i in args.rows:
            rows.append(run(*row, data, args.epochs, device))
            print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    if args.rows is None:
        study_csv.write_rows(RESULTS, list(rows[0]), rows)

if __name__ == "__main__":
    main()
