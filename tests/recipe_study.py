"""Why the book's training recipe does poorly here, and what fixes it: `python tests/recipe_study.py`.

Trains TinySSD with one recipe per row, on the same data and seed, and prints a
Markdown table of validation AP@0.5 (VOC) and AP@[.5:.95] (COCO). Each row takes
about two minutes on a 2-core CPU with bf16; `--epochs` changes the length.
"""
import argparse
import dataclasses
import time

import torch

import ssd_helpers as H

# (name, model config, training config overrides, seed recipe?)
ROWS = [
    ("book's recipe (raw pixels, lr 0.2 constant, all anchors, mean loss)", H.SSDConfig(), {}, True),
    ("book's recipe + ImageNet standardisation", H.default_config(), {}, True),
    ("ours: all fixes (TrainConfig())", H.default_config(), {}, False),
    ("ours without input standardisation", H.SSDConfig(), {}, False),
    ("ours without hard negative mining", H.default_config(), {"neg_ratio": 0.0}, False),
    ("ours with the book's loss normalisation", H.default_config(), {"loss_norm": "anchors", "neg_ratio": 0.0}, False),
    ("ours with a constant learning rate", H.default_config(), {"warmup_epochs": 0.0, "schedule": "constant"}, False),
    ("ours without flips", H.default_config(), {"hflip": False}, False),
]


def run(name, model_config, overrides, seed_recipe, data, epochs, device):
    make = H.TrainConfig.seed_recipe if seed_recipe else H.TrainConfig
    config = make(epochs=epochs, **overrides)
    H.set_seed(config.seed)
    net = H.TinySSD(model_config)
    start = time.perf_counter()
    try:
        history = H.train_ssd(net, data["train"], config, device, progress=False)
    except FloatingPointError as error:
        return f"| {name} | diverged: {error} | | |"
    result = H.evaluate_map(H.detect_images(net, data["val"][0]), data["val"][1])
    return (f"| {name} | {result['AP50_voc']:.3f} | {result['AP']:.3f} | "
            f"{time.perf_counter() - start:.0f} s |")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="*", help="row numbers to run (default: all)")
    args = parser.parse_args()
    root = H.generate_banana_detection()
    data = {"train": H.read_detection_folder(root / "bananas_train"),
            "val": H.read_detection_folder(root / "bananas_val")}
    device = H.pick_device()
    print(f"{args.epochs} epochs each, device {device.type}, bf16 {H.pick_precision(device)[0]}\n")
    print("| recipe | AP@0.5 | AP@[.5:.95] | time |\n|---|---|---|---|")
    for i, row in enumerate(ROWS):
        if args.rows is None or i in args.rows:
            print(run(*row, data, args.epochs, device), flush=True)


if __name__ == "__main__":
    main()
