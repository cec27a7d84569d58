"""Weight inheritance: seed a student U-Net from a trained teacher, as BK-SDM does (Kim et al. 2023,
github.com/Nota-NetsPresso/BK-SDM: every student layer copies its teacher counterpart).

Which teacher layer seeds which student layer: nas/teacher/plan.py (`plan`, `keep_down`,
`keep_up`). Here the weights move, tensor by tensor, each recorded in an `InheritReport`:

- copied: same shape, copied exactly;
- sliced (`narrow="slice"`): a narrower student keeps, in every dimension that is a channel group
  (a level's residual stream, a ResNet's hidden channels, a transformer's inner width, its
  feed-forward width, the time embedding), the channels of largest importance. Importance of a
  channel = the L1 norm of the teacher filters writing it (output rows of every inherited teacher
  tensor whose output is that group), summed; ties go to the lower index; the kept channels stay in
  their order. A group has one choice for the whole network, so a level's channels agree through
  its ResNets, transformers, skips and resamplers. Narrow heads regroup (the kept inner channels are
  split into the student's heads). A group no filter writes (the sinusoidal timestep features)
  keeps its first channels.
- new (`narrow="fresh"`, or a layer the teacher lacks): the student's own random initialisation;
- identity-init: a guidance embedding the teacher lacks (`time_embedding.cond_proj`, zeroed: the
  student computes the teacher's function at every guidance weight), or a layer the teacher lacks,
  with its residual branch's last projection zeroed
  (ResnetBlock2D.conv2; Transformer2DModel.proj_out; in a new transformer layer inside an inherited
  transformer attn1/attn2 to_out and ff.net.2), so it passes its input through and the student
  starts as the teacher's function where its layout allows. A new up-path ResNet also gets the
  1x1 shortcut [I, 0]: it passes the tensor from below and ignores its skip (a duplicate of the
  skip before it, made by a new identity down ResNet).

Across layouts (`attention_layout`, `mid.resolution`: DeciDiffusion's against SD's) the copies are an
initialisation, not the teacher's function; the report's notes name every block where that happens.

Tensors of different shapes are never copied silently: they are sliced by the rule above or left
new (and reported), and a student wider than its teacher is a NasError under `slice`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from nas.core.errors import NasError
from nas.space.schema import Arch
from nas.teacher.plan import Plan, Unit, keep_down, keep_up, layout, plan

__all__ = ["InheritReport", "inherit", "keep_down", "keep_up", "layout", "plan", "tensor_plan"]

STATUSES = ("copied", "sliced", "new", "identity-init")
NARROW = ("slice", "fresh")


# ---- channel groups of each tensor ---------------------------------------------------------------


def _sizes(arch: Arch) -> dict[str, int]:
    s, c0 = arch.settings, arch.levels[0].channels
    sizes = {f"level{i}": lv.channels for i, lv in enumerate(arch.levels)}
    # SD: the time embedding is 4 x the first level's channels; its sinusoid has c0 features
    sizes.update(temb=4 * c0, tproj=c0, text=s.cross_attention_dim, latent=s.latent_channels)
    if s.time_cond_proj_dim is not None:  # the guidance embedding's input width
        sizes["gcond"] = s.time_cond_proj_dim
    return sizes


# The guidance embedding's projection (settings.time_cond_proj_dim; diffusers' TimestepEmbedding
# cond_proj). One the teacher lacks, or of another input width, starts at zero (identity-init): the
# student then computes the teacher's function whatever guidance weight it is given.
COND_PROJ = "time_embedding.cond_proj.weight"

STEM_PARTS = {
    "conv_in.weight": [["level0"], ["latent"]],
    "conv_in.bias": [["level0"]],
    "time_embedding.linear_1.weight": [["temb"], ["tproj"]],
    "time_embedding.linear_1.bias": [["temb"]],
    "time_embedding.linear_2.weight": [["temb"], ["temb"]],
    "time_embedding.linear_2.bias": [["temb"]],
    COND_PROJ: [["tproj"], ["gcond"]],  # guidance embedding -> the sinusoid's features (no bias)
    "conv_norm_out.weight": [["level0"]],
    "conv_norm_out.bias": [["level0"]],
    "conv_out.weight": [["latent"], ["level0"]],
    "conv_out.bias": [["latent"]],
}


def parts(unit: Unit, name: str, teacher_side: bool) -> list[list[str]]:
    """Channel groups along dims 0 and 1 of parameter `name` (full name) of `unit`'s module on one
    side; a dim concatenating several groups lists them in order."""
    prefix = unit.teacher if teacher_side else unit.student
    assert prefix is not None
    if unit.kind == "stem":
        return STEM_PARTS[name]
    if unit.kind == "attention":  # its blocks may come from other teacher transformers than its own
        owner = re.match(r"(.+?\.attentions\.\d+)\.", name)
        assert owner is not None, name
        prefix = owner.group(1)
    local = name[len(prefix) + 1 :]
    s, h, inner = unit.stream_of(teacher_side), f"{prefix}.hidden", f"{prefix}.inner"
    if unit.kind == "resampler":
        return [[s], [s]] if local.endswith("weight") else [[s]]
    if unit.kind == "resnet":
        inputs = list(unit.teacher_inputs if teacher_side else unit.inputs)
        table = {
            "norm1": [inputs], "conv1": [[h], inputs], "time_emb_proj": [[h], ["temb"]], "norm2": [[h]],
            "conv2": [[s], [h]], "conv_shortcut": [[s], inputs],
        }  # fmt: skip
    else:
        block = re.match(r"transformer_blocks\.(\d+)\.", local)
        ff = f"{prefix}.{block.group(0)}ff" if block else ""
        local = local[block.end() :] if block else local
        table = {
            "norm": [[s]], "proj_in": [[inner], [s]], "proj_out": [[s], [inner]],
            "norm1": [[inner]], "norm2": [[inner]], "norm3": [[inner]],
            "attn1.to_q": [[inner], [inner]], "attn1.to_k": [[inner], [inner]], "attn1.to_v": [[inner], [inner]],
            "attn2.to_q": [[inner], [inner]], "attn2.to_k": [[inner], ["text"]], "attn2.to_v": [[inner], ["text"]],
            "attn1.to_out.0": [[inner], [inner]], "attn2.to_out.0": [[inner], [inner]],
            "ff.net.0.proj": [[ff, ff], [inner]],  # GEGLU: value and gate halves
            "ff.net.2": [[inner], [ff]],
        }  # fmt: skip
    module, _, kind = local.rpartition(".")
    if module not in table:
        raise NasError(f"{name}: no channel rule for this tensor; use --narrow fresh")
    groups = table[module]
    return groups if kind == "weight" else groups[:1]


def _part_sizes(groups: list[str], dim: int, sizes: dict[str, int], name: str) -> list[int]:
    """Sizes of the groups along a dim of `dim` channels (groups without a known size split the rest)."""
    known = [sizes.get(g) for g in groups]
    unknown = known.count(None)
    rest = dim - sum(k for k in known if k is not None)
    if (unknown and rest % unknown) or (not unknown and rest):
        raise NasError(f"{name}: {dim} channels do not split into {groups}")
    return [k if k is not None else rest // unknown for k in known]


# ---- the per-tensor plan -------------------------------------------------------------------------


@dataclass
class TensorStep:
    student: str
    teacher: str | None
    status: str  # one of STATUSES
    numel: int
    unit: Unit = field(repr=False)


def tensor_plan(
    the_plan: Plan, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size], narrow: str
) -> list[TensorStep]:
    """One step per student tensor (shapes only: works on meta models); NasError if one cannot be seeded."""
    if narrow not in NARROW:
        raise NasError(f"--narrow {narrow!r}: allowed {', '.join(NARROW)}")
    steps = []
    for name, shape in student_shapes.items():
        unit, source = the_plan.source(name)
        numel = int(torch.Size(shape).numel())
        if source is None:
            status = "identity-init" if _zeroed(unit, name) else "new"
        elif name == COND_PROJ and (source not in teacher_shapes or teacher_shapes[source][1:] != shape[1:]):
            source, status = None, "identity-init"  # a new guidance embedding: zero (see COND_PROJ)
        elif source not in teacher_shapes and ".conv_shortcut." in name and unit.kind == "resnet":
            # the teacher's ResNet keeps its channel count (identity skip, no 1x1 conv) where the
            # student's changes it (a level narrower than the next): a new projection
            source, status = None, "new"
        elif source not in teacher_shapes:
            raise NasError(f"{name}: its teacher tensor {source} does not exist (teacher and arch disagree)")
        elif teacher_shapes[source] == shape:
            status = "copied"
        elif narrow == "fresh":
            status = "new"
        else:
            status = "sliced"
            if len(teacher_shapes[source]) != len(shape) or teacher_shapes[source][2:] != shape[2:]:
                raise NasError(f"{name}: teacher {tuple(teacher_shapes[source])} vs student {tuple(shape)}")
        steps.append(TensorStep(name, source, status, numel, unit))
    return steps


# the residual branches' last projections of a transformer layer (self-attention, cross-attention, MLP)
NEW_BLOCK_ZEROED = re.compile(r"transformer_blocks\.\d+\.(attn1\.to_out\.0|attn2\.to_out\.0|ff\.net\.2)\.\w+")


def _zeroed(unit: Unit, name: str) -> bool:
    """Is `name` a tensor an identity init sets (the last projection of a new residual branch)?"""
    local = name[len(unit.student) + 1 :]
    if unit.teacher is None:
        return local.split(".")[0] in {"conv2", "conv_shortcut", "proj_out"}
    return NEW_BLOCK_ZEROED.fullmatch(local) is not None


# ---- executing it --------------------------------------------------------------------------------


class _Slicer:
    """Importance per channel group (from the inherited teacher tensors) and the kept indices."""

    def __init__(self, steps: list[TensorStep], teacher_sd: dict, t_sizes: dict, s_sizes: dict):
        self.t_sizes, self.s_sizes = t_sizes, s_sizes
        self.importance: dict[str, torch.Tensor] = {}
        self.kept: dict[tuple[str, int, int], torch.Tensor] = {}
        seen = set()
        for step in steps:
            if step.teacher is None or step.teacher in seen:
                continue
            seen.add(step.teacher)
            tensor = teacher_sd[step.teacher]
            if tensor.ndim < 2:
                continue  # only filters (weights) count
            groups = parts(step.unit, step.teacher, teacher_side=True)[0]
            rows = tensor.detach().float().abs().flatten(1).sum(1)
            offset = 0
            for g, n in zip(groups, _part_sizes(groups, tensor.shape[0], t_sizes, step.teacher)):
                self.importance[g] = self.importance.get(g, torch.zeros(n)) + rows[offset : offset + n].cpu()
                offset += n

    def keep(self, group: str, total: int, n: int) -> torch.Tensor:
        key = (group, total, n)
        if key not in self.kept:
            score = self.importance.get(group, torch.zeros(total))
            order = torch.argsort(-score, stable=True)  # stable: ties keep the lower index
            self.kept[key] = order[:n].sort().values
        return self.kept[key]

    def index(self, step: TensorStep, dim: int, t_dim: int, s_dim: int) -> torch.Tensor:
        t_groups = parts(step.unit, step.teacher, teacher_side=True)[dim]  # type: ignore[arg-type]
        s_groups = parts(step.unit, step.student, teacher_side=False)[dim]
        t_sizes = _part_sizes(t_groups, t_dim, self.t_sizes, step.teacher)  # type: ignore[arg-type]
        s_sizes = _part_sizes(s_groups, s_dim, self.s_sizes, step.student)
        chunks, offset = [], 0
        for g, nt, ns in zip(t_groups, t_sizes, s_sizes, strict=True):
            if ns > nt:
                raise NasError(f"{step.student}: {ns} channels where the teacher has {nt}; a student wider "
                               "than its teacher cannot be sliced (use --narrow fresh)")  # fmt: skip
            chunks.append(offset + self.keep(g, nt, ns))
            offset += nt
        return torch.cat(chunks)


@dataclass
class InheritReport:
    """What happened to every student tensor."""

    steps: list[TensorStep]
    dropped: list[str]  # teacher modules the student takes nothing from
    notes: list[str]
    narrow: str

    def counts(self) -> dict[str, tuple[int, int]]:
        """status -> (tensors, parameters)."""
        out = {s: (0, 0) for s in STATUSES}
        for step in self.steps:
            t, p = out[step.status]
            out[step.status] = (t + 1, p + step.numel)
        return out

    def summary(self) -> str:
        counts = self.counts()
        total = sum(p for _, p in counts.values())
        body = ", ".join(f"{t} {s} ({p / 1e6:.2f}M)" for s, (t, p) in counts.items() if t)
        dropped = len(self.dropped)
        return (
            f"{len(self.steps)} tensors, {total / 1e6:.2f}M params: {body}; {dropped} teacher layers dropped"
        )

    def to_markdown(self, title: str = "Weight inheritance") -> str:
        lines = [f"# {title}", "", self.summary(), "", f"Narrower levels: `{self.narrow}`.", "",
                 "| status | tensors | parameters |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {s} | {t} | {p:,} |" for s, (t, p) in self.counts().items()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        if self.dropped:
            lines += ["", "## Teacher layers not inherited", ""] + [f"- `{d}`" for d in self.dropped]
        lines += ["", "## Student layers", "", "| student | teacher | " + " | ".join(STATUSES) + " |",
                  "|---|---|" + "---:|" * len(STATUSES)]  # fmt: skip
        by_unit: dict[str, dict[str, int]] = {}
        for step in self.steps:
            row = by_unit.setdefault(step.unit.student, {s: 0 for s in STATUSES})
            row[step.status] += 1
        units = {step.unit.student: step.unit for step in self.steps}
        for name, row in by_unit.items():
            teacher = units[name].teacher or "(new)"
            lines.append(f"| `{name}` | `{teacher}` | " + " | ".join(str(row[s]) for s in STATUSES) + " |")
        return "\n".join(lines) + "\n"


@torch.no_grad()
def inherit(
    teacher: nn.Module,
    teacher_arch: Arch,
    student: nn.Module,
    student_arch: Arch,
    narrow: Literal["slice", "fresh"] = "slice",
) -> InheritReport:
    """Copy the teacher's weights into `student` in place (see the module doc); the report says how."""
    the_plan = plan(teacher_arch, student_arch)
    teacher_sd = teacher.state_dict()
    student_sd = student.state_dict()
    steps = tensor_plan(
        the_plan,
        {k: v.shape for k, v in student_sd.items()},
        {k: v.shape for k, v in teacher_sd.items()},
        narrow,
    )
    slicer = None
    if any(s.status == "sliced" for s in steps):
        slicer = _Slicer(steps, teacher_sd, _sizes(teacher_arch), _sizes(student_arch))
    notes = list(the_plan.notes)
    s_sizes = _sizes(student_arch)
    for step in steps:
        target = student_sd[step.student]
        if step.status == "copied":
            target.copy_(teacher_sd[str(step.teacher)])
        elif step.status == "sliced":
            value = teacher_sd[str(step.teacher)]
            for dim in range(min(2, value.ndim)):
                if value.shape[dim] != target.shape[dim]:
                    idx = slicer.index(step, dim, value.shape[dim], target.shape[dim])  # type: ignore[union-attr]
                    value = value.index_select(dim, idx.to(value.device))
            target.copy_(value)
        elif step.status == "identity-init":
            target.zero_()
            if step.student.endswith("conv_shortcut.weight"):
                _pass_first_part(step, target, s_sizes, notes)
    for i, (t, s) in enumerate(zip(teacher_arch.levels, student_arch.levels)):
        if (t.attentions or t.up_attentions) and t.channels == s.channels and t.num_heads() != s.num_heads():
            notes.append(f"levels.{i}: {s.num_heads()} heads where the teacher has {t.num_heads()}; "
                         "attention weights copied, heads regrouped")  # fmt: skip
    return InheritReport(steps, the_plan.dropped, notes, narrow)


def _pass_first_part(step: TensorStep, weight: torch.Tensor, sizes: dict[str, int], notes: list[str]) -> None:
    """A new up-path ResNet's 1x1 shortcut as [I, 0]: output = the tensor from below, skip ignored."""
    hidden = sizes[step.unit.inputs[0]]
    if hidden != weight.shape[0]:
        notes.append(f"{step.unit.student}: its input has {hidden} channels, its output {weight.shape[0]}; "
                     "not an identity (shortcut left zero)")  # fmt: skip
        return
    weight[:, :hidden].copy_(torch.eye(hidden, dtype=weight.dtype).reshape(hidden, hidden, *weight.shape[2:]))
