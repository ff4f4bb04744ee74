"""The ONNX export (notebook 12): one graph from pixels to detections, checked against detect().

A small untrained TinySSD keeps these fast; the notebook checks the trained model the same way.
"""
import copy

import numpy as np
import onnx
import pytest
import torch

import ssd_helpers as H

ort = pytest.importorskip("onnxruntime")

ONNX_MARKER = "tinyssd-onnx"  # the metadata key that export_onnx writes into its files


def write_marked_onnx(path):
    """A tiny ONNX file that carries export_onnx's marker, as a file export_onnx wrote does."""
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    onnx.helper.set_model_props(model, {ONNX_MARKER: "{}"})
    path.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small untrained three-class TinySSD in training mode, exported once (an export takes about
    20 s) over a file that carries export_onnx's marker. Returns (net, path, net's state before, the
    file's bytes before)."""
    H.set_seed(0)
    net = H.TinySSD(H.default_config(num_classes=3)).train()
    # untrained, every top box has one class and near-equal scores, so NMS meets ties:
    with torch.no_grad():
        # larger weights spread the scores, and anchor a favours class a % 3
        for head in net.cls_heads:
            # (output channels 4a .. 4a + 3: anchor a's background, class 0, 1, 2)
            head.weight.mul_(20)
            for a in range(head.bias.shape[0] // 4):
                head.bias[4 * a + 1 + a % 3] += 3.0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("onnx") / "tiny3.onnx"
    write_marked_onnx(path)
    old_bytes = path.read_bytes()
    assert H.export_onnx(net, path) == path
    return net, path, before, old_bytes


def test_onnx_detections_match_detect_on_any_image_size(exported):
    net, path = copy.deepcopy(exported[0]).eval(), exported[1]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for height, width in [(256, 256), (256, 400), (300, 200), (64, 64)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours, theirs = (H.detect_onnx(session, image, threshold=0.0),
                        H.detect(net, image, threshold=0.0))
        assert len(theirs) > 0 and len(theirs[:, 0].unique()) == 3, (
            "every class, so that NMS per class is tested")
        box_gap, score_gap = H.detection_gaps(ours, theirs, width, height)
        assert box_gap <= 1e-3 and score_gap <= 1e-4, (height, width, box_gap, score_gap)


def test_export_replaces_only_its_own_file_and_leaves_the_model_alone(tmp_path, exported):
    net, path, before, old_bytes = exported
    assert path.read_bytes() != old_bytes, "its own file was replaced"
    assert not list(path.parent.glob(".tiny3.onnx.*")), "no temporary file left behind"
    assert net.training, "the caller's model stays in training mode"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not written by export_onnx"):
        H.export_onnx(net, notes)
    assert notes.read_text() == "my notes"


def test_detection_gaps_pairs_rows_within_their_class():
    ours = torch.tensor([[0, 0.9, 10, 10, 50, 50], [1, 0.8, 12, 12, 52, 52],
                         [0, 0.5, 100, 100, 150, 150]])
    theirs = ours[[2, 1, 0]].clone()  # another order
    theirs[0, 2] += 1.0  # one coordinate 1 px off
    theirs[1, 1] -= 0.01
    box_gap, score_gap = H.detection_gaps(ours, theirs, width=200, height=100)
    assert box_gap == pytest.approx(1 / 200) and score_gap == pytest.approx(0.01)
    with pytest.raises(ValueError, match="not the same detections"):
        H.detection_gaps(ours, theirs[:2], 200, 100)
    other = theirs.clone()
    other[1, 0] = 0  # the same boxes, but a class changed
    with pytest.raises(ValueError, match="not the same detections"):
        H.detection_gaps(ours, other, 200, 100)
    # each box's nearest match is in the other class: paired by class, the gap is 2.5 px, not 0.5
    crossed = torch.tensor([[0, 0.9, 10, 10, 50, 50], [1, 0.9, 12, 12, 52, 52]])
    swapped = torch.tensor([[0, 0.9, 12.5, 12, 52, 52], [1, 0.9, 10.5, 10, 50, 50]])
    assert H.detection_gaps(crossed, swapped, 200, 200)[0] == pytest.approx(2.5 / 200)


def test_fold_batch_norm_gives_the_same_outputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = H.TinySSD(H.default_config())
    H.train_step(net, torch.optim.SGD(net.parameters(), lr=0.01),
                 torch.randint(0, 256, (4, 3, 128, 128), dtype=torch.uint8),
                 torch.tensor([[[0, 0.1, 0.2, 0.5, 0.6]]] * 4), H.TrainConfig(),
                 torch.device("cpu"))  # batch norm statistics that are not the initial 0 and 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = H.fold_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    X = torch.rand(2, 3, 192, 160) * 255
    with torch.no_grad():
        for a, b in zip(net.eval()(X), folded(X)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_latency_ms_times_the_functions_in_turns():
    calls = []
    timed = H.latency_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         rounds=3, runs=2, warmup=1)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert list(timed) == ["a", "b"]
    assert all(len(t["round p50"]) == 3 and 0 <= t["p50"] <= t["p90"] for t in timed.values())
