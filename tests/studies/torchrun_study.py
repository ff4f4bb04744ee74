"""The tolerance of tests/test_distributed.py: `python tests/studies/torchrun_study.py`.

For each of three banana-and-orange datasets (128 training images, 16 validation images, drawn
with seeds 0, 1 and 2) and two learning rates (0.002, the test's, and 0.02, the default), it runs
`python -m ssd_helpers train` for 3 epochs with a global batch of 32 three times: in one process,
under `torchrun --standalone --nproc_per_node=2`, and in one process with --seed 1. It prints, and
writes to tests/studies/results/torchrun_study.csv, the largest relative gap between the per-epoch
training losses of two processes and one ("two_vs_one"), and of seed 1 and seed 0 ("seed_1_vs_0"),
and the training time of two processes over one's ("time_two_over_one": the epochs' seconds as
each run's history has them, without start-up and validation). About 3 minutes on a 2-core CPU.
Data and models go to a temporary folder.
"""
import os
import pathlib
import subprocess
import sys
import tempfile

import ssd_helpers as H
import study_csv

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = pathlib.Path(__file__).parent / "results" / "torchrun_study.csv"
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def history(work, lr, *launcher, seed=0):
    """The history of one train command in `work`."""
    out = work / f"model_{lr}_{seed}_{len(launcher)}.pt"
    command = [sys.executable, *launcher, "-m", "ssd_helpers", "train", str(work / "voc"),
               "--val", str(work / "voc"), "--epochs", "3", "--batch-size", "32",
               "--lr", str(lr), "--seed", str(seed), "--out", str(out)]
    subprocess.run(command, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   capture_output=True)
    return H.read_checkpoint(out)["history"]


def largest_gap(a, b):
    return max(abs(x - y) / x for x, y in zip(a, b))


def main():
    rows = []
    for data_seed in (0, 1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            work = pathlib.Path(tmp)
            root = H.generate_fruit_detection(work / "fruit", seed=data_seed, num_train=128,
                                              num_val=16)
            data = {split: H.read_detection_folder(root / f"fruit_{split}", num_classes=2)
                    for split in ("train", "val")}
            H.export_dataset(work / "voc", "voc", data, ("banana", "orange"))
            for lr in (0.002, 0.02):
                one, two = history(work, lr), history(work, lr, *TORCHRUN)
                other_seed = history(work, lr, seed=1)
                row = {"data_seed": data_seed, "lr": lr,
                       "two_vs_one": round(largest_gap(one["loss"], two["loss"]), 4),
                       "seed_1_vs_0": round(largest_gap(one["loss"], other_seed["loss"]), 4),
                       "time_two_over_one": round(sum(two["time"]) / sum(one["time"]), 2)}
                print(row, flush=True)
                rows.append(row)
    study_csv.write_rows(RESULTS, list(rows[0]), rows)


if __name__ == "__main__":
    main()
