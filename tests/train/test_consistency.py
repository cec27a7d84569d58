"""Consistency distillation (nas/train/consistency.py): the DDIM solver, the parameterizations, the
boundary scalings, training under both recipes, bit-exact resume, and the one-line refusals."""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from nas.core.errors import NasError
from nas.diffusion import Recipe, noise_scheduler, scheduler_config
from nas.space.distill import DistillConfig
from nas.train import TrainConfig, load_config, train
from nas.train.consistency import (
    CONSISTENCY_METRICS,
    Consistency,
    DDIMSolver,
    boundary_scalings,
    check_teacher_recipe,
    x0_and_eps,
)
from nas.train.metrics import METRICS

CD = {"teacher": "t", "kind": "consistency"}  # defaults: LCM's (50 solver steps, w in [5, 15], ...)
SD = {"schedule": "scaled_linear", "zero_terminal_snr": False, "prediction": "epsilon", "min_snr_gamma": None}
RECIPES = {"ours": Recipe(), "sd": Recipe(**SD)}


def col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# The solver, the parameterizations, the boundary scalings


def test_solver_grid_and_one_step_by_hand():
    alphas_cumprod = noise_scheduler(Recipe()).alphas_cumprod
    solver = DDIMSolver(alphas_cumprod, 50)
    assert solver.k == 20 and len(solver) == 50
    assert solver.timesteps[:3].tolist() == [19, 39, 59] and solver.timesteps[-1] == 999  # trailing: T-1
    index = torch.tensor([0, 10, 49])
    assert solver.start(index).tolist() == [19, 219, 999] and solver.end(index).tolist() == [0, 199, 979]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    stepped = solver.step(x0, eps, index)
    for i, end in enumerate([0, 199, 979]):
        a = float(alphas_cumprod[end])
        hand = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i]
        torch.testing.assert_close(stepped[i], hand, rtol=1e-6, atol=1e-6)
    with pytest.raises(NasError, match="must divide the 1000 training timesteps"):
        DDIMSolver(alphas_cumprod, 30)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_solver_step_equals_diffusers_ddim(recipe):
    """x0 and eps from the output per prediction type, then one step: DDIMScheduler.step (eta 0)."""
    from diffusers import DDIMScheduler

    r = RECIPES[recipe]
    ours, ddim = noise_scheduler(r), DDIMScheduler.from_config(scheduler_config(r))
    ddim.set_timesteps(50)
    solver = DDIMSolver(ours.alphas_cumprod, 50)
    g = torch.Generator().manual_seed(1)
    for n in (0, 17, 49):
        index = torch.tensor([n])
        t = int(solver.start(index))
        x, output = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        a = ours.alphas_cumprod[t]
        x0, eps = x0_and_eps(output, x, a.sqrt(), (1 - a).sqrt(), r.prediction)
        theirs = ddim.step(output, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(solver.step(x0, eps, index), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_x0_and_eps_invert_the_forward_process(recipe):
    """Exact x0 and eps back from the training target, at T-1 too (x0 = -v under zero SNR)."""
    scheduler = noise_scheduler(RECIPES[recipe])
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 980, 999])
    x = scheduler.add_noise(x0, eps, t)
    target = scheduler.get_velocity(x0, eps, t) if recipe == "ours" else eps
    a = scheduler.alphas_cumprod[t]
    got_x0, got_eps = x0_and_eps(
        target, x, col(a.sqrt(), x), col((1 - a).sqrt(), x), scheduler.config.prediction_type
    )
    tol = 1e-4 if recipe == "ours" else 2e-3  # epsilon divides by alpha(999) = 0.068
    torch.testing.assert_close(got_x0, x0, rtol=tol, atol=tol)
    torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)
    if recipe == "ours":
        assert float(a[-1]) == 0.0 and torch.equal(got_x0[-1], -target[-1])


def test_boundary_scalings():
    from diffusers import LCMScheduler

    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 19, 999]))
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f(x, 0) = x
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25) and c_out[1].item() == pytest.approx(
        10 / math.sqrt(100.25)
    )
    assert c_skip[3].item() == pytest.approx(0.25 / (9990**2 + 0.25)) and c_out[3].item() == pytest.approx(
        1.0, abs=1e-6
    )
    lcm = LCMScheduler()  # what an LCM sampler applies
    for t, s, o in zip([0, 1, 19, 999], c_skip.tolist(), c_out.tolist()):
        theirs = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert (s, o) == pytest.approx((float(theirs[0]), float(theirs[1])))


