"""Knowledge distillation (nas/train/distill.py): block matching, loss terms, the frozen teacher,
the wiring into train / train_arch (resume, inheritance) and config errors."""

from __future__ import annotations

import copy
import csv
import re
import sys
import types

import pytest
import torch

from nas.core.errors import NasError
from nas.space import arch_from_dict, build_unet
from nas.train import load_config, train, train_arch
from nas.train.distill import DistillConfig, Distiller, FeatureTap, block_shapes, match_blocks
from nas.train.metrics import DISTILL_METRICS, METRICS

# Settings of tests.fixtures.train.FakeCache (4x8x8 latents, 8 tokens of width 32).
SETTINGS = {
    "latent_channels": 4,
    "latent_size": 8,
    "cross_attention_dim": 32,
    "text_len": 8,
    "norm_num_groups": 8,
}


def arch(*channels: int, mid: bool = True, name: str = "a"):
    levels = [
        {"channels": c, "resnets": 1, "attentions": 1 if i == 0 else 0, "up_attentions": 1 if i == 0 else 0,
         "head_dim": 8}
        for i, c in enumerate(channels)
    ]  # fmt: skip
    data = {"name": name, "settings": SETTINGS, "levels": levels}
    data["mid"] = {"resnets": 2, "attentions": 1} if mid else None
    return arch_from_dict(data)


def shapes(a, flex: bool = False):
    torch.manual_seed(0)
    net = build_unet(a, force_flex=flex)
    return block_shapes(net, torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 8, 32))


# student, teacher, matched keys (the rest skipped)
MATCHING = {
    "same layout": (arch(16, 32), arch(16, 32), ["down.0", "down.1", "mid", "up.0", "up.1"]),
    # the student's last level does not downsample where the teacher's does: down.1, mid differ
    "fewer levels": (arch(16, 32), arch(16, 32, 32), ["down.0", "up.0", "up.1"]),
    "no mid block": (arch(16, 32, mid=False), arch(16, 32), ["down.0", "down.1", "up.0", "up.1"]),
    "narrower level": (arch(16, 16), arch(16, 32), ["down.0", "up.0"]),
    # FlexUNet2DConditionModel: same block names; its mid block returns a tuple (first tensor taken)
    "flex student": ((arch(16, 32), True), arch(16, 32), ["down.0", "down.1", "mid", "up.0", "up.1"]),
}


@pytest.mark.parametrize("case", list(MATCHING))
def test_matching_rule(case):
    student, teacher, expected = MATCHING[case]
    s, t = shapes(*student) if isinstance(student, tuple) else shapes(student), shapes(teacher)
    matched, skipped = match_blocks(s, t)
    assert matched == expected
    assert sorted(matched + [key for key, _ in skipped]) == sorted(set(s) | set(t))


def test_up_blocks_are_keyed_by_resolution_level():
    tap = FeatureTap(build_unet(arch(16, 32, 32)))
    assert {k: tap.name(k) for k in ("up.0", "up.2", "down.2")} == {
        "up.0": "up_blocks.2",
        "up.2": "up_blocks.0",
        "down.2": "down_blocks.2",
    }
    tap.remove()


def batch(fake_cache, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": fake_cache.mean[:n].clone(),
        "text": fake_cache.text[:n].clone(),
        "noise": torch.randn(n, 4, 8, 8, generator=g),
        "timesteps": torch.randint(0, 1000, (n,), generator=g),
    }


def scheduler():
    from nas.diffusion import Recipe, noise_scheduler

    return noise_scheduler(Recipe())


