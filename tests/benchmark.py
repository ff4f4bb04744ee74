"""Speed of our helpers and training step against d2l's, measured in one run: `make bench`.

Prints, for each task, the best time of several repeats for d2l and for us, and
the ratio; then the examples/s of the book's training step and ours on the
same batches, first with glibc's default allocator, then with it keeping freed
memory (H.keep_freed_memory, which train_ssd applies). Inputs are seeded, so a
re-run measures the same work.
"""
import argparse
import time
import timeit
import warnings

import torch
from d2l import torch as d2l
from torch import nn

import ssd_helpers as H


def best_time(fn, repeat, number):
    """Best mean time of one call, in seconds, over ``repeat`` rounds of ``number`` calls."""
    fn()  # warm up
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def report(name, ours, reference):
    print(f"{name:<42} d2l {reference * 1e3:9.1f} ms   ours {ours * 1e3:8.2f} ms"
          f"   {reference / ours:6.1f}x faster")


def bench_multibox_target(anchors, repeat):
    g = torch.Generator().manual_seed(0)
    batch, num_gt = 32, 10
    centers = torch.rand(batch, num_gt, 2, generator=g) * 0.8 + 0.1
    sizes = torch.rand(batch, num_gt, 2, generator=g) * 0.3 + 0.05
    classes = torch.randint(0, 3, (batch, num_gt, 1), generator=g).float()
    labels = torch.cat([classes, centers - sizes / 2, centers + sizes / 2], dim=-1)
    for a, b in zip(H.multibox_target(anchors, labels), d2l.multibox_target(anchors, labels)):
        assert torch.equal(a, b), "results differ from d2l"
    reference = best_time(lambda: d2l.multibox_target(anchors, labels), repeat, 3)
    ours = best_time(lambda: H.multibox_target(anchors, labels), repeat, 10)
    report("multibox_target, 32 images x 10 boxes", ours, reference)


def bench_multibox_detection(anchors, repeat):
    g = torch.Generator().manual_seed(0)
    batch, num_anchors = 32, anchors.shape[1]
    cls_probs = torch.softmax(torch.randn(batch, 2, num_anchors, generator=g) * 2, dim=1)
    offset_preds = torch.randn(batch, num_anchors * 4, generator=g) * 0.5
    reference = best_time(lambda: d2l.multibox_detection(cls_probs, offset_preds, anchors), 1, 1)
    ours = best_time(lambda: H.multibox_detection(cls_probs, offset_preds, anchors), repeat, 5)
    report("multibox_detection, 32 images", ours, reference)


# The book's training step, written out as in its notebook (d2l's package has no
# TinySSD that runs without the notebook's globals).

def seed_cls_predictor(num_inputs, num_anchors, num_classes):
    return nn.Conv2d(num_inputs, num_anchors * (num_classes + 1), kernel_size=3, padding=1)


def seed_bbox_predictor(num_inputs, num_anchors):
    return nn.Conv2d(num_inputs, num_anchors * 4, kernel_size=3, padding=1)


def seed_flatten_pred(pred):
    return torch.flatten(pred.permute(0, 2, 3, 1), start_dim=1)


def seed_concat_preds(preds):
    return torch.cat([seed_flatten_pred(p) for p in preds], dim=1)


def seed_down_sample_blk(in_channels, out_channels):
    blk = []
    for _ in range(2):
        blk.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        blk.append(nn.BatchNorm2d(out_channels))
        blk.append(nn.ReLU())
        in_channels = out_channels
    blk.append(nn.MaxPool2d(2))
    return nn.Sequential(*blk)


def seed_base_net():
    blk = []
    num_filters = [3, 16, 32, 64]
    for i in range(len(num_filters) - 1):
        blk.append(seed_down_sample_blk(num_filters[i], num_filters[i + 1]))
    return nn.Sequential(*blk)


def seed_get_blk(i):
    if i == 0:
        return seed_base_net()
    if i == 1:
        return seed_down_sample_blk(64, 128)
    if i == 4:
        return nn.AdaptiveMaxPool2d((1, 1))
    return seed_down_sample_blk(128, 128)


SEED_SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
SEED_RATIOS = [[1, 2, 0.5]] * 5