# ---------------------------------------------------------------------------------------------
# Training


def rows(run) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


TRAIN_CASES = {  # recipe, distill keys, student embedding width
    "v, zero SNR, guidance embedding, huber": ({}, {}, 16),
    "epsilon (SD), guidance baked in, l2": (
        SD,
        {"guidance_embedding": False, "w_min": 7.0, "w_max": 7.0, "loss": "l2"},
        None,
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_a_few_consistency_steps_train(case, tiny_unet, fake_cache, quick_config, tmp_path):
    diffusion, keys, dim = TRAIN_CASES[case]
    teacher = tiny_unet(seed=1)
    student = tiny_unet(seed=0, time_cond_proj_dim=dim)
    if dim is not None:
        student.time_embedding.cond_proj.weight.data.zero_()  # as inheritance starts it
    start = {k: v.clone() for k, v in student.state_dict().items()}
    config = quick_config(distill={**CD, **keys}, diffusion=diffusion, ema=None, max_steps=4, val_every=2)
    result = train(student, fake_cache, config, out=tmp_path / "run", quiet=True, teacher=teacher)
    logged = [r for r in rows(tmp_path / "run") if r["consistency"]]
    assert tuple(rows(tmp_path / "run")[0]) == METRICS + CONSISTENCY_METRICS
    assert len(logged) == 2 and all(
        math.isfinite(float(r["consistency"])) and float(r["consistency"]) > 0 for r in logged
    )
    assert all(float(r["loss"]) == pytest.approx(float(r["consistency"]), rel=1e-4) for r in logged)
    assert all(float(r["teacher_s"]) < float(r["step_s"]) for r in logged)
    assert math.isfinite(result.val_loss) and math.isfinite(result.val_loss_start)
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    if dim is not None:  # w reaches the student: its guidance embedding learnt
        assert student.time_embedding.cond_proj.weight.abs().sum() > 0
    target = load_file(tmp_path / "run" / "checkpoints" / "step_000004" / "target.safetensors")
    assert target.keys() == student.state_dict().keys()  # the EMA target lags the student
    assert any(not torch.equal(target[k], v) for k, v in student.state_dict().items())


def test_target_is_an_ema_of_the_student(tiny_unet, fake_cache):
    student, teacher = tiny_unet(seed=0, time_cond_proj_dim=16), tiny_unet(seed=1)
    scheduler = noise_scheduler(Recipe())
    c = Consistency(teacher, DistillConfig(**CD), scheduler, student, fake_cache.empty, torch.device("cpu"))
    before = {k: v.clone() for k, v in c.target.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    c.update_target(student)
    for k, v in c.target.state_dict().items():
        torch.testing.assert_close(v, before[k] + 0.05)  # 0.95 target + 0.05 (target + 1)
    assert not any(p.requires_grad for p in c.target.parameters())


def test_teacher_runs_in_the_training_dtype(tiny_unet, fake_cache):
    """Under bf16 autocast the teacher's weights are bf16, the target stays fp32, the loss float32."""
    student, teacher = tiny_unet(seed=0, time_cond_proj_dim=16), tiny_unet(seed=1)
    c = Consistency(teacher, DistillConfig(**CD), noise_scheduler(Recipe()), student, fake_cache.empty,
                    torch.device("cpu"), torch.bfloat16)  # fmt: skip
    batch = {"latents": fake_cache.mean[:4], "text": fake_cache.text[:4], "noise": torch.randn(4, 4, 8, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = c.loss(student, batch, step=0, micro=0)
    loss.backward()
    assert (
        next(teacher.parameters()).dtype == torch.bfloat16
        and next(c.target.parameters()).dtype == torch.float32
    )
    assert (
        loss.dtype == torch.float32
        and math.isfinite(loss.item())
        and c.take_terms()["consistency"] == loss.item()
    )
    assert student.conv_in.weight.grad is not None and all(p.grad is None for p in c.target.parameters())
    assert c.take_teacher_seconds() > 0


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_unet, fake_cache, quick_config, tmp_path):
    config = quick_config(distill=CD, max_steps=4, val_every=2, checkpoint_every=2, batch_size=4,
                          val_items=8, val_timesteps=1, ema={"start": 0.25})  # fmt: skip
    full = train(tiny_unet(seed=0, time_cond_proj_dim=16), fake_cache, config, out=tmp_path / "full",
                 quiet=True, teacher=tiny_unet(seed=1))  # fmt: skip
    first = train(tiny_unet(seed=0, time_cond_proj_dim=16), fake_cache, config, out=tmp_path / "cut",
                  quiet=True, teacher=tiny_unet(seed=1), report=lambda step, loss: step == 2)  # fmt: skip
    assert first.stopped_early and first.step == 2
    # a differently initialised student: the checkpoint brings student, target, optimizer and RNG
    second = train(tiny_unet(seed=7, time_cond_proj_dim=16), fake_cache, config, out=tmp_path / "cut",
                   resume=True, quiet=True, teacher=tiny_unet(seed=1))  # fmt: skip
    assert second.step == 4 and second.val_loss == full.val_loss
    for name in ("model.safetensors", "target.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "full" / "checkpoints" / "step_000004" / name)
        b = load_file(tmp_path / "cut" / "checkpoints" / "step_000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["consistency"] for r in rows(tmp_path / "cut")] == [
        r["consistency"] for r in rows(tmp_path / "full")
    ]


# ---------------------------------------------------------------------------------------------
# Settings and refusals


def test_bk_sdm_sections_dump_as_before_and_consistency_round_trips():
    assert set(DistillConfig(teacher="t").model_dump()) == {"teacher", "init", "task", "output", "feature"}
    config = TrainConfig(distill={**CD, "w_max": 9.0})
    again = TrainConfig.model_validate(config.model_dump(mode="json"))
    assert (
        again == config
        and again.distill.kind == "consistency"
        and "task" not in config.model_dump()["distill"]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("distill: {teacher: t, kind: consistency, w_min: 9, w_max: 3}", "w_min 9.0 > w_max 3.0"),
        ("distill: {teacher: t, kind: consistency}\ndiffusion: {prediction: epsilon}",
         "distill.kind consistency with diffusion.prediction epsilon and zero_terminal_snr true"),
        ("distill: {teacher: t, kind: consistency, num_ddim_timesteps: 30}",
         "distill.num_ddim_timesteps 30 must divide diffusion.num_train_timesteps 1000"),
        ("distill: {teacher: t, kind: consistency, task: 1}", "task is a key of kind: bk_sdm, this section is kind: consistency"),
        ("distill: {teacher: t, w_min: 1}", "w_min is a key of kind: consistency, this section is kind: bk_sdm"),
        ("distill: {teacher: t, kind: lcm}", "distill.kind: Input should be 'bk_sdm' or 'consistency'"),
        ("distill: {teacher: t, kind: consistency, loss: l1}", "distill.loss: Input should be 'l2' or 'huber'"),
    ],
)  # fmt: skip
def test_config_refusals_are_one_line(write_yaml, text, message):
    path = write_yaml(text)
    with pytest.raises(NasError, match=re.escape(message)) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        ({"time_cond_proj_dim": 16}, {"cross_attention_dim": 16}, "text width (cross_attention_dim) 16 differ from the student's 32"),
        ({"time_cond_proj_dim": 16}, {"in_channels": 8, "out_channels": 8}, "latent channels 8 differ from the student's 4"),
        ({}, {}, "distill.guidance_embedding: the student has no guidance embedding"),
    ],
)  # fmt: skip
def test_train_refuses_a_mismatched_pair(student, teacher, message, tiny_unet, fake_cache, quick_config):
    with pytest.raises(NasError, match=re.escape(message)) as info:
        train(
            tiny_unet(**student),
            fake_cache,
            quick_config(distill=CD),
            quiet=True,
            teacher=tiny_unet(seed=1, **teacher),
        )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([], "distill.guidance_embedding: the student has no guidance embedding"),  # tiny_stock has none
        (["distill.w_min=20"], "w_min 20.0 > w_max 15.0"),
    ],
)
def test_cli_refusals_exit_2_before_anything_is_built(capsys, tmp_path, repo_root, sets, message):
    from nas.cli import main

    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    argv = ["train", "tiny", "--arch", str(arch), "--cache", str(tmp_path / "none"), "--set", "distill.kind=consistency",
            "--set", f"distill.teacher={tmp_path / 'teacher'}"] + [x for s in sets for x in ("--set", s)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas train: error: ") and message in err and "\n" not in err


def test_a_teacher_trained_with_another_recipe_is_refused(tiny_unet, tmp_path):
    run = tmp_path / "teacher"
    tiny_unet().save_pretrained(run / "final" / "unet", safe_serialization=True)
    (run / "config.yaml").write_text(
        "diffusion: {prediction: epsilon, schedule: scaled_linear, zero_terminal_snr: false}\n"
    )
    with pytest.raises(
        NasError,
        match=r"teacher was trained with diffusion\.prediction 'epsilon', this run has 'v_prediction'",
    ):
        check_teacher_recipe(run, Recipe())
    check_teacher_recipe(run, Recipe(prediction="epsilon", schedule="scaled_linear", zero_terminal_snr=False))
    (run / "config.yaml").write_text("diffusion: {}\n")  # the defaults: ours
    check_teacher_recipe(run, Recipe())
    with pytest.raises(NasError, match=r"diffusion\.zero_terminal_snr True, this run has False"):
        check_teacher_recipe(run, Recipe(zero_terminal_snr=False))
    pipeline = tmp_path / "pipeline"  # a diffusers pipeline folder: its scheduler config says it
    tiny_unet().save_pretrained(pipeline / "unet", safe_serialization=True)
    noise_scheduler(Recipe(**SD)).save_config(pipeline / "scheduler")
    with pytest.raises(
        NasError, match=r"scheduler_config\.json: the teacher was trained with diffusion\.prediction"
    ):
        check_teacher_recipe(pipeline, Recipe())
    check_teacher_recipe(pipeline, RECIPES["sd"])


# Settings of tests.fixtures.train.FakeCache (4x8x8 latents, 8 tokens of width 32).
CACHE_SETTINGS = {
    "latent_channels": 4,
    "latent_size": 8,
    "cross_attention_dim": 32,
    "text_len": 8,
    "norm_num_groups": 8,
}
STUDENTS = {  # classic LCM: the teacher's architecture plus a guidance embedding; or any inheritable one
    "teacher's own": [{"channels": 16, "resnets": 1, "attentions": 1, "up_attentions": 1, "head_dim": 8},
                      {"channels": 32, "resnets": 1, "head_dim": 8}],
    "narrower flex": [{"channels": 16, "resnets": 2, "attentions": 1, "up_attentions": 1, "head_dim": 8},
                      {"channels": 16, "resnets": 1, "head_dim": 8}],
}  # fmt: skip


@pytest.mark.parametrize("student", list(STUDENTS))
def test_train_arch_inherits_the_student_then_distils(
    student, fake_cache, quick_config, tmp_path, monkeypatch, capsys
):
    from nas.core.config import dump_yaml
    from nas.space import arch_from_dict, build_unet
    from nas.train import train_arch

    monkeypatch.setattr("nas.data.cache.open_cache", lambda path: fake_cache)
    teacher_arch = arch_from_dict(
        {"name": "teacher", "settings": CACHE_SETTINGS, "levels": STUDENTS["teacher's own"]}
    )
    settings = {**CACHE_SETTINGS, "time_cond_proj_dim": 16}
    student_arch = arch_from_dict({"name": "student", "settings": settings, "levels": STUDENTS[student]})
    dump_yaml(student_arch, tmp_path / "student.yaml")
    torch.manual_seed(3)
    teacher = build_unet(teacher_arch)
    config = quick_config(distill={**CD, "teacher": str(tmp_path / "t")}, max_steps=2, val_every=2, ema=None)
    result = train_arch(config, tmp_path / "student.yaml", "cache", out=tmp_path / "run", quiet=False,
                        teacher=(teacher, teacher_arch))  # fmt: skip
    assert result.step == 2 and math.isfinite(result.val_loss)
    line = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith("distill: student initialised")
    )
    if student == "teacher's own":  # all copied; the guidance embedding new, at zero
        assert re.search(r": \d+ copied \([\d.]+M\), 1 identity-init", line), line
    else:
        assert "sliced" in line, line
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_000002" / "target.safetensors")
    assert saved["time_embedding.cond_proj.weight"].shape == (16, 16)
