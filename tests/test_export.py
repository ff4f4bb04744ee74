"""The ONNX export (notebook 12): one graph from pixels to detections, checked against detect().

A small untrained TinySSD keeps these fast; the notebook checks the trained model the same way.
"""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import ssd_helpers as H

ort = pytest.importorskip("onnxruntime")


def matched_difference(ours, theirs, width, height):
    """Pair rows one to one by class and box; returns (largest box gap / image side, largest score gap)."""
    assert ours.shape == theirs.shape
    if len(ours) == 0:
        return 0.0, 0.0
    scale = torch.tensor([width, height, width, height])
    gaps = ((ours[:, None, 2:] - theirs[None, :, 2:]) / scale).abs().amax(-1)
    cost = gaps + 1e6 * (ours[:, None, 0] != theirs[None, :, 0])
    rows, cols = linear_sum_assignment(cost.numpy())
    return cost[rows, cols].max().item(), (ours[rows, 1] - theirs[cols, 1]).abs().max().item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small untrained one-class TinySSD and its ONNX file, exported once for the tests below."""
    H.set_seed(0)
    net = H.TinySSD(H.default_config(num_classes=1)).eval()
    return net, H.export_onnx(net, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def check_against_detect(net, path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for height, width in [(256, 256), (256, 400), (300, 200), (64, 64)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours, theirs = H.detect_onnx(session, image, threshold=0.0), H.detect(net, image, threshold=0.0)
        assert len(theirs) > 0
        box_gap, score_gap = matched_difference(ours, theirs, width, height)
        assert box_gap <= 1e-3 and score_gap <= 1e-4, (height, width, box_gap, score_gap)


def test_onnx_detections_match_detect(exported):
    check_against_detect(*exported)


def test_three_classes_match_detect_and_export_replaces_only_its_own_file(tmp_path, exported):
    """One export (they are slow) serves both: a three-class graph, written over a file export_onnx wrote."""
    H.set_seed(0)
    net = H.TinySSD(H.default_config(num_classes=3)).train()
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not written by export_onnx"):
        H.export_onnx(net, notes)
    assert notes.read_text() == "my notes"
    path = tmp_path / "tiny3.onnx"
    path.write_bytes(exported[1].read_bytes())  # a file export_onnx wrote
    before = {k: v.clone() for k, v in net.state_dict().items()}
    H.export_onnx(net, path)  # its own file: replaced
    assert path.read_bytes() != exported[1].read_bytes(), "other weights, another file"
    assert not list(tmp_path.glob(".tiny3.onnx.*")), "no temporary file left behind"
    assert net.training, "the caller's model stays in training mode"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    check_against_detect(net.eval(), path)


def test_fold_batch_norm_gives_the_same_outputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = H.TinySSD(H.default_config())
    H.train_step(net, torch.optim.SGD(net.parameters(), lr=0.01), torch.randint(0, 256, (4, 3, 128, 128),
                 dtype=torch.uint8), torch.tensor([[[0, 0.1, 0.2, 0.5, 0.6]]] * 4), H.TrainConfig(),
                 torch.device("cpu"))  # batch norm statistics that are not the initial 0 and 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = H.fold_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    X = torch.rand(2, 3, 192, 160) * 255
    with torch.no_grad():
        for a, b in zip(net.eval()(X), folded(X)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