class SeedTinySSD(nn.Module):
    """The book's TinySSD: blocks and heads stored as attributes blk_i, cls_i, bbox_i."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        idx_to_in_channels = [64, 128, 128, 128, 128]
        num_anchors = len(SEED_SIZES[0]) + len(SEED_RATIOS[0]) - 1
        for i in range(5):
            setattr(self, f"blk_{i}", seed_get_blk(i))
            setattr(self, f"cls_{i}",
                    seed_cls_predictor(idx_to_in_channels[i], num_anchors, num_classes))
            setattr(self, f"bbox_{i}", seed_bbox_predictor(idx_to_in_channels[i], num_anchors))

    def forward(self, X):
        anchors, cls_preds, bbox_preds = [None] * 5, [None] * 5, [None] * 5
        for i in range(5):
            X = getattr(self, f"blk_{i}")(X)
            anchors[i] = d2l.multibox_prior(X, sizes=SEED_SIZES[i], ratios=SEED_RATIOS[i])
            cls_preds[i] = getattr(self, f"cls_{i}")(X)
            bbox_preds[i] = getattr(self, f"bbox_{i}")(X)
        anchors = torch.cat(anchors, dim=1)
        cls_preds = seed_concat_preds(cls_preds)
        cls_preds = cls_preds.reshape(cls_preds.shape[0], -1, self.num_classes + 1)
        bbox_preds = seed_concat_preds(bbox_preds)
        return anchors, cls_preds, bbox_preds


class SeedBananasDataset(torch.utils.data.Dataset):
    """d2l's BananasDataset: a list of uint8 images, made float per item."""

    def __init__(self, images, labels):
        self.features, self.labels = list(images), labels

    def __getitem__(self, idx):
        return self.features[idx].float(), self.labels[idx]

    def __len__(self):
        return len(self.features)


seed_cls_loss = nn.CrossEntropyLoss(reduction="none")
seed_bbox_loss = nn.L1Loss(reduction="none")


def seed_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks):
    batch_size, num_classes = cls_preds.shape[0], cls_preds.shape[2]
    cls = seed_cls_loss(cls_preds.reshape(-1, num_classes),
                        cls_labels.reshape(-1)).reshape(batch_size, -1).mean(dim=1)
    bbox = seed_bbox_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks).mean(dim=1)
    return cls + bbox


def seed_cls_eval(cls_preds, cls_labels):
    return float((cls_preds.argmax(dim=-1).type(cls_labels.dtype) == cls_labels).sum())


def seed_bbox_eval(bbox_preds, bbox_labels, bbox_masks):
    return float((torch.abs((bbox_labels - bbox_preds) * bbox_masks)).sum())


def seed_step(net, trainer, features, target, device):
    """The body of d2l's training loop for one batch."""
    trainer.zero_grad()
    X, Y = features.to(device), target.to(device)
    anchors, cls_preds, bbox_preds = net(X)
    bbox_labels, bbox_masks, cls_labels = d2l.multibox_target(anchors, Y)
    loss = seed_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    loss.mean().backward()
    trainer.step()
    return (seed_cls_eval(cls_preds, cls_labels), cls_labels.numel(),
            seed_bbox_eval(bbox_preds, bbox_labels, bbox_masks), bbox_labels.numel())


def book_step(images, labels, batch_ids, device):
    """The book's training step as a function of a batch of ids, for interleaved_seconds.

    Its DataLoader (d2l's BananasDataset) yields batch_ids in order, so call it once per row of
    batch_ids, in turn.
    """
    seed_iter = iter(torch.utils.data.DataLoader(SeedBananasDataset(images, labels),
                                                 batch_sampler=batch_ids.tolist()))
    torch.manual_seed(0)
    seed_net = SeedTinySSD(num_classes=1)
    seed_opt = torch.optim.SGD(seed_net.parameters(), lr=0.2, weight_decay=5e-4)

    def run(ids):
        features, target = next(seed_iter)
        seed_step(seed_net, seed_opt, features, target, device)
    return run


def interleaved_seconds(variants, batch_ids, warmup):
    """Seconds each variant ({name: function of a batch of ids}) spent on the batches after the
    first ``warmup``.

    The variants run in turn on each batch, so a busy moment of the machine hits them alike.
    """
    spent = dict.fromkeys(variants, 0.0)
    for b, ids in enumerate(batch_ids):
        for name, run in variants.items():
            start = time.perf_counter()
            run(ids)
            if b >= warmup:
                spent[name] += time.perf_counter() - start
    return spent


