"""Longer runs behind notebook 10's reading: `python tests/improvements_study.py`.

Notebook 10 ranks its variants after 5 epochs. Some changes need longer to pay
off, so this script trains chosen variants for longer (default 20 epochs, as
notebook 07) on the same multi-object data and seed, saves each model to
data/improvements/<row>_<epochs>ep.pt, and prints a Markdown table of VOC
AP@0.5 and COCO AP@[.5:.95] on the notebook's three validation splits.
`--rows best augmented` picks rows by name; `--epochs` changes the length.
About 7 minutes per row on a 2-core CPU with bf16, 10 with augmentation.
"""
import argparse
import dataclasses

import ssd_helpers as H

SMALL_ANCHORS = ((0.1, 0.141),) + H.SSDConfig().sizes[:4]  # notebook 10, section 6
ROWS = {  # name: (TrainConfig changes, anchor sizes or None for the default)
    "baseline": ({}, None),
    "best": ({"bbox_weight": 2.0}, SMALL_ANCHORS),
    "augmented": ({"bbox_weight": 2.0, "augment": True}, SMALL_ANCHORS),
    "focal": ({"cls_loss": "focal", "neg_ratio": 0.0}, None),  # RetinaNet's alpha 0.25, gamma 2 (TrainConfig)
}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rows", nargs="*", default=["best", "augmented"], choices=list(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fruit = H.generate_fruit_detection()
    train = H.read_detection_folder(fruit / "fruit_train", num_classes=2)
    splits = {"banana": H.read_detection_folder(H.generate_banana_detection() / "bananas_val"),
              "fruit": H.read_detection_folder(fruit / "fruit_val", num_classes=2),
              "small": H.read_detection_folder(H.generate_small_bananas() / "bananas_val")}
    device = H.pick_device()
    print(f"{args.epochs} epochs, seed {args.seed}, device {device.type}, bf16 {H.pick_precision(device)[0]}\n")
    print("| row | changes | minutes | banana AP50 | banana AP | fruit AP50 | fruit AP | small AP50 | small AP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.rows:
        changes, sizes = ROWS[name]
        model = H.default_config(num_classes=2)
        if sizes is not None:
            model = dataclasses.replace(model, sizes=sizes)
        config = H.TrainConfig(epochs=args.epochs, seed=args.seed, **changes)
        path = H.DATA_DIR / "improvements" / f"{name}_{args.epochs}ep.pt"
        row = H.train_variant(config, train, splits, model, device, path)
        described = ", ".join(f"{k}={v!r}" for k, v in changes.items()) + (", small anchors" if sizes else "")
        print(f"| {name} | {described} | {row['minutes']:.1f} | "
              + " | ".join(f"{row[f'{split} {metric}']:.3f}" for split in splits for metric in ("AP50", "AP"))
              + " |", flush=True)


if __name__ == "__main__":
    main()
