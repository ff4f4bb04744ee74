"""torchvision's SSDlite from scratch with several seeds, behind notebook 12:
`python tests/studies/ssdlite_study.py`.

Notebook 12 trains SSDlite once, for the wall-clock time TinySSD's default run
took, and one run from scratch is one draw. This script trains it with seeds
0, 1 and 2 for the same budget (the seconds data/tinyssd_bananas.pt, notebook
07's run, trained for; `--seconds` overrides), and seed 0 once more for three
times that, with the notebook's recipe (H.train_for_seconds). It scores each
on the 100 validation images with H.evaluate_map, and writes
tests/studies/results/ssdlite_study.csv (per run: seed, budget, steps, minutes, the
mean loss of the last 20 steps, AP@0.5 and AP@[.5:.95]) and
tests/studies/results/ssdlite_loss.csv (the loss every 5 steps), which notebook 12
loads. With notebook 07's 7-minute budget that is 42 minutes. Run it alone:
the budget is wall-clock time, so a busy machine trains less. `--runs 0x1`
(seed 0, one budget) or `--seconds 60` prints without writing the files.

`--tinyssd` instead trains TinySSD with notebook 07's recipe for three times
its epochs (H.train_default_model(epochs=60), about as long as SSDlite's 0x3
run) and writes tests/studies/results/tinyssd_long.csv: SSDlite's 0x3 against TinySSD
given the same time, not TinySSD's one budget. Its "final loss" is TinySSD's
own loss (the last epoch's mean), which is not comparable with SSDlite's.
"""
import argparse
import math
import pathlib

import torch
import torchvision

import ssd_helpers as H
import study_csv

RESULTS = pathlib.Path(__file__).parent / "results"
RUNS = ("0x1", "1x1", "2x1", "0x3")  # seed x budgets
COLUMNS = ["run", "seed", "budget", "steps", "minutes", "final loss", "AP50", "AP"]
# a Markdown table's first two lines
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
LONG_EPOCHS = 3 * H.TrainConfig.epochs


def train_one(seed, seconds, train, val, device):
    """Train SSDlite from scratch with this seed for ``seconds``; (results without the run, loss
    per step)."""
    torch.manual_seed(seed)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=2)
    history = H.train_for_seconds(model, train, seconds, device, seed=seed, progress=False)
    scores = H.evaluate_map(H.detect_torchvision(model, val[0]), val[1])
    row = {"seed": seed, "steps": history["steps"], "minutes": f"{history['seconds'] / 60:.1f}",
           "final loss": f"{sum(history['loss'][-20:]) / len(history['loss'][-20:]):.2f}",
           "AP50": f"{scores['AP50']:.3f}", "AP": f"{scores['AP']:.3f}"}
    return row, history["loss"]


def train_tinyssd_long(num_train, val):
    """TinySSD with notebook 07's recipe (seed 0) for LONG_EPOCHS epochs; one row in COLUMNS."""
    # ours: save_checkpoint replaces only its own files
    path = H.DATA_DIR / "tinyssd_bananas_long.pt"
    history = H.train_default_model(path, torch.device("cpu"), epochs=LONG_EPOCHS, progress=False)
    net = H.load_model(path)[0]
    scores = H.evaluate_map(H.detect_images(net, val[0]), val[1])
    steps = LONG_EPOCHS * math.ceil(num_train / H.TrainConfig.batch_size)
    return {"run": "tinyssd", "seed": H.TrainConfig.seed,
            "budget": f"{LONG_EPOCHS // H.TrainConfig.epochs}x",
            "steps": steps, "minutes": f"{sum(history['time']) / 60:.1f}",
            "final loss": f"{history['loss'][-1]:.2f}",
            "AP50": f"{scores['AP50']:.3f}", "AP": f"{scores['AP']:.3f}"}


def table_line(row):
    """One row of COLUMNS as a Markdown table line."""
    return "| " + " | ".join(str(row[column]) for column in COLUMNS) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="seed x budgets, as in RUNS")
    parser.add_argument("--seconds", type=float,
                        help="budget per seed (default: notebook 07's training time)")
    parser.add_argument("--tinyssd", action="store_true",
                        help=f"train TinySSD for {LONG_EPOCHS} epochs instead")
    args = parser.parse_args()
    if args.tinyssd and (args.seconds is not None or args.runs != list(RUNS)):
        parser.error("--tinyssd trains for a number of epochs: it takes neither --runs nor "
                     "--seconds")
    device = torch.device("cpu")
    root = H.generate_banana_detection()
    train = H.read_detection_folder(root / "bananas_train")
    val = H.read_detection_folder(root / "bananas_val")
    if args.tinyssd:
        row = train_tinyssd_long(len(train[0]), val)
        print(HEADER + "\n" + table_line(row))
        study_csv.write_rows(RESULTS / "tinyssd_long.csv", COLUMNS, [row])
        return
    seconds = args.seconds
    if seconds is None:
        checkpoint = H.default_checkpoint()
        if not checkpoint.exists():
            raise SystemExit(f"{checkpoint} is missing: run notebook 07 first, or pass --seconds")
        seconds = sum(torch.load(checkpoint, weights_only=True)["history"]["time"])
    print(f"budget {seconds / 60:.1f} min, {torch.get_num_threads()} threads, "
          f"bf16 {H.pick_precision(device)[0]}")
    print(HEADER)
    rows, losses = [], []
    for run in args.runs:
        seed, budgets = (int(part) for part in run.split("x"))
        row, loss = train_one(seed, seconds * budgets, train, val, device)
        row = {"run": run, "budget": f"{budgets}x", **row}
        rows.append(row)
        losses += [{"run": run, "step": step, "loss": f"{value:.3f}"}
                   for step, value in enumerate(loss) if step % 5 == 0]
        print(table_line(row), flush=True)
    if args.runs == list(RUNS) and args.seconds is None:
        study_csv.write_rows(RESULTS / "ssdlite_study.csv", COLUMNS, rows)
        study_csv.write_rows(RESULTS / "ssdlite_loss.csv", ["run", "step", "loss"], losses)


if __name__ == "__main__":
    main()
