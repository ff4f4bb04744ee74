"""Speed of our helpers against d2l's, measured in one run: `make bench`.

Prints, for each task, the best time of several repeats for d2l and for us, and
the ratio. Inputs are seeded, so a re-run measures the same work.
"""
import argparse
import timeit

import torch
from d2l import torch as d2l

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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="rounds per timing (best is kept)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        anchors = H.TinySSD()(torch.zeros(1, 3, 256, 256))[0]
        bench_multibox_target(anchors, args.repeat)
        bench_multibox_detection(anchors, args.repeat)


if __name__ == "__main__":
    main()
