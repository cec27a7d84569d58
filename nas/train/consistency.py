"""Consistency distillation (`distill: {kind: consistency}`): a few-step student, one U-Net call per
step, as latent consistency models are made (Luo et al. 2023, "Latent Consistency Models"; diffusers'
examples/consistency_distillation/train_lcm_distill_sd_wds.py, whose recipe this follows).

Per sample of a micro-batch (the batch's latents, captions and noise; w and the solver index drawn
from a stream seeded by (seed, step, micro-step, process), so a resumed run draws the same):

    n ~ U{0..N-1}, t = k (n + 1) - 1, s = max(t - k, 0)    k = T / N (the skipping-step grid)
    w ~ U[w_min, w_max]
    x_t = alpha_t x0 + sigma_t eps                        the forward process at t
    f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)         the consistency function of a network
    x_s = DDIM(x_t -> s) with the teacher's guided x0 and eps:
          x0_g = x0_c + w (x0_c - x0_u), eps_g = eps_c + w (eps_c - eps_u)
          x_s = sqrt(alpha_bar_s) x0_g + sqrt(1 - alpha_bar_s) eps_g
    loss = d(f_student(x_t, t, w), f_target(x_s, s, w))  l2 or pseudo-Huber, the target net's output
                                                          without gradient

c = cond (the caption), u = uncond (the cache's empty caption, the one cfg_drop uses). The target
network starts as a copy of the student and follows it by EMA (`target_decay`) after every optimizer
step. Boundary scalings with timestep scaling S = 10 and sigma_data = 0.5 (LCMScheduler's values, so
fixed here: the sampler applies the same): c_skip = sigma_data^2 / ((S t)^2 + sigma_data^2),
c_out = S t / sqrt((S t)^2 + sigma_data^2); c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x.

x0_hat and eps from a network's output follow the recipe's prediction type, with alpha_t =
sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]) of the training scheduler
(nas/diffusion.py `noise_scheduler`, diffusers' DDPMScheduler):

    v_prediction:  x0 = alpha x - sigma v,    eps = alpha v + sigma x
    epsilon:       x0 = (x - sigma eps) / alpha,  eps = the output

What changes with the recipe. Ours (v-prediction, zero terminal SNR, trailing timesteps): at t = T-1
alpha_bar = 0, x_t is pure noise, and x0 = -v, eps = x: the grid's top point T-1 is where trailing
sampling starts, and it is trained. SD's (epsilon, scaled-linear betas, no zero SNR): alpha_bar(T-1)
= 0.0047, so x0 divides by alpha = 0.068 there (errors amplified ~15x, as in LCM). Epsilon with zero
terminal SNR is refused: x0 is undefined at T-1. The recipe's timestep_spacing does not enter: the
solver grid k i - 1 is LCMScheduler's (trailing coincides with it). Min-SNR weighting does not apply
(LCM's loss is unweighted). cfg_drop still replaces captions by the empty one (LCM trains with none:
set cfg_drop: 0 to follow it); such samples learn the unguided ODE of the empty caption.

Validation loss: the same loss on the fixed validation triples (nas/train/data.py), solver index
t // k from the triple's timestep, w the middle of [w_min, w_max].
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from nas.core.errors import NasError
from nas.models.guidance import guidance_embedding
from nas.space.distill import DistillConfig
from nas.train.data import generator
from nas.train.distill import _Clock, frozen_teacher

# LCMScheduler's sigma_data (diffusers: fixed in get_scalings_for_boundary_condition_discrete)
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler's default timestep_scaling (LCM --timestep_scaling_factor: 10)
# metrics.csv columns added with kind: consistency: the consistency loss (= `loss`), seconds per
# optimizer step and the part of them spent in teacher forwards
CONSISTENCY_METRICS = ("consistency", "step_s", "teacher_s")
_DRAWS = 3  # stream tag of the w and solver-index draws (nas/train/data.py's streams are 0..2)


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA, scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) at integer timesteps `t` (LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    scaled = scaling * t.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def x0_and_eps(
    output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str
):
    """(x0, eps) implied by a network's `output` at x_t (alpha, sigma broadcastable to x)."""
    if prediction == "v_prediction":
        return alpha * x - sigma * output, alpha * output + sigma * x
    if prediction == "epsilon":
        return (x - sigma * output) / alpha, output
    raise NasError(f"diffusion.prediction {prediction!r}: allowed epsilon, v_prediction")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class DDIMSolver:
    """The skipping-step DDIM solver over the training schedule: grid t_n = k (n + 1) - 1 for
    n = 0..N-1 (k = T / N; LCMScheduler's `original_inference_steps` grid), one step from t_n to
    max(t_n - k, 0) with given x0 and eps (deterministic DDIM, eta = 0)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        total = len(alphas_cumprod)
        if total % num_ddim_timesteps:
            raise NasError(
                f"distill.num_ddim_timesteps {num_ddim_timesteps} must divide the {total} training timesteps"
            )
        self.k = total // num_ddim_timesteps
        self.alphas_cumprod = alphas_cumprod.float()
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1, device=alphas_cumprod.device) * self.k - 1

    def __len__(self) -> int:
        return len(self.timesteps)

    def start(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps[index]

    def end(self, index: torch.Tensor) -> torch.Tensor:
        return (self.timesteps[index] - self.k).clamp(min=0)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x at the end timestep of `index`: sqrt(a) x0 + sqrt(1 - a) eps, a = alphas_cumprod[end]."""
        a = _per_sample(self.alphas_cumprod[self.end(index)], x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def check_pair(settings: DistillConfig, student: dict, teacher: dict, teacher_name: str) -> None:
    """The student (config dict) can be distilled from the teacher (config dict); NasError else."""
    for key, what in (
        ("in_channels", "latent channels"),
        ("cross_attention_dim", "text width (cross_attention_dim)"),
    ):
        have, want = teacher.get(key), student.get(key)
        if have is not None and want is not None and int(have) != int(want):
            raise NasError(f"distill.teacher {teacher_name}: {what} {have} differ from the student's {want}; "
                           "consistency distillation feeds both the same latents and captions")  # fmt: skip
    if settings.guidance_embedding and student.get("time_cond_proj_dim") is None:
        raise NasError("distill.guidance_embedding: the student has no guidance embedding (its architecture's "
                       "settings.time_cond_proj_dim); add time_cond_proj_dim: 256 (LCM) there, or set "
                       "guidance_embedding: false to bake one w in (w_min = w_max)")  # fmt: skip


# The recipe keys that decide alphas_cumprod and what a U-Net's output means.
RECIPE_KEYS = {  # TrainConfig.diffusion key -> diffusers scheduler config key
    "prediction": "prediction_type",
    "schedule": "beta_schedule",
    "zero_terminal_snr": "rescale_betas_zero_snr",
    "num_train_timesteps": "num_train_timesteps",
    "beta_start": "beta_start",
    "beta_end": "beta_end",
}


def check_teacher_recipe(path: str | Path, recipe) -> None:
    """A teacher whose folder says how it was trained (a run's config.yaml, a pipeline's
    scheduler/scheduler_config.json) must have this run's recipe: the solver reads its outputs with
    it (NasError naming the key). A bare U-Net folder says nothing; the recipe is then assumed."""
    import json

    from nas.core.config import read_yaml, validate
    from nas.diffusion import Recipe
    from nas.models.load import find_unet

    path = Path(path)
    if not path.exists():
        return  # a teacher given in memory (tests, a search's cached one) under a nominal path
    found = find_unet(path, "teacher")
    saved: dict = {}
    source = None
    if found.run is not None and (found.run / "config.yaml").is_file():
        source = found.run / "config.yaml"
        data = read_yaml(source) or {}
        trained = validate(Recipe, data.get("diffusion") or {}, f"{source}: diffusion")  # defaults filled
        saved = {key: getattr(trained, key) for key in RECIPE_KEYS}
    elif found.kind == "pipeline folder" and (path / "scheduler" / "scheduler_config.json").is_file():
        source = path / "scheduler" / "scheduler_config.json"
        data = json.loads(source.read_text())
        saved = {ours: data[theirs] for ours, theirs in RECIPE_KEYS.items() if theirs in data}
    for key, value in saved.items():
        if (
            key in ("beta_start", "beta_end")
            and (saved.get("schedule") or recipe.schedule) == "squaredcos_cap_v2"
        ):
            continue  # the cosine schedule ignores them
        if value != getattr(recipe, key):
            raise NasError(f"{source}: the teacher was trained with diffusion.{key} {value!r}, this run has "
                           f"{getattr(recipe, key)!r}; consistency distillation reads the teacher with this "
                           "run's recipe: set diffusion: to the teacher's")  # fmt: skip


class Consistency:
    """Per micro-batch: the student's consistency function, the teacher's guided DDIM step, the
    target's consistency function, the loss. Interface of nas.train.distill.Distiller for the loop
    (`take_terms`, `take_teacher_seconds`, `close`), plus `update_target` and `checkpointed`.

    `student` is the unwrapped student (the target is a copy of it: build this after inheritance,
    before a checkpoint is loaded); `empty_text` [T, D]: the unconditional caption.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        settings: DistillConfig,
        scheduler,
        student: torch.nn.Module,
        empty_text: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        rank: int = 0,
    ):
        student_config = dict(getattr(student, "config", None) or {})
        check_pair(settings, student_config, dict(getattr(teacher, "config", None) or {}), settings.teacher)
        self.settings, self.seed, self.rank, self.device = settings, seed, rank, device
        self.teacher = frozen_teacher(teacher, device, dtype)
        self.dtype = next(self.teacher.parameters()).dtype
        self.target = copy.deepcopy(student).to(device).eval().requires_grad_(False)  # fp32, like the student
        self.prediction = scheduler.config.prediction_type
        alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
        if self.prediction == "epsilon" and float(alphas_cumprod.min()) == 0:
            raise NasError("diffusion: epsilon prediction with zero terminal SNR: x0 is undefined where "
                           "alpha_bar = 0; use prediction v_prediction")  # fmt: skip
        self.alpha, self.sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        self.solver = DDIMSolver(alphas_cumprod, settings.num_ddim_timesteps)
        self.embed_dim = student_config.get("time_cond_proj_dim") if settings.guidance_embedding else None
        self.uncond = empty_text.to(device)
        self.clock = _Clock(device)
        self._sum: torch.Tensor | None = None
        self._micro = 0

    # ---- the pieces -----------------------------------------------------------------------------

    def draws(self, step: int, micro: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(solver index, w) of the n samples of one micro-batch: a pure function of the step."""
        g = generator(self.seed, step, micro, self.rank, _DRAWS)
        index = torch.randint(0, len(self.solver), (n,), generator=g)
        w = self.settings.w_min + (self.settings.w_max - self.settings.w_min) * torch.rand(n, generator=g)
        return index.to(self.device), w.to(self.device)

    def consistency_function(
        self, net, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, w: torch.Tensor
    ):
        """f(x, t) = c_skip x + c_out x0_hat of `net`, w through its guidance embedding if used."""
        extra = {}
        if self.embed_dim is not None:
            extra["timestep_cond"] = guidance_embedding(w, self.embed_dim).to(x.device)
        output = net(x, t, encoder_hidden_states=text, **extra).sample.float()
        x0, _ = x0_and_eps(
            output, x, _per_sample(self.alpha[t], x), _per_sample(self.sigma[t], x), self.prediction
        )
        c_skip, c_out = boundary_scalings(t)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * x0

    @torch.no_grad()
    def teacher_step(
        self, x: torch.Tensor, index: torch.Tensor, text: torch.Tensor, w: torch.Tensor, timed: bool = True
    ) -> torch.Tensor:
        """One guided DDIM step of the teacher from the start to the end timestep of `index`, its cond
        and uncond halves in one batch. `timed`: counted in the teacher's seconds (not validation)."""
        t = self.solver.start(index)
        both = torch.cat([text, self.uncond.expand_as(text)]).to(self.dtype)
        started = self.clock.start() if timed else None
        twice = x.repeat(2, 1, 1, 1)
        output = self.teacher(twice.to(self.dtype), t.repeat(2), encoder_hidden_states=both).sample
        if started is not None:
            self.clock.stop(started)
        alpha, sigma = (
            _per_sample(self.alpha[t].repeat(2), twice),
            _per_sample(self.sigma[t].repeat(2), twice),
        )
        x0, eps = x0_and_eps(output.float(), twice, alpha, sigma, self.prediction)
        (x0_c, x0_u), (eps_c, eps_u), g = x0.chunk(2), eps.chunk(2), _per_sample(w, x)
        return self.solver.step(x0_c + g * (x0_c - x0_u), eps_c + g * (eps_c - eps_u), index)

    def per_sample_loss(self, model, latents, text, noise, index, w, timed: bool = True) -> torch.Tensor:
        """The consistency loss of each sample (the module doc's formula)."""
        t = self.solver.start(index)
        x_t = _per_sample(self.alpha[t], latents) * latents + _per_sample(self.sigma[t], latents) * noise
        prediction = self.consistency_function(model, x_t, t, text, w)
        x_s = self.teacher_step(x_t, index, text, w, timed)
        with torch.no_grad():
            target = self.consistency_function(self.target, x_s, self.solver.end(index), text, w)
        diff = (prediction - target).flatten(1)
        if self.settings.loss == "l2":
            return diff.pow(2).mean(dim=1)
        c = self.settings.huber_c
        return (torch.sqrt(diff.pow(2) + c**2) - c).mean(dim=1)

    # ---- what the loop calls --------------------------------------------------------------------

    def loss(self, model, batch: dict, step: int, micro: int) -> torch.Tensor:
        """Mean consistency loss of one micro-batch (a scalar to backpropagate)."""
        latents = batch["latents"]
        index, w = self.draws(step, micro, len(latents))
        loss = self.per_sample_loss(model, latents, batch["text"], batch["noise"], index, w).mean()
        self._sum = loss.detach() if self._sum is None else self._sum + loss.detach()
        self._micro += 1
        return loss

    @torch.no_grad()
    def validation_losses(self, model, batch: dict) -> torch.Tensor:
        """Per-sample loss on fixed validation triples: index t // k, w mid-range (module doc)."""
        index = (batch["timesteps"] // self.solver.k).clamp(max=len(self.solver) - 1).to(self.device)
        w = torch.full(index.shape, (self.settings.w_min + self.settings.w_max) / 2, device=self.device)
        return self.per_sample_loss(
            model, batch["latents"], batch["text"], batch["noise"], index, w, timed=False
        )

    @torch.no_grad()
    def update_target(self, student: torch.nn.Module) -> None:
        """target <- decay * target + (1 - decay) * student (after each optimizer step)."""
        for mine, theirs in zip(self.target.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach(), 1 - self.settings.target_decay)

    def checkpointed(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds besides the student (nas/train/checkpoint.py `extra`)."""
        return {"target": self.target}

    def take_terms(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Mean consistency loss over the micro-batches since the last call (reduced over processes)."""
        if self._sum is None:
            return {}
        mean = self._sum / max(self._micro, 1)
        self._sum, self._micro = None, 0
        return {"consistency": float(reduce(mean) if reduce is not None else mean)}

    def take_teacher_seconds(self) -> float:
        return self.clock.take()

    def close(self) -> None:
        """Nothing to undo (no hooks); here for the loop's common interface."""
