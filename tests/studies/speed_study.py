"""What the profile of notebook 12 points to, tried and measured:
`python tests/studies/speed_study.py`.

Notebook 12's profile of a bf16 training step shows the convolutions taking
about half of the time, and batch norm, ReLU and max-pooling, which read and
write whole feature maps but do almost no arithmetic, most of the rest. This
script tries what that points to and writes tests/studies/results/speed_study.csv,
which notebook 12 loads:

- train: the default recipe (notebook 07: 20 epochs, seed 0) with the book's
  first block and with ``SSDConfig(first_stride=2)``, whose first convolution
  has stride 2 so that no 256 x 256 feature map is made; AP on the banana
  validation split and on the small-banana one. Models are saved to
  data/speed_study/ and reused by a later run with the same settings.
- speed: one training step on the same batches, interleaved batch by batch, all
  with glibc keeping freed memory (train_ssd's setting): the book's step, ours
  (with the book's first block, the default model when the study was run),
  ours on 1 thread instead of all, ours with in-place ReLU, ours with
  first_stride=2, and ours with the model compiled by torch.compile.
- latency: `detect` per 256 x 256 image, p50 and p90 over 100 runs timed in
  turns (H.latency_ms: 5 rounds of 2 warm-up and 20 timed calls each): eager,
  with batch norm folded into the convolutions (fold_batch_norm), ONNX Runtime,
  and the first_stride=2 model. The stored CSV's latency rows are from an
  earlier version that timed the variants one after another, so they do not
  compare with each other, and no notebook quotes them.

About 18 minutes on a 2-core CPU with bf16: 15 to train the two models, 3 for the rest.
`--parts speed latency` or `--no-compile` runs less and prints without writing the file.
"""
import argparse
import dataclasses
import pathlib
import sys
import warnings

import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # tests/: benchmark.py
import benchmark  # noqa: E402
import ssd_helpers as H  # noqa: E402
import study_csv  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results" / "speed_study.csv"
COLUMNS = ["part", "variant", "examples/s", "x book", "x ours", "p50 ms", "p90 ms",
           "AP50", "AP", "small AP50", "small AP", "minutes"]
PARTS = ("train", "speed", "latency")


def trained_model(first_stride, splits, device):
    """The default recipe with this first stride: (net in eval mode, results row); reused from
    data/speed_study/."""
    config = H.TrainConfig()
    model_config = dataclasses.replace(H.default_config(), first_stride=first_stride)
    path = H.DATA_DIR / "speed_study" / f"first_stride_{first_stride}.pt"
    saved = torch.load(path, weights_only=True) if path.exists() else {}
    if (saved.get("train_config") != dataclasses.asdict(config)
            or saved.get("config") != dataclasses.asdict(model_config)):
        train = H.read_detection_folder(H.generate_banana_detection() / "bananas_train")
        H.train_variant(config, train, splits, model_config, device, checkpoint=path)
        saved = torch.load(path, weights_only=True)
    else:
        print(f"reusing {path}")
    net = H.load_model(path, device)[0]
    results = H.evaluate_splits(net, splits)
    row = {"part": "train",
           "variant": f"first_stride={first_stride}"
                      + (" (the book's)" if first_stride == 1 else ""),
           "minutes": f"{sum(saved['history']['time']) / 60:.1f}"}
    for split, prefix in (("banana", ""), ("small", "small ")):
        row[prefix + "AP50"], row[prefix + "AP"] = (
            f"{results[split]['AP50_voc']:.3f}", f"{results[split]['AP']:.3f}")
    return net, row