def bench_training(batches, warmup, title, compile_step=False):
    """The book's training step against ours, on the same batches, interleaved batch by batch.

    The seed: the book's TinySSD, d2l's multibox_target, a DataLoader over a list
    of uint8 images made float per item (d2l's BananasDataset), fp32 NCHW.
    Ours: H.train_step (uint8 batches sliced from one tensor, vectorised targets,
    our default loss, our default model with its first_stride=2 block) in fp32 NCHW
    and in bf16 + channels_last when the CPU has it, and bf16 + channels_last with
    the book's first block (first_stride=1), to show what that block costs.
    Each timed step holds everything a loop does per batch: batch, targets,
    forward, loss, backward, update, metrics.
    """
    device = torch.device("cpu")
    images, labels = H.read_detection_folder(H.generate_banana_detection() / "bananas_train")
    n = (warmup + batches) * 32
    batch_ids = torch.randperm(len(images),
                               generator=torch.Generator().manual_seed(0))[:n].reshape(-1, 32)
    variants = {"book (d2l, fp32 NCHW)": book_step(images, labels, batch_ids, device)}
    native_bf16 = H.cpu_has_native_bf16()
    ours = [("ours fp32 NCHW", False, False, False, 2),
            ("ours fp32 channels_last", False, True, False, 2),
            ("ours bf16 channels_last", True, True, False, 2),
            # first_stride=1, not the default model
            ("ours bf16 cl, book's block", True, True, False, 1)]
    # --compile: the model's forward compiled by torch.compile (inductor), compiled in warm-up
    if compile_step:
        ours.append(("ours bf16 cl, compiled", True, True, True, 2))
    for name, bf16, cl, compiled, first_stride in ours:
        if bf16 and not native_bf16:
            continue
        torch.manual_seed(0)
        net = H.TinySSD(H.default_config(), first_stride=first_stride)
        net = net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        if compiled:
            net.compile()
        opt = torch.optim.SGD(net.parameters(), lr=0.02, weight_decay=5e-4)
        config = H.TrainConfig(hflip=False)

        def run(ids, net=net, opt=opt, config=config, bf16=bf16, cl=cl):
            H.train_step(net, opt, images[ids], labels[ids], config, device, bf16, cl)
        variants[name] = run
    spent = interleaved_seconds(variants, batch_ids, warmup)
    print(f"training step, {title}: {batches} timed batches of 32 per variant (interleaved), "
          f"{warmup} warm-up")
    book = batches * 32 / spent["book (d2l, fp32 NCHW)"]
    rates = {}
    for name, seconds in spent.items():
        rates[name] = batches * 32 / seconds
        print(f"  {name:<30} {rates[name]:6.1f} examples/s   {rates[name] / book:5.2f}x the book")
    return rates


def main():
    # the book's metrics
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="rounds per timing (best is kept)")
    parser.add_argument("--batches", type=int, default=12,
                        help="timed training batches per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training batches first")
    parser.add_argument("--skip-training", action="store_true", help="only the helper benchmarks")
    parser.add_argument("--compile", action="store_true",
                        help="also time our bf16 step with the model compiled by torch.compile "
                             "(needs a C++ compiler)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        anchors = H.TinySSD()(torch.zeros(1, 3, 256, 256))[0]
        bench_multibox_target(anchors, args.repeat)
        bench_multibox_detection(anchors, args.repeat)
    if not args.skip_training:
        before = bench_training(args.batches, args.warmup,
                                "glibc's default allocator (the book's setting)", args.compile)
        if H.keep_freed_memory():  # what train_ssd does (TrainConfig.keep_freed_memory)
            after = bench_training(args.batches, args.warmup,
                                   "glibc keeping freed memory (train_ssd's setting)",
                                   args.compile)
            # what train_ssd runs on the default model
            defaults = {name: rate for name, rate in after.items()
                        if "compiled" not in name and "book's block" not in name}
            best = max(defaults, key=defaults.get)
            book, ours = before["book (d2l, fp32 NCHW)"], defaults[best]
            print(f"as each runs by default: {best} with kept memory {ours:.1f} examples/s "
                  f"against the book's {book:.1f} with the default allocator: {ours / book:.2f}x")


if __name__ == "__main__":
    main()
