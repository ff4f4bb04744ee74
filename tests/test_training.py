"""Training, checkpoints and prediction (notebooks 07 and 08)."""
import math

import matplotlib.colors
import matplotlib.figure
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ssd_helpers as H


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = H.generate_banana_detection(tmp_path_factory.mktemp("d") / "bananas", num_train=16,
                                       num_val=4)
    return (H.read_detection_folder(root / "bananas_train"),
            H.read_detection_folder(root / "bananas_val"))


def fake_batch(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    net = H.TinySSD()
    anchors, cls_preds, bbox_preds = net(torch.rand(batch, 3, 64, 64, generator=g) * 255)
    labels = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6]], [[0, 0.5, 0.4, 0.9, 0.8]]])[:batch]
    return (cls_preds, bbox_preds) + H.multibox_target(anchors, labels)


def test_default_loss_is_the_books():
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    batch, _, num_classes = cls_preds.shape
    book = (F.cross_entropy(cls_preds.reshape(-1, num_classes), cls_labels.reshape(-1),
                            reduction="none")
            .reshape(batch, -1).mean(dim=1)
            + F.l1_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks,
                        reduction="none").mean(dim=1))
    torch.testing.assert_close(
        H.calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks), book)


def test_hard_negative_mask_keeps_positives_and_three_negatives_each():
    g = torch.Generator().manual_seed(0)
    cls_loss = torch.rand(2, 100, generator=g)
    cls_labels = torch.zeros(2, 100, dtype=torch.long)
    cls_labels[0, [3, 50]] = 1  # two positives in image 0, none in image 1
    keep = H.hard_negative_mask(cls_loss, cls_labels, neg_ratio=3.0)
    assert keep[0, [3, 50]].all() and int(keep[0].sum()) == 2 + 6
    negatives = cls_loss[0].masked_fill(cls_labels[0] > 0, -1)
    assert set(negatives.topk(6).indices.tolist()) == set(
        (keep[0] & (cls_labels[0] == 0)).nonzero()[:, 0].tolist())
    assert int(keep[1].sum()) == 3  # an image without objects still trains on some negatives


def test_positive_normalisation_divides_by_positives():
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    full = H.calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks,
                       loss_norm="positives")
    num_pos = (cls_labels > 0).sum(dim=1)
    ce = F.cross_entropy(cls_preds.reshape(-1, 2), cls_labels.reshape(-1),
                         reduction="none").reshape(2, -1)
    l1 = (F.l1_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks, reduction="none")).sum(dim=1)
    torch.testing.assert_close(full, (ce.sum(dim=1) + l1) / num_pos)