def speed_rows(batches, warmup, compiled):
    """Examples/s of each training-step variant, interleaved batch by batch on the same batches."""
    H.keep_freed_memory()
    device = torch.device("cpu")
    images, labels = H.read_detection_folder(H.generate_banana_detection() / "bananas_train")
    ids = torch.randperm(len(images),
                         generator=torch.Generator().manual_seed(0))[:(warmup + batches) * 32]
    ids = ids.reshape(-1, 32)
    variants = {"book (d2l, fp32 NCHW)": benchmark.book_step(images, labels, ids, device)}
    threads = torch.get_num_threads()
    ours = {"ours (bf16, channels_last)": ({}, threads, False),
            "ours, 1 thread": ({}, 1, False),
            "ours, in-place ReLU": ({"inplace": True}, threads, False),
            "ours, first_stride=2": ({"first_stride": 2}, threads, False)}
    if compiled:
        ours["ours, torch.compile"] = ({}, threads, True)
    for name, (changes, num_threads, compile_it) in ours.items():
        variants[name] = _our_step(images, labels, changes, num_threads, compile_it, device)
    spent = benchmark.interleaved_seconds(variants, ids, warmup)
    torch.set_num_threads(threads)
    rates = {name: batches * 32 / seconds for name, seconds in spent.items()}
    book, default = rates["book (d2l, fp32 NCHW)"], rates["ours (bf16, channels_last)"]
    return [{"part": "speed", "variant": name, "examples/s": f"{rate:.1f}",
             "x book": f"{rate / book:.2f}", "x ours": f"{rate / default:.2f}"}
            for name, rate in rates.items()]


def _our_step(images, labels, changes, num_threads, compile_it, device):
    """A function of a batch of ids that runs one of our bf16 channels_last steps with these
    changes."""
    torch.manual_seed(0)
    net = H.TinySSD(dataclasses.replace(H.default_config(),
                                        first_stride=changes.get("first_stride", 1)))
    if changes.get("inplace"):
        for module in net.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = True
    net = net.to(memory_format=torch.channels_last)
    if compile_it:
        net.compile()  # compiled during the warm-up batches
    optimizer = torch.optim.SGD(net.parameters(), lr=0.02, weight_decay=5e-4)
    config = H.TrainConfig(hflip=False)

    def run(batch):
        torch.set_num_threads(num_threads)
        H.train_step(net, optimizer, images[batch], labels[batch], config, device, True, True)
    return run


def latency_rows(nets, runs=100, warmup=10):
    """p50 and p90 ms of detect on one 256 x 256 validation image: eager, folded, ONNX Runtime,
    first_stride=2."""
    image = H.read_detection_folder(H.generate_banana_detection() / "bananas_val")[0][0]
    net = nets[1]
    onnx_path = H.export_onnx(net, H.DATA_DIR / "speed_study" / "first_stride_1.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    folded, folded_two = H.fold_batch_norm(net), H.fold_batch_norm(nets[2])
    variants = {"detect, eager": lambda: H.detect(net, image),
                "detect, batch norm folded": lambda: H.detect(folded, image),
                "detect_onnx, ONNX Runtime": lambda: H.detect_onnx(session, image),
                "detect, first_stride=2": lambda: H.detect(nets[2], image),
                "detect, first_stride=2, folded": lambda: H.detect(folded_two, image)}
    latency = H.latency_ms(variants, rounds=5, runs=runs // 5, warmup=warmup // 5)
    return [{"part": "latency", "variant": name, "p50 ms": f"{times['p50']:.1f}",
             "p90 ms": f"{times['p90']:.1f}"} for name, times in latency.items()]


def main():
    # the book's metrics
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--batches", type=int, default=12,
                        help="timed training batches per variant")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed batches first (the compile happens here)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile variant")
    args = parser.parse_args()
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16 {H.cpu_has_native_bf16()}")
    rows, nets = [], {}
    if "train" in args.parts or "latency" in args.parts:
        splits = {"banana": H.read_detection_folder(H.generate_banana_detection() / "bananas_val"),
                  "small": H.read_detection_folder(H.generate_small_bananas() / "bananas_val")}
        for first_stride in (1, 2):
            nets[first_stride], row = trained_model(first_stride, splits, device)
            rows.append(row)
    if "speed" in args.parts:
        rows += speed_rows(args.batches, args.warmup, compiled=not args.no_compile)
    if "latency" in args.parts:
        rows += latency_rows(nets)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row.get(column, "") for column in COLUMNS) + " |")
    if args.parts == list(PARTS) and not args.no_compile and (args.batches, args.warmup) == (12, 3):
        study_csv.write_rows(RESULTS, COLUMNS, rows)


if __name__ == "__main__":
    main()