def test_student_equal_to_teacher_has_zero_kd_terms(tiny_unet, fake_cache):
    teacher = tiny_unet(seed=1)
    student = copy.deepcopy(teacher)
    lines = []
    distiller = Distiller(
        teacher, DistillConfig(teacher="t"), student, torch.device("cpu"), announce=lines.append
    )
    total = distiller.loss(student, scheduler(), batch(fake_cache), 5.0)
    terms = distiller.take_terms()
    assert terms["kd_out"] == 0.0 and terms["kd_feat"] == 0.0 and terms["task"] > 0
    assert total.item() == pytest.approx(terms["task"])
    assert len(distiller.pairs) == 5 and "5 block pairs" in lines[0] and "skipped: none" in lines[0]
    distiller.close()


def test_feature_weight_zero_sets_no_hooks(tiny_unet, fake_cache):
    teacher, student = tiny_unet(seed=1), tiny_unet(seed=0)
    distiller = Distiller(teacher, DistillConfig(teacher="t", feature=0), student, torch.device("cpu"))
    distiller.loss(student, scheduler(), batch(fake_cache), 5.0)
    assert set(distiller.take_terms()) == {"task", "kd_out"}
    assert not student.down_blocks[0]._forward_hooks


def test_teacher_runs_in_the_training_dtype(tiny_unet, fake_cache):
    """Under bf16 autocast the teacher's weights are bf16 (half the memory); the terms stay float32."""
    teacher, student = tiny_unet(seed=1), tiny_unet(seed=0)
    distiller = Distiller(teacher, DistillConfig(teacher="t"), student, torch.device("cpu"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = distiller.loss(student, scheduler(), batch(fake_cache), 5.0)
    total.backward()
    assert next(teacher.parameters()).dtype == torch.bfloat16 and total.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(v)) for v in distiller.take_terms().values())
    assert student.conv_in.weight.grad is not None and next(teacher.parameters()).grad is None
    distiller.close()


def test_no_teacher_forward_without_kd_weights(tiny_unet, fake_cache):
    teacher, student = tiny_unet(seed=1), tiny_unet(seed=0)
    config = DistillConfig(teacher="t", output=0, feature=0)  # init: inherit and the task loss only
    distiller = Distiller(teacher, config, student, torch.device("cpu"))
    distiller.loss(student, scheduler(), batch(fake_cache), 5.0)
    assert set(distiller.take_terms()) == {"task"} and distiller.take_teacher_seconds() == 0.0


def kd_out_on(teacher, student, fake_cache) -> float:
    distiller = Distiller(teacher, DistillConfig(teacher="t", feature=0), student, torch.device("cpu"))
    with torch.no_grad():
        distiller.loss(student, scheduler(), batch(fake_cache, n=16, seed=7), 5.0)
    distiller.close()
    return distiller.take_terms()["kd_out"]


