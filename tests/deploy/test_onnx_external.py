"""ONNX external data (nas/deploy/onnx.py): over `external_data_threshold` bytes of weights the export
is the graph plus one weights file, as an SD-size U-Net (3.4 GB fp32, over protobuf's 2 GiB) needs.
Forced here at the tiny U-Net's size with a threshold of 0 bytes."""

from __future__ import annotations

import json

import numpy as np
import torch

from nas.cli import main
from nas.commands import export_onnx
from nas.deploy import onnx as deploy_onnx


def _saved_unet(tiny_unet, folder):
    unet = tiny_unet(seed=3)
    unet.save_pretrained(folder, safe_serialization=True)
    return unet


def test_threshold_constant_agrees():
    """The CLI's torch-free copy of the default is the exporter's."""
    assert export_onnx.EXTERNAL_DATA_THRESHOLD == deploy_onnx.EXTERNAL_DATA_THRESHOLD == 2**30


def test_forced_external_data_runs_in_onnxruntime(tiny_unet, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    source = tmp_path / "unet"
    unet = _saved_unet(tiny_unet, source)
    out = tmp_path / "onnx"
    code = main(["export-onnx", str(source), "--out", str(out), "--external-data-threshold", "0"])
    assert code == 0
    report = json.loads((out / "export.json").read_text())
    weights = deploy_onnx.weights_bytes(unet)
    assert report["external_data"] == "unet.onnx.data" and report["weights_bytes"] == weights
    assert 0 <= report["check"]["max_abs_diff"] <= report["check"]["tolerance"]
    graph, data = out / "unet.onnx", out / "unet.onnx.data"
    # the weights are in the one data file (fp32), the graph keeps only structure and tiny tensors
    assert data.stat().st_size >= 0.9 * weights and graph.stat().st_size < 0.1 * weights
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "unet.onnx", "unet.onnx.data"]
    assert "unet.onnx + unet.onnx.data" in capsys.readouterr().out
    proto = onnx.load(str(graph), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"unet.onnx.data"}
    # ONNX Runtime loads the pair from the graph's path (moved: nothing points at the old folder)
    moved = tmp_path / "moved"
    out.rename(moved)
    session = ort.InferenceSession(str(moved / "unet.onnx"), providers=["CPUExecutionProvider"])
    inputs = deploy_onnx.example_inputs(unet.config, 2, 77, seed=5)
    with torch.no_grad():
        reference = unet(*inputs, return_dict=False)[0].numpy()
    names = {i.name for i in session.get_inputs()}
    got = session.run(None, deploy_onnx.onnx_feed(*inputs, names))[0]
    assert np.abs(got - reference).max() <= deploy_onnx.FP32_TOLERANCE


def test_default_threshold_keeps_weights_inline_and_drops_stale_data(tiny_unet, tmp_path):
    """Below the threshold: one self-contained graph; a weights file left by an earlier external
    export into the same folder is removed (it would no longer belong to the graph)."""
    source = tmp_path / "unet"
    _saved_unet(tiny_unet, source)
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(source), "--out", str(out), "--external-data-threshold", "0"]) == 0
    assert (out / "unet.onnx.data").is_file()
    assert main(["export-onnx", str(source), "--out", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["external_data"] is None
    assert not (out / "unet.onnx.data").exists()


def test_threshold_out_of_range_is_one_line_error(tiny_unet, tmp_path, capsys):
    source = tmp_path / "unet"
    _saved_unet(tiny_unet, source)
    code = main(["export-onnx", str(source), "--out", str(tmp_path / "o"), "--external-data-threshold", "-1"])
    assert code == 2
    assert "external" in capsys.readouterr().err
