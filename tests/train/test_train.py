"""The trainer: config and presets, data order, checkpoints, resume, the run folder, short mode, errors."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from nas.core.config import read_yaml
from nas.core.errors import NasError
from nas.train import NonFiniteLoss, TrainConfig, load_config, proxy_train, train
from nas.train.checkpoint import (
    CheckpointNotWritten,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from nas.train.data import Batches, ValidationSet, check_compatible
from nas.train.loop import check_arch_cache, evaluate, make_accelerator
from tests.fixtures.train import FakeCache

# ---------------------------------------------------------------------------------------------
# Config and presets


def test_decidiffusion_preset_is_the_default_recipe():
    preset = load_config("decidiffusion").model_dump()
    default = TrainConfig().model_dump()
    assert {k: v for k, v in preset.items() if k != "name"} == {
        k: v for k, v in default.items() if k != "name"
    }
    recipe = TrainConfig().diffusion
    assert (recipe.schedule, recipe.zero_terminal_snr, recipe.prediction, recipe.min_snr_gamma) == (
        "squaredcos_cap_v2",
        True,
        "v_prediction",
        5.0,
    )
    assert TrainConfig().ema.start == 0.95


def test_sd15_and_tiny_presets():
    sd15 = load_config("sd15")
    assert sd15.diffusion.schedule == "scaled_linear" and sd15.diffusion.prediction == "epsilon"
    assert sd15.diffusion.min_snr_gamma is None and not sd15.diffusion.zero_terminal_snr
    assert sd15.ema.start == 0.0  # EMA throughout
    tiny = load_config("tiny")  # `preset: decidiffusion` plus overrides
    assert tiny.max_steps == 300 and tiny.diffusion == TrainConfig().diffusion


def test_overrides_and_flags(write_yaml):
    path = write_yaml("preset: sd15\nlr: 3.0e-4\nema: {decay: 0.999}\n")
    config = load_config(str(path), ["ema.start=0.5", "diffusion.min_snr_gamma=5", "lr=2e-4"], max_steps=7)
    assert config.lr == 2e-4  # '2e-4' is a string to YAML 1.1; the schema still reads it as a number
    assert (config.ema.start, config.ema.decay) == (0.5, 0.999)
    assert config.diffusion.min_snr_gamma == 5.0 and config.diffusion.prediction == "epsilon"
    assert config.max_steps == 7
    assert load_config("decidiffusion", ["ema=null"]).ema is None


def test_paths_in_a_config_file_are_relative_to_it(write_yaml, tmp_path):
    path = write_yaml("preset: tiny\narch: archs/a.yaml\ncache: /data/cache\n")
    config = load_config(str(path))
    assert config.arch == str(tmp_path / "archs" / "a.yaml") and config.cache == "/data/cache"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            "lr: 1.0e-4\nlearning_rate: 0.1\n",
            [],
            "file.yaml: learning_rate: unknown key (allowed: adam_beta1",
        ),
        ("batch_size: many\n", [], "file.yaml: batch_size: Input should be a valid integer"),
        ("diffusion: {prediction: x0}\n", [], "file.yaml: diffusion.prediction: Input should be"),
        ("preset: sd21\n", [], "preset: unknown preset 'sd21' (allowed: decidiffusion, sd15, tiny)"),
        ("name: ok\n", ["lr=fast"], "--set: lr: Input should be a valid number"),
        ("name: ok\n", ["ema.begin=0.5"], "--set: ema.begin: unknown key"),
        ("name: ok\n", ["max_steps"], "--set max_steps: expected KEY=VALUE"),
        ("name: ok\n", ["ema.start=1.5"], "--set: ema.start: Input should be less than 1"),
    ],
)
def test_config_errors_are_one_line(write_yaml, text, overrides, message):
    path = write_yaml(text)
    with pytest.raises(NasError) as info:
        load_config(str(path), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_name():
    with pytest.raises(NasError, match="unknown preset 'sd14' \\(allowed: decidiffusion, sd15, tiny"):
        load_config("sd14")


# ---------------------------------------------------------------------------------------------
# CLI: bad input is one line on stderr and exit code 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nonexistent"], "unknown preset 'nonexistent'"),
        (["tiny", "--set", "warmup=5"], "--set: warmup: unknown key"),
        (["tiny", "--set", "batch_size=1.5"], "--set: batch_size: Input should be a valid integer"),
        (["tiny", "--max-steps", "0"], "--max-steps: Input should be greater than or equal to 1 (got 0)"),
        (["tiny", "--cache", "c"], "no architecture: pass --arch"),
    ],
)
def test_cli_bad_input_exits_2(capsys, argv, message):
    from nas.cli import main

    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas train: error: ") and message in err and "\n" not in err


def test_cli_resume_without_checkpoint_exits_2(capsys, tmp_path, repo_root):
    from nas.cli import main

    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    argv = [
        "train",
        "tiny",
        "--arch",
        str(arch),
        "--cache",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--resume",
    ]
    assert main(argv) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_cli_dry_run_prints_resolved_config(capsys):
    from nas.cli import main

    assert main(["train", "sd15", "--set", "lr=5e-5", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    config = json.loads(printed)["resolved_config"]
    assert config["lr"] == 5e-05 and config["diffusion"]["schedule"] == "scaled_linear"


def test_cli_trains_on_the_shapes_cache(capsys, tmp_path, repo_root, shapes_cache):
    from diffusers import UNet2DConditionModel

    from nas.cli import main
    from nas.space import load_arch

    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    run = tmp_path / "run"
    argv = ["train", "tiny", "--arch", str(arch), "--cache", str(shapes_cache), "--out", str(run), "--quiet",
            "--max-steps", "4", "--set", "val_items=16", "val_every=2", "log_every=2", "checkpoint_every=2"]  # fmt: skip
    assert main(argv) == 0
    assert "trained 4 steps: validation loss" in capsys.readouterr().out
    assert read_yaml(run / "arch.yaml") == load_arch(arch).to_data()
    config = load_config(str(run / "config.yaml"))
    assert (config.cache, config.max_steps, config.val_items) == (str(shapes_cache), 4, 16)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert UNet2DConditionModel.from_pretrained(run / "final" / "unet").config.cross_attention_dim == 384
    assert (run / "final" / "unet_ema" / "config.json").is_file()


def test_cli_refuses_an_architecture_made_for_another_cache(capsys, write_yaml, repo_root, shapes_cache):
    from nas.cli import main

    text = (repo_root / "search_spaces" / "archs" / "tiny_stock.yaml").read_text()
    arch = write_yaml(text.replace("cross_attention_dim: 384", "cross_attention_dim: 768"), "wide.yaml")
    assert main(["train", "tiny", "--arch", str(arch), "--cache", str(shapes_cache), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "wide.yaml: text width (cross_attention_dim) 768 does not match the cache" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Architecture vs cache


def test_incompatible_cache_is_refused(tiny_unet, quick_config):
    from nas.space import load_arch

    wide = FakeCache(count=40, text_dim=48)
    with pytest.raises(NasError, match="text width \\(cross_attention_dim\\) 32 does not match"):
        train(tiny_unet(), wide, quick_config(val_items=8), quiet=True)
    arch = load_arch("search_spaces/archs/tiny_stock.yaml")
    manifest = {"latent_channels": 8, "latent_size": 8, "text_dim": 384}
    with pytest.raises(NasError, match=r"arch\.yaml: latent channels 4 does not match the cache c"):
        check_arch_cache(arch, manifest, "arch.yaml", "c")
    check_compatible(
        {"in_channels": 4}, {"latent_channels": 4, "text_dim": 7}, "a", "c"
    )  # no model key: fine


# ---------------------------------------------------------------------------------------------
# Data: stateless order, held-out validation, fixed triples


def test_batches_depend_only_on_step_and_cover_each_epoch(fake_cache, quick_config):
    config = quick_config(batch_size=10)
    a, b = Batches(fake_cache, config, 1000), Batches(fake_cache, config, 1000)
    for key in ("latents", "text", "noise", "timesteps"):
        assert torch.equal(a.get(5, 0)[key], b.get(5, 0)[key])  # fresh object, same step: same batch
    assert not torch.equal(a.get(5, 0)["latents"], a.get(6, 0)["latents"])
    train_count = len(fake_cache) - config.val_items
    epoch = [i for s in range(train_count // 10) for i in a.indices(s, 0)]
    assert sorted(epoch) == list(range(train_count))  # each training item once per epoch, none held out
    # Two processes split each global batch: together they see what one process with 2x batch sees.
    single = Batches(fake_cache, quick_config(batch_size=20), 1000)
    ranks = [Batches(fake_cache, config, 1000, rank=r, processes=2) for r in (0, 1)]
    assert ranks[0].indices(3, 0) + ranks[1].indices(3, 0) == single.indices(3, 0)


def test_worker_processes_prepare_the_same_batches(fake_cache, quick_config):
    from nas.train.data import batch_loader

    config = quick_config(grad_accum=2)
    batches = Batches(fake_cache, config, 1000)
    loaded = list(batch_loader(batches, 3, 5, workers=2, pin_memory=False))
    expected = [batches.get(step, micro) for step in (3, 4) for micro in (0, 1)]
    assert len(loaded) == 4
    for got, want in zip(loaded, expected):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_latents_are_drawn_from_the_moments(fake_cache, quick_config):
    batches = Batches(fake_cache, quick_config(), 1000)
    batch = batches.get(0, 0)
    means = fake_cache.mean[batches.indices(0, 0)]
    spread = (batch["latents"] - means).std().item()
    assert 0.03 < spread < 0.07  # the fake cache's std is 0.05: a draw, not the mean


def test_validation_triples_are_fixed(fake_cache, quick_config):
    a = ValidationSet.build(fake_cache, quick_config(seed=1), 1000)
    b = ValidationSet.build(fake_cache, quick_config(seed=2), 1000)  # training seed does not matter
    assert (
        torch.equal(a.noise, b.noise)
        and torch.equal(a.timesteps, b.timesteps)
        and torch.equal(a.owner, b.owner)
    )
    spread = (a.item_latents - fake_cache.mean[-16:]).std().item()  # held-out items, one fixed draw each
    assert 0.03 < spread < 0.07
    assert len(a) == 32 and a.timesteps.min() >= 0 and a.timesteps.max() == 984  # spread over [0, 1000)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _linear_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_checkpoint_round_trip_and_crash_mid_write(tmp_path, quick_config, monkeypatch):
    accelerator = make_accelerator(quick_config())
    model, optimizer, scheduler = _linear_setup()
    save_checkpoint(accelerator, tmp_path, 1, model, optimizer, scheduler, None, quick_config(), keep=2)
    saved_weight = model.weight.detach().clone()
    expected_random = torch.rand(3)

    # A failed write of step 2 leaves step 1 whole and removes its .tmp folder (a full disk:
    # tests/train/test_checkpoint_faults.py); a kill mid-write leaves one, never resumed from.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nas.train.checkpoint.save_file", crash)
    model.weight.data.add_(1.0)
    from diffusers.training_utils import EMAModel

    with pytest.raises(CheckpointNotWritten, match="could not write the checkpoint of step 2: disk full"):
        save_checkpoint(
            accelerator,
            tmp_path,
            2,
            model,
            optimizer,
            scheduler,
            EMAModel(model.parameters()),
            quick_config(),
            keep=2,
        )
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()
    (tmp_path / "checkpoints" / "step_000002.tmp").mkdir()  # as a kill mid-write leaves it
    (tmp_path / "checkpoints" / "step_000002.tmp" / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step_000001"

    fresh, fresh_opt, fresh_sched = _linear_setup(seed=1)
    step, ema = load_checkpoint(accelerator, latest_checkpoint(tmp_path), fresh, fresh_opt, fresh_sched, None)
    assert step == 1 and ema is None
    assert torch.equal(fresh.weight, saved_weight)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert fresh_sched.state_dict()["last_epoch"] == 1
    assert torch.equal(torch.rand(3), expected_random)  # RNG state restored

    for step in (2, 3, 4):  # the retry overwrites the .tmp; only the newest `keep` survive
        save_checkpoint(
            accelerator, tmp_path, step, model, optimizer, scheduler, None, quick_config(), keep=2
        )
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()


# ---------------------------------------------------------------------------------------------
# Training: run folder, resume equality, loss decrease, non-finite loss


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """8 uninterrupted steps of the tiny U-Net, EMA from step 2, checkpoints at 4 and 8."""
    from diffusers import UNet2DConditionModel

    from tests.fixtures.train import TINY_UNET

    out = tmp_path_factory.mktemp("runs") / "full"
    config = TrainConfig(
        name="quick",
        max_steps=8,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        val_items=16,
        val_timesteps=2,
        val_every=4,
        log_every=2,
        checkpoint_every=4,
        ema={"start": 0.25},
    )
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_UNET)
    result = train(model, FakeCache(), config, out=out, quiet=True)
    return SimpleNamespace(out=out, config=config, result=result, model=model)


def test_run_folder(full_run):
    from diffusers import UNet2DConditionModel

    out, result = full_run.out, full_run.result
    assert TrainConfig.model_validate(read_yaml(out / "config.yaml")) == full_run.config
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "diffusers", "accelerate", "device", "seed", "command"} <= set(env)
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "loss", "val_loss", "lr", "samples_per_s"]
    assert [r["step"] for r in rows] == ["0", "2", "4", "6", "8"]
    assert [bool(r["val_loss"]) for r in rows] == [True, False, True, False, True]  # step 0: untrained
    assert all(float(r["samples_per_s"]) > 0 for r in rows[1:])
    assert (out / "loss.png").stat().st_size > 1000
    assert [s for s, _ in list_checkpoints(out)] == [4, 8]
    assert (out / "checkpoints" / "step_000008" / "ema.safetensors").is_file()
    raw = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    ema = UNet2DConditionModel.from_pretrained(out / "final" / "unet_ema")
    for (name, p), q in zip(full_run.model.named_parameters(), raw.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(q, e) for q, e in zip(raw.parameters(), ema.parameters()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 8 and summary["val_loss"] == pytest.approx(result.val_loss)
    assert summary["val_loss_start"] == pytest.approx(result.val_loss_start) and result.val_loss_start > 0
    assert summary["diverged"] is False and summary["best_val_loss"] <= summary["val_loss"]
    assert result.val_loss_ema is not None and result.val_loss_ema != result.val_loss


def test_resume_ends_with_the_same_weights(full_run, tmp_path, tiny_unet):
    out = tmp_path / "resumed"
    # First session: stop after the checkpoint at step 4 (as if killed right after it).
    first = train(
        tiny_unet(seed=0),
        FakeCache(),
        full_run.config,
        out=out,
        quiet=True,
        report=lambda step, loss: step == 4,
    )
    assert first.stopped_early and first.step == 4
    assert (out / "checkpoints" / "step_000004" / "ema.safetensors").is_file()  # EMA began at step 2
    # Second session: a differently initialised model, restored from the checkpoint.
    second = train(tiny_unet(seed=123), FakeCache(), full_run.config, out=out, resume=True, quiet=True)
    assert second.step == 8
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(full_run.out / "checkpoints" / "step_000008" / name)
        b = load_file(out / "checkpoints" / "step_000008" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert second.val_loss == full_run.result.val_loss
    assert second.val_loss_start == pytest.approx(full_run.result.val_loss_start)  # kept from session 1
    with open(out / "metrics.csv") as handle:
        assert [r["step"] for r in csv.DictReader(handle)] == ["0", "2", "4", "6", "8"]  # no duplicated rows
    env = json.loads((out / "env.json").read_text())
    assert [r["from_step"] for r in env["resumes"]] == [4]


def test_fresh_run_refuses_a_folder_with_checkpoints(full_run, tiny_unet):
    with pytest.raises(NasError, match="holds checkpoints of an earlier run; pass --resume"):
        train(tiny_unet(), FakeCache(), full_run.config, out=full_run.out, quiet=True)
    with pytest.raises(NasError, match=r"lr: the checkpoint was trained with 0\.001"):
        train(
            tiny_unet(),
            FakeCache(),
            full_run.config.model_copy(update={"lr": 0.1}),
            out=full_run.out,
            resume=True,
            quiet=True,
        )


def test_validation_loss_falls(fake_cache, tiny_unet, quick_config):
    config = quick_config(
        max_steps=20,
        lr=2e-3,
        lr_schedule="constant_with_warmup",
        ema=None,
        val_every=20,
        diffusion={"prediction": "epsilon"},
    )
    model = tiny_unet()
    accelerator = make_accelerator(config)
    from nas.diffusion import noise_scheduler

    scheduler = noise_scheduler(config.diffusion)
    before = evaluate(model, scheduler, ValidationSet.build(fake_cache, config, 1000), accelerator, 16, 5.0)
    after = train(model, fake_cache, config, quiet=True).val_loss
    assert after < 0.8 * before, (before, after)


class PoisonedDenoiser(torch.nn.Module):
    """A small stand-in denoiser that turns its output (or its gradient) NaN from its
    `poison_at`-th training forward on."""

    def __init__(self, poison_at: int, what: str):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.text = torch.nn.Linear(32, 4)
        self.calls, self.poison_at, self.what = 0, poison_at, what

    def forward(self, x, t, encoder_hidden_states):
        self.calls += 1 if self.training else 0
        out = self.conv(x) + self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        if self.calls >= self.poison_at and self.training:
            if self.what == "output":
                out = out * float("nan")
            else:
                out.register_hook(lambda grad: grad * float("nan"))
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize(
    ("what", "message"), [("output", "training loss is nan"), ("grad", "gradient norm is nan")]
)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    fake_cache, quick_config, tmp_path, what, message
):
    config = quick_config(max_steps=6, checkpoint_every=2, val_every=2)
    with pytest.raises(NonFiniteLoss) as info:
        train(PoisonedDenoiser(poison_at=4, what=what), fake_cache, config, out=tmp_path, quiet=True)
    text = str(info.value)
    assert f"step 4: {message}" in text and "step_000002" in text and "\n" not in text
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    weights = load_file(tmp_path / "checkpoints" / "step_000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


class DivergingDenoiser(PoisonedDenoiser):
    """Learns for `poison_at` training forwards, then its output jumps far off target for good
    (training and validation alike), like the collapse of a too-large constant learning rate."""

    def forward(self, x, t, encoder_hidden_states):
        self.calls += 1 if self.training else 0
        out = self.conv(x) + self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        return SimpleNamespace(sample=out + 10.0 if self.calls >= self.poison_at else out)


def test_divergence_is_flagged_in_the_summary(fake_cache, quick_config, tmp_path, capsys):
    config = quick_config(max_steps=6, checkpoint_every=6, val_every=2)
    train(DivergingDenoiser(poison_at=5, what="none"), fake_cache, config, out=tmp_path, quiet=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"] and summary["best_val_step"] in (0, 2, 4)
    assert summary["val_loss"] > 2 * summary["best_val_loss"]
    assert "the training diverged; lower lr" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Short mode for the search


def test_proxy_train_reports_and_returns_the_final_loss(shapes_cache, quick_config, repo_root):
    reports = []
    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    loss = proxy_train(
        arch,
        str(shapes_cache),
        6,
        report=lambda s, v: reports.append((s, v)),
        every=2,
        config=quick_config(val_items=8),
    )
    assert [s for s, _ in reports] == [2, 4, 6]
    assert loss == reports[-1][1]


def test_proxy_train_stops_when_asked_and_propagates_pruning(shapes_cache, quick_config, repo_root):
    arch = repo_root / "search_spaces" / "archs" / "tiny_flex.yaml"
    reports = []
    loss = proxy_train(
        arch,
        str(shapes_cache),
        50,
        report=lambda s, v: reports.append(v) or True,
        every=1,
        config=quick_config(val_items=8),
    )
    assert reports == [loss]

    class Pruned(Exception):
        pass

    def prune(step, value):
        raise Pruned

    with pytest.raises(Pruned):
        proxy_train(arch, str(shapes_cache), 50, report=prune, every=1, config=quick_config(val_items=8))


# ---------------------------------------------------------------------------------------------
# The acceptance run: 300 CPU steps of `nas train tiny` on a shapes cache, SIGKILLed near step 150


def _final_weights(run) -> dict:
    out = {}
    for name in ("unet", "unet_ema"):
        out.update(
            {
                f"{name}/{k}": v
                for k, v in load_file(run / "final" / name / "diffusion_pytorch_model.safetensors").items()
            }
        )
    return out


@pytest.mark.slow
def test_sigkill_at_step_150_and_resume_equal_an_uninterrupted_300_step_run(
    narrow_shapes_cache, tmp_path, repo_root
):
    import os
    import signal
    import subprocess
    import sys
    import time

    cache = narrow_shapes_cache
    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    command = [
        sys.executable,
        "-m",
        "nas",
        "train",
        "tiny",
        "--arch",
        str(arch),
        "--cache",
        str(cache),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs side by side on 2 cores

    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen([*command, "--out", str(full)], env=env, cwd=repo_root)
    victim = subprocess.Popen([*command, "--out", str(killed)], env=env, cwd=repo_root)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:  # kill as soon as metrics.csv reaches step 150
        rows = _logged_steps(killed / "metrics.csv")
        if rows and max(rows) >= 150:
            break
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and 100 <= int(resumed_from.name.split("_")[1]) <= 150
    subprocess.run([*command, "--out", str(killed), "--resume"], env=env, cwd=repo_root, check=True)
    assert uninterrupted.wait() == 0

    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((full / "summary.json").read_text())
    assert json.loads((killed / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    # The stated amount (docs/training.md): measured 0.506 -> 0.244 (-52%); asserted: at least -40%.
    assert summary["val_loss"] < 0.6 * summary["val_loss_start"], summary


def _logged_steps(path) -> list[int]:
    try:
        with open(path) as handle:
            return [int(r["step"]) for r in csv.DictReader(handle)]
    except (FileNotFoundError, ValueError, KeyError):
        return []
