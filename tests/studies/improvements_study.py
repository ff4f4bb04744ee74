"""Longer runs behind notebook 10's reading: `python tests/studies/improvements_study.py`.

Notebook 10 ranks its variants after 5 epochs. Some changes need longer to pay
off, so this script trains chosen variants for longer (default 20 epochs, as
notebook 07) on the same multi-object data and seed, saves each model to
data/improvements/<row>_<epochs>ep.pt, prints a Markdown table of VOC AP@0.5
and COCO AP@[.5:.95] on the notebook's three validation splits, and writes
tests/studies/results/improvements_study.csv (notebook 10 loads it): the row, its
changes, the epochs, the training time in minutes, and both APs per split.
By default it trains the best combination with and without SSD's augmentation
(rows best and augmented). About 9 minutes per row on a 2-core CPU with bf16,
17 with augmentation (the stored CSV's minutes column). `--rows best focal`,
`--epochs 5` or `--seed 1` runs only those rows, that length or that seed and
prints them without writing the file.
"""
import argparse
import dataclasses
import pathlib

import ssd_helpers as H
import study_csv

RESULTS = pathlib.Path(__file__).parent / "results" / "improvements_study.csv"

SMALL_ANCHORS = ((0.1, 0.141),) + H.SSDConfig().sizes[:4]  # notebook 10, section 6
# notebook 10's best combination, with SMALL_ANCHORS
BEST = {"box_loss": "smooth_l1", "bbox_weight": 2.0}
ROWS = {  # name: (TrainConfig changes, anchor sizes or None for the default)
    "baseline": ({}, None),
    "best": (BEST, SMALL_ANCHORS),
    "augmented": ({**BEST, "augment": True}, SMALL_ANCHORS),
    # RetinaNet's alpha 0.25, gamma 2 (TrainConfig)
    "focal": ({"cls_loss": "focal", "neg_ratio": 0.0}, None),
}
DEFAULT_ROWS, DEFAULT_EPOCHS = ["best", "augmented"], 20


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, help=f"epochs per row (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS),
                        help=f"rows to run (default: {' '.join(DEFAULT_ROWS)})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    names = DEFAULT_ROWS if args.rows is None else args.rows
    fruit = H.generate_fruit_detection()
    train = H.read_detection_folder(fruit / "fruit_train", num_classes=2)
    splits = {"banana": H.read_detection_folder(H.generate_banana_detection() / "bananas_val"),
              "fruit": H.read_detection_folder(fruit / "fruit_val", num_classes=2),
              "small": H.read_detection_folder(H.generate_small_bananas() / "bananas_val")}
    device = H.pick_device()
    print(f"{epochs} epochs, seed {args.seed}, device {device.type}, "
          f"bf16 {H.pick_precision(device)[0]}\n")
    columns = ["row", "changes", "epochs", "minutes"] + [f"{split} {metric}" for split in splits
                                                         for metric in ("AP50", "AP")]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = []
    for name in names:
        changes, sizes = ROWS[name]
        # The study was run with the book's first block (first_stride=1), before default_config
        # switched to 2.
        model = dataclasses.replace(H.default_config(num_classes=2), first_stride=1)
        if sizes is not None:
            model = dataclasses.replace(model, sizes=sizes)
        config = H.TrainConfig(epochs=epochs, seed=args.seed, **changes)
        path = H.DATA_DIR / "improvements" / f"{name}_{epochs}ep.pt"
        result = H.train_variant(config, train, splits, model, device, path)
        described = ", ".join([f"{k}={v!r}" for k, v in changes.items()]
                              + (["small anchors"] if sizes else []))
        rows.append({"row": name, "changes": described or "(notebook 07's recipe)",
                     "epochs": epochs, "minutes": f"{result['minutes']:.1f}",
                     **{column: f"{result[column]:.3f}" for column in columns[4:]}})
        print("| " + " | ".join(str(v) for v in rows[-1].values()) + " |", flush=True)
    if args.rows is None and args.epochs is None and args.seed == 0:
        study_csv.write_rows(RESULTS, columns, rows)


if __name__ == "__main__":
    main()
