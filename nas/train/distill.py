"""Knowledge distillation from a teacher U-Net, as BK-SDM does (Kim et al. 2023, "BK-SDM: A
Lightweight, Fast, and Cheap Version of Stable Diffusion"; github.com/Nota-NetsPresso/BK-SDM,
src/kd_train_text_to_image.py), `distill: {kind: bk_sdm}` (the default; kind: consistency is
nas/train/consistency.py):

    loss = task * L_task + output * L_out + feature * L_feat

L_task  the recipe's diffusion loss (nas/diffusion.py: Min-SNR-weighted MSE to the v / epsilon target).
L_out   output KD: the same weighted MSE with the teacher's prediction as the target. Both nets
        predict in the recipe's parameterization (v with the default recipe), so the two outputs are
        comparable as they are. BK-SDM's task and output terms share one (uniform) weighting; here
        they share the Min-SNR weights for the same reason: the ratio task:output then means the
        same at every timestep, and the teacher is not imitated hardest exactly where Min-SNR says
        the target is least informative (low noise).
L_feat  feature KD: MSE between the outputs of matched blocks (first tensor of a block's tuple),
        unweighted over timesteps as in BK-SDM (hidden features are not in the parameterization Min-SNR
        is derived for). BK-SDM SUMS the per-block MSEs; here it is their MEAN over matched pairs, so
        `feature` means the same whatever the number of pairs: in a search, candidates match
        different numbers of teacher blocks, and with a sum a student that matches fewer blocks would
        get a smaller feature term only for that. With all n pairs matched, BK-SDM's 1.0 is n here.

Matching rule (blocks: down_blocks[i], mid_block, up_blocks[j]): a block's key is its path and its
resolution level, level i working at latent_size / 2**i. down_blocks[i] is level i; up_blocks[j] is
level (number of up blocks - 1 - j), since the up path runs lowest resolution first; mid_block is
"mid". A student block is paired with the teacher block of the same key. A pair is skipped when the
other net lacks the key (fewer levels, no mid block) or the two outputs differ in shape (a narrower
student level; a last level that does not downsample where the teacher's does). Shapes are read from
the first training batch and the pairs are reported once, then.

The teacher runs under torch.no_grad(), its weights cast to the training dtype (fp16 / bf16 under
mixed precision, as BK-SDM casts its teacher to `weight_dtype`), on the same noisy latents,
timesteps and text as the student, classifier-free-guidance-dropped captions included.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter

import torch

from nas.diffusion import loss_weights, per_sample_loss, training_target
from nas.space.distill import DistillConfig

# ---------------------------------------------------------------------------------------------
# Feature tap and the matching rule


def block_table(net: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """key -> (module name, module) for down_blocks[i] ("down.i"), mid_block ("mid") and
    up_blocks[j] ("up.<level>", level = len(up_blocks) - 1 - j). Works for the stock and Flex U-Nets."""
    table: dict[str, tuple[str, torch.nn.Module]] = {}
    for i, block in enumerate(getattr(net, "down_blocks", None) or []):
        table[f"down.{i}"] = (f"down_blocks.{i}", block)
    if getattr(net, "mid_block", None) is not None:
        mid: torch.nn.Module = net.mid_block  # type: ignore[assignment]
        table["mid"] = ("mid_block", mid)
    ups = list(getattr(net, "up_blocks", None) or [])
    for j, block in enumerate(ups):
        table[f"up.{len(ups) - 1 - j}"] = (f"up_blocks.{j}", block)
    return table


class FeatureTap:
    """Forward hooks recording each block's output (the first tensor of a tuple) while `active`."""

    def __init__(self, net: torch.nn.Module):
        self.table = block_table(net)
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = False  # off during validation and outside Distiller.loss: nothing kept
        self._handles = [
            module.register_forward_hook(self._hook(key)) for key, (_, module) in self.table.items()
        ]

    def _hook(self, key: str):
        def record(_module, _inputs, output):
            if self.active:
                self.outputs[key] = output[0] if isinstance(output, tuple | list) else output

        return record

    def name(self, key: str) -> str:
        return self.table[key][0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def match_blocks(
    student: dict[str, torch.Size], teacher: dict[str, torch.Size]
) -> tuple[list[str], list[tuple[str, str]]]:
    """(matched keys, [(key, why skipped)]) from the output shapes of each net's blocks by key."""
    matched, skipped = [], []
    for key in sorted(set(student) | set(teacher)):
        if key not in teacher:
            skipped.append((key, "teacher has no such block"))
        elif key not in student:
            skipped.append((key, "student has no such block"))
        elif tuple(student[key][1:]) != tuple(teacher[key][1:]):
            s, t = ("x".join(map(str, shape[1:])) for shape in (student[key], teacher[key]))
            skipped.append((key, f"shape {s} vs teacher {t}"))
        else:
            matched.append(key)
    return matched, skipped


@torch.no_grad()
def block_shapes(net: torch.nn.Module, sample: torch.Tensor, timesteps, text: torch.Tensor) -> dict:
    """Output shape of every block of `net` on one input (used to show and test the matching)."""
    tap = FeatureTap(net)
    tap.active = True
    try:
        net(sample, timesteps, encoder_hidden_states=text)
    finally:
        tap.remove()
    return {key: value.shape for key, value in tap.outputs.items()}


# ---------------------------------------------------------------------------------------------
# The loss


class _Clock:
    """Seconds spent in the teacher. CUDA events on a GPU (no synchronisation inside the step; read at
    log time, after the loop's own sync), wall-clock time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.seconds = 0.0

    def start(self):
        if not self.cuda:
            return perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> None:
        if not self.cuda:
            self.seconds += perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((started, end))

    def take(self) -> float:
        for begin, end in self.pending:
            end.synchronize()
            self.seconds += begin.elapsed_time(end) / 1000  # ms -> s
        total, self.seconds, self.pending = self.seconds, 0.0, []
        return total


def frozen_teacher(teacher: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The teacher on `device`, in eval mode, without gradients, its weights cast to `dtype`."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    if not getattr(teacher, "_keep_in_fp32_modules", None):  # no U-Net here declares any
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even with none to keep
        torch.nn.Module.to(teacher, dtype=dtype)
    return teacher


class Distiller:
    """Per micro-batch: the student's and the teacher's forward, the three terms, their weighted sum.

    `student` is the unwrapped student (hooks go on its blocks; the prepared, possibly DDP-wrapped
    model is what `loss` calls). `dtype`: the training dtype the teacher's weights are cast to.
    `announce` gets the one-line matching report at the first batch.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        weights: DistillConfig,
        student: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        announce: Callable[[str], None] | None = None,
    ):
        self.teacher = frozen_teacher(teacher, device, dtype)
        self.dtype = next(self.teacher.parameters()).dtype  # its inputs are cast to it
        self.weights, self.announce = weights, announce
        use_features = weights.feature > 0
        self.student_tap = FeatureTap(student) if use_features else None
        self.teacher_tap = FeatureTap(self.teacher) if use_features else None
        self.pairs: list[str] | None = None  # matched keys, set at the first batch
        self.clock = _Clock(device)
        self._sums: dict[str, torch.Tensor] = {}
        self._micro = 0

    def loss(self, model, scheduler, batch: dict, gamma: float | None) -> torch.Tensor:
        """Weighted total (a scalar to backpropagate); each term is kept for `take_terms`."""
        latents, text, noise, t = batch["latents"], batch["text"], batch["noise"], batch["timesteps"]
        noisy = scheduler.add_noise(latents, noise, t)
        target = training_target(scheduler, latents, noise, t)
        w = loss_weights(scheduler, t, gamma)
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.outputs, tap.active = {}, True
        taught = None
        try:
            prediction = model(noisy, t, encoder_hidden_states=text).sample
            if self.weights.output > 0 or self.weights.feature > 0:  # else: inheritance only
                started = self.clock.start()
                with torch.no_grad():
                    taught = self.teacher(
                        noisy.to(self.dtype), t, encoder_hidden_states=text.to(self.dtype)
                    ).sample
                self.clock.stop(started)
        finally:
            for tap in (self.student_tap, self.teacher_tap):
                if tap is not None:
                    tap.active = False
        terms = {"task": per_sample_loss(prediction, target, w).mean()}
        if taught is not None:
            terms["kd_out"] = per_sample_loss(prediction, taught, w).mean()
        if self.student_tap is not None:
            terms["kd_feat"] = self._feature_loss(prediction)
        weights = {"task": self.weights.task, "kd_out": self.weights.output, "kd_feat": self.weights.feature}
        total = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0) + value.detach()
        self._micro += 1
        return total

    def _feature_loss(self, prediction: torch.Tensor) -> torch.Tensor:
        assert self.student_tap is not None and self.teacher_tap is not None
        mine, theirs = self.student_tap.outputs, self.teacher_tap.outputs
        if self.pairs is None:
            self.pairs, skipped = match_blocks(
                {k: v.shape for k, v in mine.items()}, {k: v.shape for k, v in theirs.items()}
            )
            if self.announce is not None:
                self.announce(self.report(skipped))
        losses = [(mine[k].float() - theirs[k].float()).pow(2).mean() for k in self.pairs]
        self.student_tap.outputs, self.teacher_tap.outputs = {}, {}  # free the teacher's activations
        if not losses:  # nothing matched: 0, still attached to the graph
            return prediction.float().sum() * 0
        return torch.stack(losses).mean()

    def report(self, skipped: list[tuple[str, str]]) -> str:
        assert self.pairs is not None and self.student_tap is not None and self.teacher_tap is not None
        s, t = self.student_tap, self.teacher_tap
        pairs = ", ".join(f"{s.name(k)}<->{t.name(k)}" for k in self.pairs) or "none (feature KD is 0)"

        def both(key: str) -> str:
            mine = f"student {s.name(key)}" if key in s.table else ""
            theirs = f"teacher {t.name(key)}" if key in t.table else ""
            return "<->".join(part for part in (mine, theirs) if part)

        skip = "; ".join(f"{both(k)} ({why})" for k, why in skipped) or "none"
        return f"distill: feature KD on {len(self.pairs)} block pairs: {pairs}; skipped: {skip}"

    def take_terms(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Mean of each term over the micro-batches since the last call (reduced over processes)."""
        out = {}
        for key, value in self._sums.items():
            mean = value / max(self._micro, 1)
            out[key] = float(reduce(mean) if reduce is not None else mean)
        self._sums, self._micro = {}, 0
        return out

    def take_teacher_seconds(self) -> float:
        """Seconds this process spent in teacher forwards since the last call."""
        return self.clock.take()

    def close(self) -> None:
        for tap in (self.student_tap, self.teacher_tap):
            if tap is not None:
                tap.remove()


def mixed_precision_dtype(precision: str) -> torch.dtype:
    """The dtype the teacher's weights are cast to under accelerate's mixed_precision setting."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def prepare_teacher(
    config: DistillConfig,
    student,
    student_arch,
    cache,
    *,
    resume: bool = False,
    quiet: bool = False,
    given=None,
    inherited: Callable | None = None,
) -> torch.nn.Module:
    """The teacher module: `given` ((module, Arch), e.g. built in memory) or loaded from
    `config.teacher`, checked against the latent cache; with init: inherit, its weights are then
    copied into `student` (not when resuming: the checkpoint brings the student's weights) and
    `inherited` (if given) receives the InheritReport."""
    from nas.train.data import check_compatible

    # The only lines that need nas.teacher.arch / nas.teacher.inherit: imported here, lazily, so
    # that runs without `distill:` (and importing this module) never depend on them.
    if given is None:
        from nas.teacher.arch import load_teacher

        given = load_teacher(config.teacher, what="teacher")
    teacher, teacher_arch = given
    model_config = dict(getattr(teacher, "config", None) or {})
    check_compatible(
        model_config, cache.manifest, f"teacher {config.teacher}", str(getattr(cache, "path", "cache"))
    )
    if config.init == "inherit" and not resume:
        from nas.teacher.inherit import inherit

        report = inherit(teacher, teacher_arch, student, student_arch, narrow="slice")
        if not quiet:
            print(f"distill: student initialised from the teacher: {report.summary()}", flush=True)
        if inherited is not None:
            inherited(report)
    return teacher
