"""Which teacher layer seeds each student layer: the selection rules, on architectures alone.

Levels are matched by resolution index (student level i <- teacher level i: both work at
latent_size / 2**i); a teacher level the student lacks, and a teacher mid block the student lacks,
are dropped. A student level the teacher lacks cannot be seeded (NasError).

Inside a block ResNets are chosen by position (`keep_down`, `keep_up`), each with the transformer
that follows it:

- down path and mid block, student k of teacher n ResNets: the first k (ResNet 0 is the one that
  changes the channel count, so it must stay first). A deeper student appends new layers after the
  teacher's, as identities: each adds a skip equal to the one before it.
- up path, k + 1 of n + 1: the first (it takes the tensor from the level below) and the last (it
  takes the skip from the level above), the teacher's middle ones in between in order; a deeper
  student puts its new layers right after the first, where they consume the duplicated skips of the
  new down layers. BK-SDM (Kim et al. 2023) is the case n = 2, k = 1: student `resnets.1` <- teacher
  `resnets.2`.
- transformer layers inside a transformer: the first k; new ones appended.

Every rule is written over per-block lists (`Block.depths`: transformer depth after each ResNet),
so layouts with other ResNet counts per block only change `layout()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nas.errors import NasError
from nas.space.build import spread
from nas.space.schema import Arch


def keep_down(n: int, k: int) -> list[int | None]:
    """Teacher index per student position (None: a new, identity-initialised layer)."""
    return list(range(min(n, k))) + [None] * max(0, k - n)


def keep_up(n: int, k: int) -> list[int | None]:
    """Up path: first and last kept (shapes of the skip connections), middles in order after the first."""
    if k == 1 or n == 1:  # one side has a single ResNet: it keeps the teacher's first
        return [0] + [None] * (k - 1)
    middle_t, middle_s = n - 2, k - 2
    if middle_s <= middle_t:
        middle: list[int | None] = list(range(1, 1 + middle_s))
    else:
        middle = [None] * (middle_s - middle_t) + list(range(1, 1 + middle_t))
    return [0, *middle, n - 1]


@dataclass(frozen=True)
class Block:
    """One block: its module path, the level whose channels it works in, and per ResNet the
    transformer depth after it and the channel groups concatenated at its input."""

    path: str  # "down_blocks.0", "mid_block", "up_blocks.3"
    side: str  # "down", "mid" or "up"
    level: int  # resolution index: works at latent_size / 2**level
    depths: tuple[int, ...]
    inputs: tuple[tuple[str, ...], ...]  # per ResNet: stream groups at its input (2 on the up path)
    resampler: str | None = None  # "downsamplers.0" or "upsamplers.0"

    def attention_index(self, j: int) -> int | None:
        """Module index in `.attentions` of the transformer after ResNet j (both classes number
        only the transformers that exist)."""
        if not self.depths[j]:
            return None
        return sum(1 for d in self.depths[:j] if d)


def stream(level: int) -> str:
    return f"level{level}"


def layout(arch: Arch) -> dict[tuple[str, int], Block]:
    """{(side, level): Block} of the U-Net nas/space/build.py builds for `arch` (either class)."""
    n = len(arch.levels)
    blocks: dict[tuple[str, int], Block] = {}
    skips = [stream(0)]  # conv_in's output is the first skip
    prev = stream(0)
    for i, lv in enumerate(arch.levels):
        inputs: list[tuple[str, ...]] = []
        for _ in range(lv.resnets):
            inputs.append((prev,))
            prev = stream(i)
            skips.append(stream(i))
        resampler = None if i == n - 1 else "downsamplers.0"
        if resampler:
            skips.append(stream(i))  # the downsampled tensor keeps level i's channels
        blocks["down", i] = Block(f"down_blocks.{i}", "down", i, tuple(spread(lv.attentions, lv.resnets)),
                                  tuple(inputs), resampler)  # fmt: skip
    if arch.mid is not None:
        depths = tuple(spread(arch.mid.attentions, arch.mid.resnets))
        blocks["mid", n - 1] = Block("mid_block", "mid", n - 1, depths, tuple((prev,) for _ in depths))
    for u, i in enumerate(reversed(range(n))):
        lv = arch.levels[i]
        inputs = []
        for _ in range(lv.resnets + 1):
            inputs.append((prev, skips.pop()))
            prev = stream(i)
        blocks["up", i] = Block(f"up_blocks.{u}", "up", i, tuple(spread(lv.up_attentions, lv.resnets + 1)),
                                tuple(inputs), None if i == 0 else "upsamplers.0")  # fmt: skip
    return blocks


@dataclass
class Unit:
    """A student module and where its weights come from."""

    student: str  # module path in the student
    teacher: str | None  # module path in the teacher; None: new
    kind: str  # "resnet", "attention", "resampler", "stem"
    stream: str  # channel group of its residual stream (level i in both: levels match by index)
    inputs: tuple[str, ...] = ()  # resnet: groups concatenated at its input, in the student ...
    teacher_inputs: tuple[str, ...] = ()  # ... and in the teacher layer it takes weights from
    blocks: list[int | None] = field(
        default_factory=list
    )  # attention: teacher transformer block per student block


@dataclass
class Plan:
    units: list[Unit]
    dropped: list[str]  # teacher module paths no student module takes weights from
    notes: list[str]

    def source(self, student_param: str) -> tuple[Unit, str | None]:
        """(unit, teacher parameter name or None) for a student parameter name."""
        for unit in sorted(self.units, key=lambda u: -len(u.student)):
            if student_param.startswith(unit.student + "."):
                local = student_param[len(unit.student) + 1 :]
                if unit.teacher is None:
                    return unit, None
                if unit.kind == "attention" and local.startswith("transformer_blocks."):
                    _, index, rest = local.split(".", 2)
                    chosen = unit.blocks[int(index)]
                    return (
                        unit,
                        None if chosen is None else f"{unit.teacher}.transformer_blocks.{chosen}.{rest}",
                    )
                return unit, f"{unit.teacher}.{local}"
        raise KeyError(student_param)


STEMS = ("conv_in", "time_embedding", "conv_norm_out", "conv_out")  # always copied (or sliced)


def check_compatible(teacher: Arch, student: Arch) -> None:
    """NasError if no student layer can take the teacher's weights at all."""
    for name in ("latent_channels", "cross_attention_dim", "norm_num_groups", "use_linear_projection"):
        t, s = getattr(teacher.settings, name), getattr(student.settings, name)
        if t != s:
            raise NasError(
                f"settings.{name}: the student has {s}, the teacher {t}; they must match to inherit"
            )
    for role, arch in (("teacher", teacher), ("student", student)):
        # DeciDiffusion's layouts change module structure (one Transformer2DModel per layer, a
        # mid block one resolution lower); the selection rule below is written for the default ones
        if arch.attention_layout != "stacked":
            raise NasError(f"attention_layout: the {role} has {arch.attention_layout!r}; inheritance "
                           "supports only 'stacked' (the default) so far")  # fmt: skip
        if arch.mid is not None and arch.mid.resolution != "same":
            raise NasError(f"mid.resolution: the {role} has {arch.mid.resolution!r}; inheritance "
                           "supports only 'same' (the default) so far")  # fmt: skip
    if len(student.levels) > len(teacher.levels):
        i = len(teacher.levels)
        raise NasError(f"levels.{i}: the teacher has no level at resolution latent_size/2**{i} "
                       f"({len(teacher.levels)} levels); the student cannot inherit it")  # fmt: skip


