"""`nas inspect` end to end: JSON figures, space reports, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from nas.cli import main
from tests.fixtures.space import ARCHS, SPACES


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_sd15_json(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(ARCHS / "sd15.yaml"), "--json")
    report = json.loads(out)
    assert code == 0
    assert report["params"] == 859_520_964
    assert report["macs"] == 401_636_720_640 and report["attention_macs"] == 63_026_135_040


def test_inspect_latency_json(capsys):
    code, out, _ = run_cli(
        capsys,
        "inspect",
        str(ARCHS / "tiny_flex.yaml"),
        "--json",
        "--latency",
        "--iters",
        "3",
        "--warmup",
        "1",
    )
    report = json.loads(out)
    assert code == 0 and report["device"] == "cpu"
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p90"]
    assert report["model_class"] == "FlexUNet2DConditionModel"


def test_inspect_table(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(ARCHS / "decidiffusion_v1.yaml"))
    assert code == 0 and "FlexUNet2DConditionModel" in out and "attention MACs" in out


def test_inspect_space(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(SPACES / "decidiffusion.yaml"), "--json")
    report = json.loads(out)
    assert code == 0 and report["size"] > 1_000_000
    lo, hi = report["params_range"]
    assert lo < 859_520_964 < hi  # SD 1.5 is inside the space
    code, out, _ = run_cli(capsys, "inspect", str(SPACES / "tiny.yaml"))
    assert code == 0 and "480 architectures" in out


BAD = [
    ("malformed", "settings: [1,\n", "malformed YAML"),
    ("unknown key", "name: x\nlevels: [{channels: 8, resnets: 1}]\ncolour: red\n", "colour: unknown key"),
    ("wrong type", "levels: [{channels: eight, resnets: 1}]\n", "levels.0.channels"),
    ("out of range", "levels: [{channels: 8, resnets: 1, attentions: -1}]\n", "levels.0.attentions"),
    (
        "inconsistent",
        "settings: {norm_num_groups: 32}\nlevels: [{channels: 48, resnets: 1}]\n",
        "norm_num_groups",
    ),
    ("space inconsistent", "name: s\ndepth: {min: 1, max: 2}\nlevels: []\n", "one entry per level"),
]


@pytest.mark.parametrize(("case", "text", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(capsys, write_yaml, case, text, needle):
    path = write_yaml(text)
    code, out, err = run_cli(capsys, "inspect", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(path) in err and needle in err, err


def test_missing_file_and_bad_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing.yaml"))
    assert code == 2 and "file not found" in err
    code, _, err = run_cli(capsys, "inspect", str(ARCHS / "tiny_stock.yaml"), "--batch", "0")
    assert code == 2 and "--batch: Input should be greater than or equal to 1 (got 0)" in err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("levels: [{channels: 8, resnets: 1, kernel: 3}]\n")
    proc = subprocess.run([sys.executable, "-m", "nas", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "levels.0.kernel: unknown key" in proc.stderr
