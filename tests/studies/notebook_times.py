"""How long each notebook takes to run top to bottom, in full mode or in fast mode
(TINYSSD_FAST=1), on this machine: the times that each notebook's first cell and the README's
teacher's guide quote.

    python tests/studies/notebook_times.py --mode fast          # about 3 minutes, all notebooks
    python tests/studies/notebook_times.py --mode full --inplace 07_training 08_prediction

Fast mode runs a copy and leaves the notebooks alone. ``--inplace`` (full mode only) stores the
run's outputs in the notebook: that is how the committed notebooks are made, one top-to-bottom
run each. Run it from the repository's root on an otherwise idle machine; datasets and notebook
07's model are made by the first notebook that needs them, so run 06 and 07 before timing the
later ones on a fresh clone. Rows of results/notebook_times.csv for other notebooks or the other
mode are kept.
"""
import argparse
import csv
import os
import pathlib
import platform
import time

import nbformat
from nbclient import NotebookClient

from study_csv import write_rows

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "notebook_times.csv"
COLUMNS = ("notebook", "mode", "seconds", "cpu")


def cpu_name():
    """The CPU's model name, as /proc/cpuinfo gives it (or what platform knows elsewhere)."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_notebook(path, fast, inplace):
    """Execute one notebook top to bottom in a fresh kernel; return its wall time in seconds."""
    notebook = nbformat.read(path, as_version=4)
    env = {key: value for key, value in os.environ.items() if key != "TINYSSD_FAST"}
    if fast:
        env["TINYSSD_FAST"] = "1"  # the kernel's environment only, not this process's
    client = NotebookClient(notebook, timeout=7200, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    if inplace:
        nbformat.write(notebook, path)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*",
                        help="names like 07_training (default: every notebook, in order)")
    parser.add_argument("--mode", choices=("full", "fast"), required=True)
    parser.add_argument("--inplace", action="store_true",
                        help="full mode: store the run's outputs in each notebook")
    args = parser.parse_args()
    if args.inplace and args.mode != "full":
        parser.error("--inplace stores full runs only; fast mode's outputs are not committed")
    names = args.notebooks or sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb"))
    rows = {}
    if RESULTS.exists():
        with open(RESULTS, newline="") as f:
            rows = {(row["notebook"], row["mode"]): row for row in csv.DictReader(f)}
    for name in names:
        seconds = run_notebook(NOTEBOOKS / f"{name}.ipynb", args.mode == "fast", args.inplace)
        print(f"{name}: {seconds:.0f} s ({args.mode} mode)", flush=True)
        rows[(name, args.mode)] = dict(notebook=name, mode=args.mode, seconds=f"{seconds:.0f}",
                                       cpu=cpu_name())
        write_rows(RESULTS, COLUMNS, sorted(rows.values(),
                                            key=lambda r: (r["notebook"], r["mode"])))


if __name__ == "__main__":
    main()
