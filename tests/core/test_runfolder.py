"""nas.core.runfolder: atomic writes keep the old file on failure and leave no temporary file; the one
environment record; a redone stage moved aside; results copied with relative paths."""

import json
import os

import pytest

from nas.core import runfolder
from nas.core.runfolder import RunFolder, atomic_path, environment, relative_paths, write_json


class Unserializable:
    pass


def test_failed_json_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    folder = RunFolder(tmp_path / "run").mkdir()
    folder.write_json("summary.json", {"step": 1})
    with pytest.raises(TypeError):
        folder.write_json("summary.json", {"step": Unserializable()})
    assert json.loads(folder.summary.read_text()) == {"step": 1}
    assert sorted(p.name for p in folder.path.iterdir()) == ["summary.json"]


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the ne")
        raise OSError("disk full")  # as a writer that fails part way through
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_write_replaces_whole_and_creates_the_folder(tmp_path):
    path = tmp_path / "a" / "b" / "eval.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2}, sort_keys=True, fsync=True)
    assert path.read_text() == '{\n  "x": 2\n}\n'
    assert os.listdir(path.parent) == ["eval.json"]


def test_environment_record_fields():
    env = environment(7, "cpu", processes=1)
    for key in ("python", "torch", "diffusers", "optuna", "platform", "cpu", "cpu_cores", "command", "time"):
        assert env[key], key
    assert env["seed"] == 7 and env["device"] == "cpu" and env["processes"] == 1
    assert "device_name" not in env  # only a CUDA device has a name worth recording


def test_environment_of_a_resumed_run_is_appended(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_environment({"seed": 0})
    folder.write_environment({"seed": 0}, resumed_from=4)
    record = json.loads(folder.environment.read_text())
    assert record["seed"] == 0 and [r["from_step"] for r in record["resumes"]] == [4]


def test_set_aside_moves_and_never_deletes(tmp_path):
    stage = RunFolder(tmp_path / "train")
    assert stage.set_aside() is None  # nothing there yet
    (stage.mkdir() / "metrics.csv").write_text("step\n1\n")
    first = stage.set_aside()
    (stage.mkdir() / "metrics.csv").write_text("step\n2\n")
    second = stage.set_aside()  # twice within a second: a distinct name
    assert not stage.path.exists() and first != second
    assert first.name.startswith("train.superseded-") and (first / "metrics.csv").read_text() == "step\n1\n"
    assert (second / "metrics.csv").read_text() == "step\n2\n"


def test_relative_paths(tmp_path):
    root = tmp_path / "results" / "exp"
    inside_repo = str(runfolder.REPO / "experiments" / "tiny.yaml")
    data = {
        "run": str(root / "train" / "run"),
        "nested": [{"evaluator": str(root / "data" / "evaluator")}],
        "repo": inside_repo,
        "elsewhere": "/opt/cache",
        "text": "a red circle",
        "steps": 3,
    }
    out = relative_paths(data, root)
    assert out == {
        "run": "train/run",
        "nested": [{"evaluator": "data/evaluator"}],
        "repo": "experiments/tiny.yaml",
        "elsewhere": "/opt/cache",  # outside the experiment and the repository: kept as given
        "text": "a red circle",
        "steps": 3,
    }


def test_staged_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "final"
    (tmp_path / ".final.killed.tmp").mkdir()  # left by a process killed mid-write
    with runfolder.staged_folder(out) as staging:
        (staging / "unet").mkdir()
    with pytest.raises(RuntimeError), runfolder.staged_folder(out) as staging:
        (staging / "half").mkdir()
        raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["unet"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