def plan(teacher: Arch, student: Arch) -> Plan:
    """The student's units and their teacher sources (architectures only; no weights needed)."""
    check_compatible(teacher, student)
    t_blocks, s_blocks = layout(teacher), layout(student)
    units = [Unit(name, name, "stem", stream(0)) for name in STEMS]
    notes: list[str] = []
    used: set[str] = set(STEMS)
    for key, sb in s_blocks.items():
        tb = t_blocks.get(key)
        if tb is None:  # only the mid block can be missing at a level both have
            notes.append(f"{sb.path}: the teacher has none at level {sb.level}; new, identity-initialised")
            choice: list[int | None] = [None] * len(sb.depths)
        else:
            rule = keep_up if sb.side == "up" else keep_down
            choice = rule(len(tb.depths), len(sb.depths))
        for j, tj in enumerate(choice):
            s_res = f"{sb.path}.resnets.{j}"
            t_res = None if tb is None or tj is None else f"{tb.path}.resnets.{tj}"
            t_in = tb.inputs[tj] if tb is not None and tj is not None else ()
            units.append(Unit(s_res, t_res, "resnet", stream(sb.level), sb.inputs[j], t_in))
            sa = sb.attention_index(j)
            if sa is None:
                continue
            t_att, chosen = None, []
            if tb is not None and tj is not None and (ta := tb.attention_index(tj)) is not None:
                t_att, chosen = f"{tb.path}.attentions.{ta}", keep_down(tb.depths[tj], sb.depths[j])
            units.append(
                Unit(f"{sb.path}.attentions.{sa}", t_att, "attention", stream(sb.level), blocks=chosen)
            )
        if sb.resampler is not None:
            if tb is None or tb.resampler != sb.resampler:
                raise NasError(
                    f"{sb.path}.{sb.resampler}: the teacher has no such resampler at level {sb.level}"
                )
            s_res, t_res = f"{sb.path}.{sb.resampler}", f"{tb.path}.{tb.resampler}"
            units.append(Unit(s_res, t_res, "resampler", stream(sb.level)))
    for u in units:
        if u.teacher is not None:
            used.add(u.teacher)
    dropped = []
    for tb in t_blocks.values():
        names = [f"{tb.path}.resnets.{j}" for j in range(len(tb.depths))]
        names += [f"{tb.path}.attentions.{a}" for a in range(sum(1 for d in tb.depths if d))]
        names += [f"{tb.path}.{tb.resampler}"] if tb.resampler else []
        dropped += [n for n in names if n not in used]
        for j, depth in enumerate(tb.depths):  # transformer layers of an inherited transformer left out
            att = f"{tb.path}.attentions.{tb.attention_index(j)}"
            kept = {m for u in units if u.teacher == att for m in u.blocks}
            if att in used:
                dropped += [f"{att}.transformer_blocks.{m}" for m in range(depth) if m not in kept]
    return Plan(units, dropped, notes)