def test_output_kd_alone_moves_the_student_to_the_teacher(tiny_unet, fake_cache, quick_config, tmp_path):
    teacher, student = tiny_unet(seed=1), tiny_unet(seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd_before = kd_out_on(teacher, student, fake_cache)
    weights = {"teacher": "t", "task": 0.0, "output": 1.0, "feature": 0.0}
    config = quick_config(distill=weights, val_every=8, checkpoint_every=8)
    train(student, fake_cache, config, out=tmp_path / "run", quiet=True, teacher=teacher)
    kd_after = kd_out_on(teacher, student, fake_cache)
    assert kd_after < 0.7 * kd_before  # seen: 0.086 -> 0.035
    # the teacher is frozen: no gradients, same weights, and no hooks left on either net
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.down_blocks[0]._forward_hooks and not student.up_blocks[0]._forward_hooks
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == METRICS + DISTILL_METRICS
    logged = [r for r in rows if r["kd_out"]]
    assert len(logged) == 4 and float(logged[-1]["kd_out"]) < float(logged[0]["kd_out"])
    assert all(float(r["teacher_s"]) < float(r["step_s"]) for r in logged)
    assert all(float(r["loss"]) == pytest.approx(float(r["kd_out"]), rel=1e-4) for r in logged)  # task: 0


def test_train_needs_the_teacher_with_distill(tiny_unet, fake_cache, quick_config):
    with pytest.raises(NasError, match="distill: pass a teacher module"):
        train(tiny_unet(), fake_cache, quick_config(distill={"teacher": "t"}), quiet=True)
    with pytest.raises(NasError, match="distill: pass a teacher module"):
        train(tiny_unet(), fake_cache, quick_config(), quiet=True, teacher=tiny_unet())


def test_train_arch_inherits_and_resumes(fake_cache, quick_config, tmp_path, monkeypatch):
    """init: inherit calls nas.teacher.inherit (faked here) on a fresh run only; resume keeps distill."""
    calls = []
    fake = types.ModuleType("nas.teacher.inherit")
    fake.inherit = lambda *args, **kwargs: calls.append(kwargs) or types.SimpleNamespace(summary=lambda: "ok")
    monkeypatch.setitem(sys.modules, "nas.teacher.inherit", fake)
    monkeypatch.setattr("nas.data.cache.open_cache", lambda path: fake_cache)
    student_arch, teacher_arch = arch(16, 32, name="student"), arch(16, 32, 32, name="teacher")
    (tmp_path / "s.yaml").write_text("")  # train_arch reads the arch from a file
    from nas.core.config import dump_yaml

    dump_yaml(student_arch, tmp_path / "s.yaml")
    teacher = build_unet(teacher_arch)
    run = tmp_path / "run"
    config = quick_config(
        distill={"teacher": str(tmp_path / "t")}, max_steps=4, grad_accum=2, batch_size=4, ema=None
    )
    train_arch(config, tmp_path / "s.yaml", "cache", out=run, quiet=True, teacher=(teacher, teacher_arch))
    assert calls == [{"narrow": "slice"}]
    config = quick_config(
        distill={"teacher": str(tmp_path / "t")}, max_steps=8, grad_accum=2, batch_size=4, ema=None
    )
    result = train_arch(config, tmp_path / "s.yaml", "cache", out=run, resume=True, quiet=True,
                        teacher=(teacher, teacher_arch))  # fmt: skip
    assert result.step == 8 and len(calls) == 1  # resumed: the checkpoint brings the weights
    changed = config.model_copy(update={"distill": DistillConfig(teacher=str(tmp_path / "t"), output=0.5)})
    with pytest.raises(NasError, match=r"config\.yaml: distill: the checkpoint was trained with"):
        train_arch(changed, tmp_path / "s.yaml", "cache", out=run, resume=True, quiet=True,
                   teacher=(teacher, teacher_arch))  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("distill: {teacher: t.yaml, weight: 1}", "distill.weight: unknown key (allowed: feature, guidance_embedding, huber_c, init, kind, loss, num_ddim_timesteps, output, target_decay, task, teacher, w_max, w_min)"),
        ("distill: {teacher: t.yaml, output: -1}", "distill.output: Input should be greater than or equal to 0"),
        ("distill: {teacher: t.yaml, task: 0, output: 0, feature: 0}", "all 0: nothing to train"),
        ("distill: {output: 1}", "distill.teacher: required key missing"),
        ("distill: {teacher: t.yaml, init: copy}", "distill.init: Input should be 'inherit' or 'scratch'"),
    ],
)  # fmt: skip
def test_config_errors(write_yaml, text, message):
    path = write_yaml(text)
    with pytest.raises(NasError, match=re.escape(message)) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_teacher_path_is_relative_to_the_config_file(write_yaml, tmp_path):
    config = load_config(str(write_yaml("distill: {teacher: teachers/big.yaml}")))
    assert config.distill.teacher == str((tmp_path / "teachers" / "big.yaml").resolve())
    assert (config.distill.task, config.distill.output, config.distill.feature, config.distill.init) == (
        1.0, 1.0, 1.0, "inherit",
    )  # fmt: skip
    with pytest.raises(NasError, match=re.escape("--set: distill.feature")):
        load_config(str(write_yaml("distill: {teacher: t}")), ["distill.feature=-2"])