def test_metrics_count_foreground_and_positive_anchors():
    cls_preds, bbox_preds, bbox_labels, bbox_masks, cls_labels = fake_batch()
    counts = H.batch_metrics(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
    assert counts["anchors"] == cls_labels.numel()
    assert (counts["fg_anchors"] == int((cls_labels > 0).sum())
            and counts["bbox_values"] == 4 * counts["fg_anchors"])


def test_hflip_moves_boxes_with_the_pixels():
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[:, :, 4:8, 2:6] = 255  # a white square at x 2..6, y 4..8
    labels = torch.tensor([[[0, 2 / 16, 4 / 16, 6 / 16, 8 / 16],
                            [-1, -1, -1, -1, -1]]]).repeat(8, 1, 1)
    flipped, new_labels = H.hflip_batch(images, labels, torch.Generator().manual_seed(0))
    for image, label in zip(flipped, new_labels):
        cols = (image[0] > 0).any(dim=0).nonzero()[:, 0]
        assert torch.allclose(label[0, [1, 3]] * 16,
                              torch.tensor([cols.min(), cols.max() + 1]).float())
        assert (label[1] == -1).all()
    assert 0 < sum(not torch.equal(a, b) for a, b in zip(flipped, images)) < 8


def test_learning_rate_warms_up_then_decays():
    config = H.TrainConfig(epochs=4, lr=0.1, warmup_epochs=1.0)
    lrs = [H.lr_at(step, 40, 10, config) for step in range(40)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001


def test_training_runs_reports_and_saves(tiny_data, tmp_path):
    train, val = tiny_data
    H.set_seed(0)
    net = H.TinySSD(H.default_config())
    path = tmp_path / "model.pt"
    history = H.train_ssd(net, train, H.TrainConfig(epochs=2, batch_size=8, bf16="off"),
                          torch.device("cpu"), val_data=val, evaluate=H.evaluate_map,
                          checkpoint=path, progress=False)
    assert len(history["loss"]) == 2 and all(math.isfinite(v) for v in history["loss"])
    assert all(v > 0 for v in history["examples_per_s"]) and 0 <= history["AP"][-1] <= 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left
    loaded, config = H.load_model(path)
    assert config == net.config
    x = torch.rand(1, 3, 256, 256) * 255
    net.eval()
    for a, b in zip(net(x), loaded(x)):
        torch.testing.assert_close(a, b)


def test_options_that_do_not_go_together_are_refused_before_training(tiny_data, monkeypatch):
    """val_data without evaluate=, and TrainConfig.augment without augment= (or the reverse), are
    refused before the first step."""
    steps = []
    monkeypatch.setattr(H, "train_step", lambda *args, **kwargs: steps.append(1))
    train, val = tiny_data
    net = H.TinySSD(H.default_config())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    config = H.TrainConfig(epochs=1, batch_size=8, bf16="off")
    cpu = torch.device("cpu")
    with pytest.raises(H.ConfigError, match="val_data= and evaluate= go together.*evaluate_map"):
        H.train_ssd(net, train, config, cpu, val_data=val, progress=False)
    with pytest.raises(H.ConfigError, match="go together"):
        H.train_ssd(net, train, config, cpu, evaluate=H.evaluate_map, progress=False)
    with pytest.raises(H.ConfigError, match="go together"):  # not a function
        H.train_ssd(net, train, config, cpu, val_data=val, evaluate="map", progress=False)
    augment = H.ssd_batch_augmentation()
    with pytest.raises(H.ConfigError, match=r"TrainConfig\(augment=True\) and .*augment=.* go "
                                            "together"):
        H.train_ssd(net, train, H.TrainConfig(epochs=1, batch_size=8, bf16="off", augment=True),
                    cpu, progress=False)
    with pytest.raises(H.ConfigError, match="go together"):
        H.train_ssd(net, train, config, cpu, augment=augment, progress=False)
    assert steps == []
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_same_seed_same_training(tiny_data):
    train, _ = tiny_data
    losses = []
    for _ in range(2):
        H.set_seed(0)
        net = H.TinySSD(H.default_config())
        losses.append(H.train_ssd(net, train, H.TrainConfig(epochs=1, batch_size=8, bf16="off"),
                                  torch.device("cpu"), progress=False)["loss"])
    assert losses[0] == losses[1]


def test_non_finite_loss_stops_naming_epoch_batch_and_image(tiny_data, monkeypatch):
    images, labels = tiny_data[0]
    real_loss, real_step, calls, before = H.calc_loss, H.train_step, [0], {}

    def nan_in_second_batch(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        calls[0] += 1
        return (torch.where(torch.arange(len(losses)) == 1, math.nan, losses) if calls[0] == 2
                else losses)

    def remember_state(net, *args, **kwargs):
        before.update({k: v.clone() for k, v in net.state_dict().items()})
        return real_step(net, *args, **kwargs)
    monkeypatch.setattr(H, "calc_loss", nan_in_second_batch)
    monkeypatch.setattr(H, "train_step", remember_state)
    H.set_seed(0)
    net = H.TinySSD(H.default_config())
    # batch 2, position 1
    image = int(torch.randperm(16, generator=torch.Generator().manual_seed(0))[8 + 1])
    with pytest.raises(FloatingPointError,
                       match=rf"epoch 1, batch 2 .*image\(s\) \[{image}\].*lower config.lr"):
        H.train_ssd(net, (images, labels), H.TrainConfig(epochs=1, batch_size=8, bf16="off"),
                    torch.device("cpu"), progress=False)
    # weights and batch-norm statistics as before batch 2
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_damaged_model_is_refused_by_training_and_detect(tiny_data):
    images, labels = tiny_data[0]
    net = H.TinySSD(H.default_config())
    with torch.no_grad():
        net.cls_heads[0].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="already holds NaN"):
        H.train_ssd(net, (images, labels), H.TrainConfig(epochs=1, batch_size=8, bf16="off"),
                    torch.device("cpu"), progress=False)
    with pytest.raises(RuntimeError, match="outputs hold NaN"):
        H.detect(net, images[0])


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    net = H.TinySSD()
    path = tmp_path / "model.pt"
    H.save_checkpoint(path, net)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        H.save_checkpoint(path, H.TinySSD(num_classes=2))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_detect_can_squash_like_the_book(tiny_data):
    H.set_seed(0)
    net = H.TinySSD(H.default_config()).eval()
    wide = torch.nn.functional.interpolate(tiny_data[1][0][:1].float(),
                                           size=(200, 500))[0].to(torch.uint8)
    # (k, 6) in the 500x200 image's pixels
    found = H.detect(net, wide, threshold=0.0, keep_aspect=False)
    X = torch.nn.functional.interpolate(wide[None].float(), size=(256, 256), mode="bilinear",
                                        antialias=True)
    with torch.no_grad():
        anchors, cls_preds, bbox_preds = net(X)
    reference = H.multibox_detection(torch.softmax(cls_preds, 2).permute(0, 2, 1), bbox_preds,
                                     anchors)[0]
    reference = reference[reference[:, 0] >= 0]
    scale = torch.tensor([500.0, 200, 500, 200])
    torch.testing.assert_close(found[:, 2:],
                               (reference[:, 2:] * scale).clamp(torch.zeros(4), scale))
    assert (found[:, [2, 4]] <= 500).all() and (found[:, [3, 5]] <= 200).all()


def test_detect_keeps_proportions_and_runs_on_the_whole_rectangle(tiny_data):
    """A 512x256 photo runs through the model as it is: no squashing, no padding."""
    H.set_seed(0)
    net = H.TinySSD(H.default_config()).eval()
    wide = torch.cat([tiny_data[1][0][0], tiny_data[1][0][1]], dim=2)  # (3, 256, 512)
    found = H.detect(net, wide, threshold=0.0)
    with torch.no_grad():
        anchors, cls_preds, bbox_preds = net(wide[None].float())
    reference = H.multibox_detection(torch.softmax(cls_preds, 2).permute(0, 2, 1), bbox_preds,
                                     anchors)[0]
    reference = reference[reference[:, 0] >= 0]
    scale = torch.tensor([512.0, 256, 512, 256])
    torch.testing.assert_close(found[:, 2:],
                               (reference[:, 2:] * scale).clamp(torch.zeros(4), scale))
    assert anchors.shape[1] == 4 * (32 * 64 + 16 * 32 + 8 * 16 + 4 * 8 + 1)


def test_detect_on_extreme_shapes(tiny_data):
    """Thin images are scaled up to 64 px on the short side; when that would break max_size they are
    refused (a 100000 x 20 image would otherwise need gigabytes)."""
    net = H.TinySSD(H.default_config()).eval()
    for shape, max_size in [((3, 20, 300), 1024), ((3, 300, 20), 1024), ((3, 7, 9), 1024),
                            ((3, 20, 3000), 9600)]:
        image = torch.nn.functional.interpolate(tiny_data[1][0][:1].float(), size=shape[1:])[0]
        found = H.detect(net, image, threshold=0.0, max_size=max_size)
        assert (found[:, [2, 4]] <= shape[2]).all() and (found[:, [3, 5]] <= shape[1]).all()
    with pytest.raises(H.DatasetError, match="3000x20 pixels.* 9600, over max_size=1024"):
        H.detect(net, torch.zeros(3, 20, 3000, dtype=torch.uint8), max_size=1024)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_detect_takes_paths_and_pil_images_of_any_mode(tiny_data, tmp_path, mode):
    net = H.TinySSD(H.default_config()).eval()
    pixels = tiny_data[1][0][0].permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels).resize((300, 200)).convert(mode)
    image.save(tmp_path / "photo.png")
    for source in (image, tmp_path / "photo.png", str(tmp_path / "photo.png"), np.asarray(image)):
        assert H.detect(net, source, threshold=0.0).shape[1] == 6


# (class, score, xmin, ymin, xmax, ymax) in pixels of a 64x64 image; class 7 is named nowhere
DETECTIONS = torch.tensor([[0, 0.9, 4, 4, 20, 20], [1, 0.5, 30, 30, 60, 60],
                           [7, 0.25, 10, 40, 30, 60]])


def shown(detections, **kwargs):
    """(label texts, box edge colours) that show_detections draws on a fresh axes."""
    ax = matplotlib.figure.Figure().subplots()
    H.show_detections(ax, torch.zeros(3, 64, 64, dtype=torch.uint8), detections, **kwargs)
    return [t.get_text() for t in ax.texts], [p.get_edgecolor() for p in ax.patches]


def test_show_detections_names_a_class_it_is_not_given_by_its_id():
    texts, colours = shown(DETECTIONS, class_names=("banana", "orange"))
    assert texts == ["banana 0.90", "orange 0.50", "class 7 0.25"]
    assert shown(DETECTIONS)[0] == ["class 0 0.90", "class 1 0.50", "class 7 0.25"]
    # one colour per class id, cycling through four: ids 0, 1 and 7 get the first, second and last
    palette = shown(torch.tensor([[c, 0.5, 4, 4, 20, 20] for c in range(4)]))[1]
    assert len(set(palette)) == 4 and colours == [palette[0], palette[1], palette[3]]


def test_to_image_tensor_rejects_nonsense():
    with pytest.raises(ValueError, match="expected an image"):
        H.to_image_tensor(torch.zeros(5, 8, 8))


def test_validation_uses_the_training_precision_not_the_cpu_s(tiny_data, monkeypatch):
    seen, real = [], H.detect_images

    def spy(net, images, **kwargs):
        seen.append(kwargs)
        return real(net, images, **kwargs)
    monkeypatch.setattr(H, "detect_images", spy)
    H.train_ssd(H.TinySSD(H.default_config()), tiny_data[0],
                H.TrainConfig(epochs=1, batch_size=8, bf16="off"),
                torch.device("cpu"), val_data=tiny_data[1], evaluate=H.evaluate_map,
                progress=False)
    assert seen == [{"bf16": "off", "channels_last": "auto"}]


def test_the_checkpoint_path_follows_the_argument_not_the_environment(monkeypatch):
    monkeypatch.setenv("TINYSSD_FAST", "1")
    assert H.default_checkpoint().name == "tinyssd_bananas.pt"
    assert H.default_checkpoint(fast=True).name == "tinyssd_bananas_fast.pt"


def test_a_missing_full_model_is_never_written_by_the_notebooks_after_07(tmp_path, monkeypatch,
                                                                      capsys):
    """Without notebook 07's checkpoint, load_default_model trains and returns the short model
    under its own name, says so, and leaves the full model's file unwritten."""
    monkeypatch.setattr(H, "DATA_DIR", tmp_path)
    trained = []

    def short_training(path, device=None, fast=False, **kwargs):
        trained.append((path, fast))
        H.save_checkpoint(path, H.TinySSD(H.default_config()))
    monkeypatch.setattr(H, "train_default_model", short_training)
    net, config, path = H.load_default_model(torch.device("cpu"))
    assert path == H.default_checkpoint(fast=True) and trained == [(path, True)]
    assert not H.default_checkpoint().exists()
    assert "No tinyssd_bananas.pt from notebook 07" in capsys.readouterr().out
    H.save_checkpoint(H.default_checkpoint(), net)  # once 07 has saved it, it is the one used
    assert H.load_default_model()[2] == H.default_checkpoint() and len(trained) == 1


def stop_after(epochs):
    """An on_epoch_end that presses Ctrl-C once `epochs` epochs are done."""
    def on_epoch_end(epoch, history):
        if epoch + 1 == epochs:
            raise KeyboardInterrupt
    return on_epoch_end


def test_a_resumed_run_is_the_run_that_never_stopped(tiny_data, tmp_path):
    """Stopped after epoch 2 of 3 and resumed, the model and the history are bit for bit those of
    the uninterrupted run: with momentum, flips and a cosine schedule, all of which need the saved
    optimiser and random state."""
    train, val = tiny_data
    config = H.TrainConfig(epochs=3, batch_size=8, momentum=0.9)
    cpu, straight, stopped = torch.device("cpu"), tmp_path / "straight.pt", tmp_path / "stopped.pt"
    H.set_seed(0)
    net = H.TinySSD(H.default_config())
    H.train_ssd(net, train, config, cpu, val_data=val, evaluate=H.evaluate_map,
                checkpoint=straight, progress=False)
    H.set_seed(0)
    with pytest.raises(KeyboardInterrupt):
        H.train_ssd(H.TinySSD(H.default_config()), train, config, cpu, val_data=val,
                    evaluate=H.evaluate_map, checkpoint=stopped, on_epoch_end=stop_after(2),
                    progress=False)
    assert len(H.read_checkpoint(stopped)["history"]["loss"]) == 2
    H.set_seed(1)  # other starting weights: resuming replaces them
    history = H.train_ssd(H.TinySSD(H.default_config()), train, config, cpu, val_data=val,
                          evaluate=H.evaluate_map, checkpoint=stopped, resume=stopped,
                          progress=False)
    a, b = H.read_checkpoint(straight), H.read_checkpoint(stopped)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key in ("loss", "fg_err", "bbox_mae", "lr", "AP50", "AP"):
        assert a["history"][key] == b["history"][key] == history[key], key
    # another config, other data, or a file without training state: refused, naming the cause
    with pytest.raises(H.ConfigError, match="stopped.pt was trained with epochs=3.*asks for 4"):
        H.train_ssd(H.TinySSD(H.default_config()), train, H.TrainConfig(epochs=4, batch_size=8,
                    momentum=0.9), cpu, resume=stopped, progress=False)
    with pytest.raises(H.DatasetError, match="training or validation data differ"):
        H.train_ssd(H.TinySSD(H.default_config()), (train[0][:8], train[1][:8]), config, cpu,
                    resume=stopped, progress=False)
    H.save_checkpoint(tmp_path / "plain.pt", net)
    with pytest.raises(H.CheckpointError, match="plain.pt holds no training state"):
        H.train_ssd(H.TinySSD(H.default_config()), train, config, cpu,
                    resume=tmp_path / "plain.pt", progress=False)
    with pytest.raises(H.ConfigError, match="trained with num_classes=1, and this run asks for 2"):
        H.train_ssd(H.TinySSD(H.default_config(num_classes=2)), train, config, cpu,
                    resume=stopped, progress=False)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert H.pick_device() == torch.device(expected)
    assert H.pick_device("cpu") == torch.device("cpu")  # a name given wins


@pytest.mark.parametrize("device, capability, cpu_bf16, expected", [
    ("cuda", (8, 0), False, (True, True, None)),         # Ampere and later: bf16
    ("cuda", (7, 5), True, (False, False, "fp16")),      # a T4 or a V100: fp16 and a scaler
    ("cpu", None, True, (True, True, None)),             # AVX512-BF16 or AMX
    ("cpu", None, False, (False, True, None)),           # channels_last still pays in fp32
    ("mps", None, True, (False, False, None)),
])
def test_precision_is_chosen_by_the_device(monkeypatch, device, capability, cpu_bf16, expected):
    """pick_precision and pick_grad_scaler with the device mocked: nothing here has a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # for GradScaler("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(H, "cpu_has_native_bf16", lambda: cpu_bf16)
    device = torch.device(device)
    scaler = H.pick_grad_scaler(device)
    assert (*H.pick_precision(device), scaler and "fp16") == expected
    assert scaler is None or scaler.is_enabled()
    assert H.pick_grad_scaler(device, bf16="off") is None  # asked for fp32: fp32
    assert H.pick_precision(device, bf16="off", channels_last="off") == (False, False)


def test_fp16_with_a_grad_scaler_steps_and_skips_overflowing_steps(tiny_data):
    """The fp16 path of a GPU without bf16, run on the CPU: a scaled step trains; a scale so large
    that the gradients overflow skips the step and halves the scale, with no error."""
    images, labels = tiny_data[0]
    H.set_seed(0)
    net = H.TinySSD(H.default_config())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    config, cpu = H.TrainConfig(), torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in net.parameters()]
    loss, _ = H.train_step(net, optimizer, images[:8], labels[:8], config, cpu, scaler=scaler)
    assert math.isfinite(loss) and scaler.get_scale() == 2.0**10
    assert not all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    overflow = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    before = [p.detach().clone() for p in net.parameters()]
    H.train_step(net, optimizer, images[:8], labels[:8], config, cpu, scaler=overflow)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert overflow.get_scale() == 2.0**119


def test_a_checkpoint_path_holding_a_users_file_is_refused_before_training(tiny_data, tmp_path,
                                                                           monkeypatch):
    steps = []
    monkeypatch.setattr(H, "train_step", lambda *args, **kwargs: steps.append(1))
    mine = tmp_path / "notes.pt"
    mine.write_text("my notes")
    with pytest.raises(FileExistsError, match="notes.pt exists and was not written by"):
        H.train_ssd(H.TinySSD(H.default_config()), tiny_data[0],
                    H.TrainConfig(epochs=1, batch_size=8), torch.device("cpu"), checkpoint=mine,
                    progress=False)
    assert steps == [] and mine.read_text() == "my notes"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_batch_parts_cover_the_batch_and_shares_weight_them(world):
    """Under torchrun each process trains on batch_part of every batch: the parts, in rank order,
    are the batch, and world x part / batch is each one's weight in the averaged gradient (0 for a
    stand-in image, when the last batch has fewer images than there are processes)."""
    for batch_size in range(1, 13):
        parts = [H.batch_part(batch_size, rank, world) for rank in range(world)]
        covered = [i for part, share in parts if share > 0
                   for i in range(part.start, part.stop)]
        assert covered == list(range(batch_size))
        assert sum(share for _, share in parts) == pytest.approx(world)
        for part, share in parts:
            assert share == pytest.approx(world * (part.stop - part.start) / batch_size
                                          if share else 0.0)
            assert part.stop - part.start >= 1  # every process runs a forward pass
    assert H.batch_part(32) == (slice(0, 32), 1.0)


def damaged(path, tmp_path, change):
    """A copy of the checkpoint at path with change(checkpoint) applied."""
    checkpoint = H.read_checkpoint(path)
    change(checkpoint)
    copy = tmp_path / f"damaged_{len(list(tmp_path.iterdir()))}.pt"
    torch.save(checkpoint, copy)
    return copy


def test_resuming_refuses_another_model_other_validation_data_and_damaged_state(tiny_data,
                                                                                 tmp_path):
    train, val = tiny_data
    config, cpu, path = H.TrainConfig(epochs=2, batch_size=8), torch.device("cpu"), tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        H.train_ssd(H.TinySSD(H.default_config()), train, config, cpu, val_data=val,
                    evaluate=H.evaluate_map, checkpoint=path, on_epoch_end=stop_after(1),
                    progress=False)

    def resume(net=None, from_path=path, val_data=val):
        H.train_ssd(net or H.TinySSD(H.default_config()), train, config, cpu, val_data=val_data,
                    evaluate=H.evaluate_map, resume=from_path, progress=False)
    smaller = H.SSDConfig(**{**vars(H.default_config()), "sizes": tuple(
        (a / 2, b / 2) for a, b in H.default_config().sizes)})
    with pytest.raises(H.ConfigError, match="m was trained with sizes=.*and the same model"):
        resume(H.TinySSD(smaller))
    with pytest.raises(H.DatasetError, match="training or validation data differ"):
        resume(val_data=(val[0][:2], val[1][:2]))
    for change in (lambda c: c["history"].update(loss=5),
                   lambda c: c["history"].update(loss=["x"]),
                   lambda c: c["resume"].update(epoch=True),
                   lambda c: c["resume"].update(data=torch.zeros(2))):
        with pytest.raises(H.CheckpointError, match="holds no training state"):
            resume(from_path=damaged(path, tmp_path, change))
    with pytest.raises(H.ConfigError, match=r"trained with lr=tensor\(0.02"):
        resume(from_path=damaged(path, tmp_path,
                                 lambda c: c["train_config"].update(lr=torch.tensor(0.02))))
    with pytest.raises(H.CheckpointError, match="cannot be resumed"):
        resume(from_path=damaged(path, tmp_path, lambda c: c["resume"].update(generator=[1])))
    resume()  # the file itself still resumes


def test_fp16_gradients_that_overflow_at_every_scale_stop_training(tiny_data):
    """A gradient that is inf whatever the loss scale (here by a hook) would otherwise skip every
    step silently: below scale 1 train_step stops, with the weights unchanged and the scaler still
    usable."""
    images, labels = tiny_data[0]
    net = H.TinySSD(H.default_config())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    hook = net.cls_heads[0].bias.register_hook(lambda grad: grad * math.inf)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match="loss scale lowered below 1"):
        H.train_step(net, optimizer, images[:8], labels[:8], H.TrainConfig(), torch.device("cpu"),
                     scaler=scaler)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    hook.remove()
    H.train_step(net, optimizer, images[:8], labels[:8], H.TrainConfig(), torch.device("cpu"),
                 scaler=scaler)
    assert not all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
