"""Checkpoints that survive (issue 29): a damaged newest checkpoint at --resume, a full disk while
writing one, Ctrl-C / SIGTERM during `nas train`. Each ends in the weights of an uninterrupted run.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from nas.train import TrainConfig, train
from nas.train.checkpoint import CheckpointNotWritten, check_checkpoint, list_checkpoints
from tests.fixtures.train import TINY_UNET, FakeCache, final_weights

CONFIG = dict(name="faults", max_steps=8, batch_size=8, lr=1e-3, warmup_steps=2, val_items=16,
              val_timesteps=1, val_every=4, log_every=1, checkpoint_every=2, keep_checkpoints=3)  # fmt: skip


def _unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run: its folder (checkpoints at 4, 6, 8 kept) and final weights."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(_unet(0), FakeCache(), TrainConfig(**CONFIG), out=run, quiet=True)
    return run, final_weights(run)


def test_keep_checkpoints_is_honoured(reference):
    run, _ = reference
    assert [step for step, _ in list_checkpoints(run)] == [4, 6, 8]  # keep_checkpoints=3 of 2,4,6,8
    assert all(check_checkpoint(path) is None for _, path in list_checkpoints(run))


def test_resume_falls_back_over_a_truncated_and_a_damaged_checkpoint(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    newest = run / "checkpoints" / "step_000008" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    damaged = run / "checkpoints" / "step_000006" / "optimizer.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the checksum tells
    damaged.write_bytes(bytes(data))
    assert "truncated" in check_checkpoint(newest.parent)
    assert "sha256" in check_checkpoint(damaged.parent)

    capsys.readouterr()
    train(_unet(1), FakeCache(), TrainConfig(**CONFIG), out=run, resume=True, quiet=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("nas train: resuming from step_000004: skipped step_000008.corrupt")
    assert "step_000006.corrupt (optimizer.pt does not match its sha256" in lines[0]
    assert (run / "checkpoints" / "step_000008.corrupt").is_dir()  # moved aside, not deleted
    assert [step for step, _ in list_checkpoints(run)] == [4, 6, 8]
    assert _equal(final_weights(run), reference[1])


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(reference, tmp_path, monkeypatch):
    import nas.train.checkpoint as checkpoint

    real_save = checkpoint.save_model

    def full_disk(model, filename, *args, **kwargs):
        if "step_000004" in str(filename):  # the second checkpoint's first write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(model, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointNotWritten) as caught:
        train(_unet(0), FakeCache(), TrainConfig(**CONFIG), out=run, quiet=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{run / 'checkpoints'}: could not write the checkpoint of step 4:")
    assert "No space left on device" in message and re.search(r"[\d.]+ [GM]iB free there", message)
    assert f"{run / 'checkpoints' / 'step_000002'} is intact" in message
    assert [step for step, _ in list_checkpoints(run)] == [2]
    assert check_checkpoint(run / "checkpoints" / "step_000002") is None
    assert not (run / "checkpoints" / "step_000004.tmp").exists()  # the partial write is removed

    monkeypatch.undo()  # space freed
    train(_unet(1), FakeCache(), TrainConfig(**CONFIG), out=run, resume=True, quiet=True)
    assert _equal(final_weights(run), reference[1])


def _steps(run) -> list[int]:
    try:
        with open(run / "metrics.csv") as handle:
            return [int(r["step"]) for r in csv.DictReader(handle)]
    except (FileNotFoundError, ValueError, KeyError):
        return []


@pytest.mark.slow  # ~60 s: three `nas train` processes side by side, then two resumes
def test_sigint_and_sigterm_checkpoint_the_step_and_resume_to_the_uninterrupted_weights(
    shapes_cache, tmp_path, repo_root
):
    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    base = [sys.executable, "-m", "nas", "train", "tiny", "--arch", str(arch), "--cache", str(shapes_cache),
            "--quiet", "--max-steps", "30"]  # fmt: skip
    sets = ["--set", "batch_size=8", "val_items=16", "val_timesteps=1", "val_every=15", "log_every=1",
            "ema.start=0.5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, by_int, by_term = tmp_path / "full", tmp_path / "sigint", tmp_path / "sigterm"

    def start(out, every: int) -> subprocess.Popen:
        return subprocess.Popen([*base, "--out", str(out), *sets, f"checkpoint_every={every}"], env=env,
                                cwd=repo_root, stderr=subprocess.PIPE, text=True)  # fmt: skip

    uninterrupted = start(full, 4)
    # No periodic checkpoint: the interrupt writes one. Every 4 steps: one younger than 60 s is kept.
    victims = {
        signal.SIGINT: (start(by_int, 1000), by_int, 3),
        signal.SIGTERM: (start(by_term, 4), by_term, 6),
    }
    stopped = {}
    for signum, (process, out, at) in victims.items():
        deadline = time.monotonic() + 600
        while max(_steps(out), default=0) < at:  # a state, not a fixed sleep
            assert process.poll() is None, "the run ended before the signal"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signum)
    for signum, (process, out, _) in victims.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 128 + signum, stderr
        line = stderr.strip().splitlines()[-1]
        match = re.fullmatch(
            r"nas train: interrupted at step (\d+); resume with --resume: nas train .* --resume", line
        )
        assert match, line
        stopped[signum] = int(match.group(1))
        assert max(_steps(out)) == stopped[signum]  # it finished the step it was in
    assert uninterrupted.wait(timeout=600) == 0

    # SIGINT: a checkpoint at the step it stopped after; SIGTERM: none newer than the fresh one.
    assert [s for s, _ in list_checkpoints(by_int)] == [stopped[signal.SIGINT]]
    assert list_checkpoints(by_term)[-1][0] == stopped[signal.SIGTERM] // 4 * 4
    for out, every in ((by_int, 1000), (by_term, 4)):
        command = [*base, "--out", str(out), "--resume", *sets, f"checkpoint_every={every}"]
        subprocess.run(command, env=env, cwd=repo_root, check=True, capture_output=True)
        assert _equal(final_weights(out), final_weights(full)), out.name
