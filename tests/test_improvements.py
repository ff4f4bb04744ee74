"""Loss options and training switches of notebook 10 (smooth L1, focal loss, augmentation)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import ssd_helpers as H
from test_training import fake_batch, tiny_data  # noqa: F401  (tiny_data is a fixture)


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    torch.testing.assert_close(H.focal_loss(logits, labels, gamma=0.0),
                               F.cross_entropy(logits, labels, reduction="none"))


def test_focal_loss_with_two_classes_is_torchvisions_sigmoid_focal_loss():
    # softmax over logits (0, z) is sigmoid(z): the two forms agree (torchvision's alpha=-1: no
    # weighting)
    g = torch.Generator().manual_seed(1)
    z, labels = torch.randn(200, generator=g) * 3, torch.randint(0, 2, (200,), generator=g)
    ours = H.focal_loss(torch.stack([torch.zeros_like(z), z], dim=1), labels, gamma=2.0)
    theirs = torchvision.ops.sigmoid_focal_loss(z, labels.float(), alpha=-1, gamma=2.0,
                                                reduction="none")
    torch.testing.assert_close(ours, theirs)


def test_focal_loss_gradient_stays_finite_when_certain():
    logits = torch.tensor([[30.0, 0.0], [0.0, 30.0]], requires_grad=True)  # p_t rounds to exactly 1
    for gamma in (0.5, 2.0):
        (grad,) = torch.autograd.grad(H.focal_loss(logits, torch.tensor([0, 1]), gamma).sum(),
                                      logits)
        assert torch.isfinite(grad).all()


def test_focal_loss_shrinks_easy_examples_most():
    # true class 0: easy, unsure, wrong
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0], [-4.0, 0.0]])
    ratio = H.focal_loss(logits, torch.zeros(3, dtype=torch.long)) / F.cross_entropy(
        logits, torch.zeros(3, dtype=torch.long), reduction="none")
    assert ratio[0] < 1e-3 and ratio[1] == pytest.approx(0.25) and ratio[2] > 0.96


def test_smooth_l1_is_quadratic_below_one_and_l1_above():
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    args = (cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    ce_only = H.calc_loss(*args, bbox_weight=0.0, loss_norm="positives")
    l1 = H.calc_loss(*args, loss_norm="positives") - ce_only
    smooth = H.calc_loss(*args, loss_norm="positives", box_loss="smooth_l1") - ce_only
    d = ((bbox_preds - bbox_labels) * bbox_masks).abs().reshape(2, -1)
    expected = torch.where(d < 1, 0.5 * d**2, d - 0.5).sum(dim=1) / (cls_labels > 0).sum(dim=1)
    torch.testing.assert_close(smooth, expected)
    assert (smooth < l1).all()  # smooth L1 <= L1 everywhere, strictly where d > 0


def test_focal_option_sums_over_every_anchor_when_mining_is_off():
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    args = (cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    total = H.calc_loss(*args, bbox_weight=0.0, loss_norm="positives", cls_loss="focal")
    per_anchor = H.focal_loss(cls_preds.reshape(-1, 2), cls_labels.reshape(-1)).reshape(2, -1)
    torch.testing.assert_close(total, per_anchor.sum(dim=1) / (cls_labels > 0).sum(dim=1))


def test_bbox_weight_scales_only_the_box_term():
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    args = (cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    losses = [H.calc_loss(*args, neg_ratio=3.0, bbox_weight=w, loss_norm="positives")
              for w in (0.0, 1.0, 3.0)]
    torch.testing.assert_close(losses[2] - losses[0], 3 * (losses[1] - losses[0]))


@pytest.mark.parametrize("option", [dict(box_loss="l2"), dict(cls_loss="hinge"),
                                    dict(loss_norm="batch")])
def test_unknown_loss_options_are_refused(option):
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    with pytest.raises(ValueError, match=next(iter(option))):
        H.calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks, **option)


@pytest.mark.parametrize("variant", [dict(augment=True),
                                     dict(cls_loss="focal", neg_ratio=0.0, box_loss="smooth_l1")])
def test_training_switches_run_and_repeat_with_the_seed(tiny_data, variant):  # noqa: F811
    train, _ = tiny_data
    histories = []
    for _ in range(2):
        H.set_seed(0)
        net = H.TinySSD(H.default_config())
        config = H.TrainConfig(epochs=1, batch_size=8, bf16="off", **variant)
        augment = H.ssd_batch_augmentation() if config.augment else None
        histories.append(H.train_ssd(net, train, config, torch.device("cpu"), augment=augment,
                                     progress=False)["loss"])
    assert np.isfinite(histories[0]).all() and histories[0] == histories[1]


def test_augmentation_changes_what_the_model_sees(tiny_data, monkeypatch):  # noqa: F811
    train, _ = tiny_data
    seen = []
    real_step = H.train_step

    def spy(net, optimizer, images, labels, *args, **kwargs):
        seen.append(labels.clone())
        return real_step(net, optimizer, images, labels, *args, **kwargs)
    monkeypatch.setattr(H, "train_step", spy)
    for augment in (False, True):
        H.set_seed(0)
        H.train_ssd(H.TinySSD(H.default_config()), train,
                    H.TrainConfig(epochs=1, batch_size=16, bf16="off", hflip=False,
                                  augment=augment),
                    torch.device("cpu"), augment=H.ssd_batch_augmentation() if augment else None,
                    progress=False)
    plain, augmented = seen
    widths = lambda labels: (labels[..., 3] - labels[..., 1])[labels[..., 0] >= 0]  # noqa: E731
    assert not torch.equal(plain, augmented)
    assert widths(augmented).min() < widths(plain).min()  # zoom-out made some banana smaller


def test_background_prior_starts_every_anchor_at_one_percent_foreground():
    H.set_seed(0)
    net = H.init_background_prior(H.TinySSD(H.default_config(num_classes=2)), prior=0.01)
    for head in net.cls_heads:
        head.weight.data.zero_()  # isolate the bias
    with torch.no_grad():
        _, cls_preds, _ = net(torch.rand(1, 3, 256, 256) * 255)
    background = torch.softmax(cls_preds, dim=-1)[..., 0]
    torch.testing.assert_close(background, torch.full_like(background, 0.99))


def test_train_variant_saves_the_model_it_evaluated(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    train, val = tiny_data
    evaluated = {}
    real_evaluate = H.evaluate_splits

    def spy(net, splits):
        net.eval()
        with torch.no_grad():
            evaluated["outputs"] = net(val[0].float())
        return real_evaluate(net, splits)
    monkeypatch.setattr(H, "evaluate_splits", spy)
    config = H.TrainConfig(epochs=1, batch_size=8, bf16="off", bbox_weight=2.0)
    model_config = H.SSDConfig(num_classes=1, sizes=((0.1, 0.141),) + H.SSDConfig().sizes[:4])
    row = H.train_variant(config, train, {"val": val}, model_config, torch.device("cpu"),
                          tmp_path / "v.pt")
    net, loaded_config = H.load_model(tmp_path / "v.pt")
    assert loaded_config == model_config
    with torch.no_grad():
        again = net(val[0].float())
    for a, b in zip(evaluated["outputs"], again):  # anchors, class scores, offsets
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    saved = torch.load(tmp_path / "v.pt", weights_only=True)
    assert (saved["results"]["val"]["AP"] == row["val AP"]
            and saved["train_config"]["bbox_weight"] == 2.0)
    assert len(saved["history"]["loss"]) == 1
