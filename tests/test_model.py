"""Shapes of the heads, blocks and TinySSD (notebooks 01-03 and 05)."""
import pytest
import torch

import ssd_helpers as H


def test_predictor_shapes():
    Y1 = H.cls_predictor(8, 5, 10)(torch.zeros(2, 8, 20, 20))
    Y2 = H.cls_predictor(16, 3, 10)(torch.zeros(2, 16, 10, 10))
    assert Y1.shape == (2, 55, 20, 20) and Y2.shape == (2, 33, 10, 10)
    assert H.bbox_predictor(8, 5)(torch.zeros(2, 8, 20, 20)).shape == (2, 20, 20, 20)
    assert H.concat_preds([Y1, Y2]).shape == (2, 55 * 400 + 33 * 100)


def test_flatten_keeps_each_pixels_channels_together():
    pred = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    flat = H.flatten_pred(pred)
    # Pixel (row 1, col 2) of image 0 is at positions (1 * 5 + 2) * 3 ... + 3
    assert flat[0, 21:24].tolist() == pred[0, :, 1, 2].tolist()


def test_blocks_halve_the_map():
    assert H.down_sample_blk(3, 10)(torch.zeros(2, 3, 20, 20)).shape == (2, 10, 10, 10)
    assert H.base_net()(torch.zeros(2, 3, 256, 256)).shape == (2, 64, 32, 32)
    X = torch.zeros(2, 3, 256, 256)
    sides = []
    for i in range(5):
        X = H.get_blk(i)(X)
        sides.append(X.shape[-1])
    assert sides == [32, 16, 8, 4, 1]


def test_tinyssd_outputs_and_anchor_count():
    net = H.TinySSD(num_classes=1)
    anchors, cls_preds, bbox_preds = net(torch.zeros(32, 3, 256, 256))
    assert anchors.shape == (1, 5444, 4)
    assert cls_preds.shape == (32, 5444, 2)
    assert bbox_preds.shape == (32, 5444 * 4)
    assert 1.0e6 < sum(p.numel() for p in net.parameters()) < 1.05e6


def test_tinyssd_is_configurable_and_takes_any_size():
    config = H.SSDConfig(num_classes=3, ratios=((1, 2),) * 5)
    net = H.TinySSD(config)
    anchors, cls_preds, bbox_preds = net(torch.zeros(1, 3, 320, 192))
    per_pixel = 3  # 2 sizes + 2 ratios - 1
    assert anchors.shape[1] == per_pixel * (40 * 24 + 20 * 12 + 10 * 6 + 5 * 3 + 1)
    assert cls_preds.shape == (1, anchors.shape[1], 4)
    assert isinstance(net.blks, torch.nn.ModuleList)
    with pytest.raises(ValueError, match="5 entries"):
        H.TinySSD(sizes=((0.2,),) * 4)


def test_first_stride_two_skips_the_full_size_maps_and_keeps_the_rest(tmp_path):
    book, strided = H.TinySSD(), H.TinySSD(first_stride=2)
    seen = []
    hook = strided.blks[0][0][0].register_forward_hook(lambda m, i, out: seen.append(out.shape))
    X = torch.zeros(2, 3, 256, 200)
    for a, b in zip(book(X), strided(X)):
        assert a.shape == b.shape  # the same anchors and predictions from block 1 on
    hook.remove()
    assert seen == [(2, 16, 128, 100)]  # the first convolution already halves the input
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in strided.blks[0][0])
    assert sum(p.numel() for p in book.parameters()) == sum(p.numel() for p in strided.parameters())
    H.save_checkpoint(tmp_path / "strided.pt", strided)
    assert H.load_model(tmp_path / "strided.pt")[0].config.first_stride == 2
    with pytest.raises(ValueError, match="first_stride"):
        H.TinySSD(first_stride=4)


def test_pick_device_is_explicit():
    assert H.pick_device("cpu") == torch.device("cpu")
    assert H.pick_device().type in {"cpu", "cuda", "mps"}
