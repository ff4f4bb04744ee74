"""The bridge to torchvision's detection models (notebook 12): targets, detections and the timed
training loop.

Small stand-in models keep these fast; the notebook trains the real SSDlite.
"""
import pytest
import torch
from torch import nn

import ssd_helpers as H


def test_targets_drop_padding_and_count_classes_from_one():
    labels = torch.tensor([[[0, 0.1, 0.2, 0.5, 0.6], [-1, -1, -1, -1, -1]],
                           [[2, 0.0, 0.0, 1.0, 1.0], [1, 0.25, 0.25, 0.75, 0.5]]])
    first, second = H.ssdlite_targets(labels, 256)
    torch.testing.assert_close(first["boxes"], torch.tensor([[25.6, 51.2, 128.0, 153.6]]))
    assert first["labels"].tolist() == [1] and first["labels"].dtype == torch.int64
    assert second["labels"].tolist() == [3, 2]
    torch.testing.assert_close(second["boxes"][1], torch.tensor([64.0, 64.0, 192.0, 128.0]))


class FixedDetector(nn.Module):
    """Eval: one banana at fixed pixels per image. Train: a loss from one weight, NaN when told."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.register_buffer("seen", torch.zeros(1))
        self.nan = False

    def forward(self, images, targets=None):
        assert all(0 <= image.min() and image.max() <= 1 for image in images), "floats in 0..1"
        if self.training:
            self.seen += 1  # a buffer the forward pass moves, like batch-norm statistics
            assert targets is not None and targets[0]["labels"].min() >= 1
            loss = (self.weight - 3).pow(2).sum()
            return {"loss": loss * float("nan") if self.nan else loss}
        return [{"boxes": torch.tensor([[32.0, 64.0, 96.0, 128.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])} for _ in images]


def test_detect_torchvision_gives_our_rows():
    images = torch.zeros(3, 3, 128, 256, dtype=torch.uint8)
    rows = H.detect_torchvision(FixedDetector(), images, batch_size=2)
    assert len(rows) == 3
    torch.testing.assert_close(rows[0], torch.tensor([[0.0, 0.9, 0.125, 0.5, 0.375, 1.0]]))


def data(n=8):
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([[[0, 0.1, 0.1, 0.6, 0.7]]]).repeat(n, 1, 1)
    return images, labels


def test_train_for_seconds_trains_and_stops_in_time():
    model = FixedDetector()
    history = H.train_for_seconds(model, data(), seconds=0.5, device=torch.device("cpu"), lr=0.1,
                                  batch_size=4, progress=False)
    assert history["steps"] > 1 and history["examples"] == 4 * history["steps"]
    assert history["seconds"] < 5
    assert history["loss"][-1] < history["loss"][0]


def test_train_for_seconds_warms_up_over_the_first_epoch_then_decays():
    history = H.train_for_seconds(FixedDetector(), data(16), seconds=1.0,
                                  device=torch.device("cpu"), lr=0.1, batch_size=4, progress=False)
    lr = history["lr"]
    assert len(lr) == history["steps"] > 8
    assert lr[0] == pytest.approx(0.1 / 4, rel=0.05), (
        "step 1 of a 4-step epoch: a quarter of the peak")
    assert lr[0] < lr[1] < lr[2] < lr[3] and max(lr) == lr[3], (
        "linear warm-up over the first epoch (4 steps)")
    assert all(a >= b for a, b in zip(lr[3:], lr[4:])) and lr[-1] < 0.1 / 4, (
        "then the cosine, towards 0")


def test_train_for_seconds_stops_on_nan_and_leaves_the_model():
    model = FixedDetector()
    model.nan = True
    with pytest.raises(FloatingPointError, match="indices into train_data"):
        H.train_for_seconds(model, data(), seconds=5, device=torch.device("cpu"), batch_size=4,
                            progress=False)
    assert model.weight.item() == 1.0 and model.weight.grad is None
    assert model.seen.item() == 0, "the buffers the forward pass moved are put back"
