"""Which teacher layer seeds each student layer: the selection rules, on architectures alone.

Blocks match by resolution: student level i <- teacher level i (both work at latent_size / 2**i:
its down block, its up block and their resamplers); a teacher level the student lacks is dropped.
A student level the teacher lacks cannot be seeded (NasError naming `levels.i`).

Inside a block ResNets are chosen by position (`keep_down`, `keep_up`), each with the transformer
layers that follow it:

- down path and mid block, student k of teacher n ResNets: the first k (ResNet 0 is the one that
  changes the channel count, so it must stay first). A deeper student appends new layers after the
  teacher's, as identities: each adds a skip equal to the one before it.
- up path, k + 1 of n + 1: the first (it takes the tensor from the level below) and the last (it
  takes the skip from the level above), the teacher's middle ones in between in order; a deeper
  student puts its new layers right after the first, where they consume the duplicated skips of the
  new down layers. BK-SDM (Kim et al. 2023) is the case n = 2, k = 1: student `resnets.1` <- teacher
  `resnets.2`.

Transformer layers (`attention_layout`, nas/space/build.py). After each ResNet sits a row of d
transformer layers: `stacked`, one Transformer2DModel holding them all (norm, proj_in,
transformer_blocks.0..d-1, proj_out); `interleaved` (DeciDiffusion), d one-layer Transformer2DModels
in a row, each with its own norm/proj_in/proj_out. Rule, the same for every pair of layouts:

- student layer m after a ResNet takes teacher layer m after the ResNet it inherits: the first k;
  a deeper student's extra layers are new, as identities (a new one-layer transformer: proj_out
  zeroed; a new layer inside an inherited transformer: attn1/attn2 to_out and ff.net.2 zeroed);
- a student transformer takes norm, proj_in and proj_out from the teacher transformer holding the
  layer its first layer takes. So stacked -> interleaved: student transformer m = the teacher's
  norm/proj_in/proj_out around its block m; interleaved -> stacked: the first teacher transformer's
  norm/proj_in/proj_out around the blocks of teacher transformers 0, 1, ... in order; same layouts:
  one to one (interleaved pairs transformers by position, as stacked pairs blocks).
- one layer after a ResNet is the same module in both layouts, copied exactly. Layers regrouped
  (a student transformer made from several teacher transformers, or one teacher transformer split
  over several student ones) are an initialisation, not the teacher's function: the plan notes
  each block where that happens (inherit.md, "Notes").

The mid block (`mid.resolution`, nas/space/schema.py) keeps the last level's channels. `same`: it
works at the last level's resolution (index n - 1 for n levels); `half` (DeciDiffusion): one
lower (index n): the last down block gets a downsampler whose output is no skip and the mid block
ends with an upsampler. A student mid block at resolution index r takes, in order:

- the teacher's mid block at index r: same layout and depth, or SD 1.5's `same` mid block (index 3,
  8x8 for 64x64 latents) for DeciDiffusion's 3-level `half` one;
- a `half` student mid only: the teacher's down block of level r (a teacher at least two levels
  deeper), under the down-path rule;
- else a `same` mid block is new (identity-initialised), and a `half` one is a NasError naming
  `mid.resolution` (the teacher has no block at that resolution, as for a level it lacks).

A `half` student mid block's downsampler (on its last level, n - 1) is the teacher's downsampler of
level n - 1 (which exists: the teacher has a level or a `half` mid at index n); its upsampler is the
teacher mid block's upsampler if that is its source and `half`, else the teacher's up-path upsampler
of level r (SD 1.5 -> DeciDiffusion: `down_blocks.2.downsamplers.0`, `up_blocks.0.upsamplers.0`,
both 1280 channels). A mid block seeded across resolutions (a `same` block, a level) is noted as an
initialisation, not the teacher's function. A `half` teacher's mid block and last downsampler are
dropped by a `same` student of its depth, whose mid block is then new.

Every rule is written over per-block lists (`Block.depths`: transformer layers after each ResNet),
so layouts with other ResNet counts per block only change `layout()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nas.core.errors import NasError
from nas.space.build import layer_depths
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
    """One block: its module path, resolution and channels, and per ResNet the transformer layers
    after it and the channel groups concatenated at its input."""

    path: str  # "down_blocks.0", "mid_block", "up_blocks.3"
    side: str  # "down", "mid" or "up"
    level: int  # resolution index: works at latent_size / 2**level
    stream: str  # channel group of its residual stream (a half-resolution mid: its last level's)
    depths: tuple[int, ...]  # transformer layers after each ResNet
    inputs: tuple[tuple[str, ...], ...]  # per ResNet: stream groups at its input (2 on the up path)
    resampler: str | None = None  # "downsamplers.0" or "upsamplers.0"
    single_layer: bool = False  # interleaved layout: d layers are d one-layer transformers

    def _count(self, depth: int) -> int:
        return depth if self.single_layer else min(depth, 1)

    def transformers(self, j: int) -> list[int]:
        """Indices in `.attentions` of the transformers after ResNet j (both U-Net classes number
        only the transformers that exist)."""
        start = sum(self._count(d) for d in self.depths[:j])
        return list(range(start, start + self._count(self.depths[j])))

    def layers(self, j: int) -> list[tuple[str, int]]:
        """(transformer path, index in its transformer_blocks) of each layer after ResNet j, in order."""
        paths = [f"{self.path}.attentions.{a}" for a in self.transformers(j)]
        if self.single_layer:
            return [(p, 0) for p in paths]
        return [(paths[0], m) for m in range(self.depths[j])] if paths else []

    def transformer_depths(self) -> list[int]:
        """Layers in each transformer of the block, in `.attentions` order."""
        return [1 if self.single_layer else d for d in self.depths for _ in range(self._count(d))]


def stream(level: int) -> str:
    return f"level{level}"


def _half(arch: Arch) -> bool:
    return arch.mid is not None and arch.mid.resolution == "half"


def layout(arch: Arch) -> dict[tuple[str, int], Block]:
    """{(side, resolution index): Block} of the U-Net nas/space/build.py builds for `arch` (either
    class, every `attention_layout` and `mid.resolution`)."""
    n, lay, half = len(arch.levels), arch.attention_layout, _half(arch)
    single = lay == "interleaved"
    blocks: dict[tuple[str, int], Block] = {}
    skips = [stream(0)]  # conv_in's output is the first skip
    prev = stream(0)
    for i, lv in enumerate(arch.levels):
        inputs: list[tuple[str, ...]] = []
        for _ in range(lv.resnets):
            inputs.append((prev,))
            prev = stream(i)
            skips.append(stream(i))
        last = i == n - 1
        if not last:
            skips.append(stream(i))  # the downsampled tensor keeps level i's channels
        blocks["down", i] = Block(f"down_blocks.{i}", "down", i, stream(i),
                                  tuple(layer_depths(lay, lv.attentions, lv.resnets)), tuple(inputs),
                                  "downsamplers.0" if not last or half else None, single)  # fmt: skip
    if arch.mid is not None:
        depths = tuple(layer_depths(lay, arch.mid.attentions, arch.mid.resnets))
        r = n if half else n - 1
        blocks["mid", r] = Block("mid_block", "mid", r, prev, depths, tuple((prev,) for _ in depths),
                                 "upsamplers.0" if half else None, single)  # fmt: skip
    for u, i in enumerate(reversed(range(n))):
        lv = arch.levels[i]
        inputs = []
        for _ in range(lv.resnets + 1):
            inputs.append((prev, skips.pop()))
            prev = stream(i)
        blocks["up", i] = Block(f"up_blocks.{u}", "up", i, stream(i),
                                tuple(layer_depths(lay, lv.up_attentions, lv.resnets + 1)), tuple(inputs),
                                None if i == 0 else "upsamplers.0", single)  # fmt: skip
    return blocks


@dataclass
class Unit:
    """A student module and where its weights come from."""

    student: str  # module path in the student
    teacher: str | None  # module path in the teacher; None: new
    kind: str  # "resnet", "attention", "resampler", "stem"
    stream: str  # channel group of its residual stream in the student
    inputs: tuple[str, ...] = ()  # resnet: groups concatenated at its input, in the student ...
    teacher_inputs: tuple[str, ...] = ()  # ... and in the teacher layer it takes weights from
    # attention: per student transformer block, the teacher block it copies (full path; None: new)
    blocks: list[str | None] = field(default_factory=list)
    teacher_stream: str | None = None  # the source's stream where it differs (a mid across resolutions)

    def stream_of(self, teacher_side: bool) -> str:
        return (self.teacher_stream or self.stream) if teacher_side else self.stream


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
                    return unit, None if chosen is None else f"{chosen}.{rest}"
                return unit, f"{unit.teacher}.{local}"
        raise KeyError(student_param)


STEMS = ("conv_in", "time_embedding", "conv_norm_out", "conv_out")  # always copied (or sliced)


def mid_source(t_blocks: dict[tuple[str, int], Block], sb: Block) -> Block | None:
    """The teacher block a student mid block takes its ResNets and transformers from (module doc)."""
    if ("mid", sb.level) in t_blocks:
        return t_blocks["mid", sb.level]
    if sb.resampler is not None:  # a half-resolution mid block: the teacher's level there
        return t_blocks.get(("down", sb.level))
    return None


def check_compatible(teacher: Arch, student: Arch) -> None:
    """NasError if no student layer can take the teacher's weights at all."""
    for name in ("latent_channels", "cross_attention_dim", "norm_num_groups", "use_linear_projection"):
        t, s = getattr(teacher.settings, name), getattr(student.settings, name)
        if t != s:
            raise NasError(
                f"settings.{name}: the student has {s}, the teacher {t}; they must match to inherit"
            )
    if len(student.levels) > len(teacher.levels):
        i = len(teacher.levels)
        raise NasError(f"levels.{i}: the teacher has no level at resolution latent_size/2**{i} "
                       f"({len(teacher.levels)} levels); the student cannot inherit it")  # fmt: skip
    if _half(student):
        r = len(student.levels)
        mid = next(b for b in layout(student).values() if b.side == "mid")
        if mid_source(layout(teacher), mid) is None:
            raise NasError(f"mid.resolution: the student's is 'half' (its mid block at latent_size/2**{r}), "
                           f"where the teacher ({len(teacher.levels)} levels) has no block; allowed: "
                           f"'same', or a teacher with a level or a mid block there")  # fmt: skip


def _transformer_units(sb: Block, j: int, tb: Block | None, tj: int | None) -> tuple[list[Unit], bool]:
    """Units of the transformers after student ResNet j (teacher ResNet tj of `tb`), and whether
    their layers are regrouped between transformers (not the teacher's function)."""
    s_mods = sb.transformers(j)
    t_layers = tb.layers(tj) if tb is not None and tj is not None else []
    chosen = keep_down(len(t_layers), sb.depths[j])  # student layer m <- teacher layer chosen[m]
    per_module = [[m] for m in range(sb.depths[j])] if sb.single_layer else [list(range(sb.depths[j]))]
    units: list[Unit] = []
    lenders: dict[str, set[str]] = {}  # teacher transformer -> student transformers taking its layers
    for a, layer_ids in zip(s_mods, per_module if s_mods else [], strict=True):
        sources = [t_layers[c] if c is not None else None for c in (chosen[m] for m in layer_ids)]
        teacher = sources[0][0] if sources[0] is not None else None
        blocks = [None if s is None else f"{s[0]}.transformer_blocks.{s[1]}" for s in sources]
        path = f"{sb.path}.attentions.{a}"
        for s in sources:
            if s is not None:
                lenders.setdefault(s[0], set()).add(path)
        units.append(Unit(path, teacher, "attention", sb.stream, blocks=blocks if teacher else [],
                          teacher_stream=tb.stream if tb is not None else None))  # fmt: skip
    borrowed = [{b.rsplit(".transformer_blocks.", 1)[0] for b in u.blocks if b} for u in units]
    regrouped = any(len(t) > 1 for t in borrowed) or any(len(s) > 1 for s in lenders.values())
    return units, regrouped


def plan(teacher: Arch, student: Arch) -> Plan:
    """The student's units and their teacher sources (architectures only; no weights needed)."""
    check_compatible(teacher, student)
    t_blocks, s_blocks = layout(teacher), layout(student)
    units = [Unit(name, name, "stem", stream(0)) for name in STEMS]
    notes: list[str] = []
    for key, sb in s_blocks.items():
        tb = mid_source(t_blocks, sb) if sb.side == "mid" else t_blocks.get(key)
        if tb is None:  # only a same-resolution mid block can be missing at a level both have
            notes.append(f"{sb.path}: the teacher has none at level {sb.level}; new, identity-initialised")
            choice: list[int | None] = [None] * len(sb.depths)
        else:
            rule = keep_up if sb.side == "up" else keep_down
            choice = rule(len(tb.depths), len(sb.depths))
        t_stream = tb.stream if tb is not None else None
        regrouped = False
        for j, tj in enumerate(choice):
            s_res = f"{sb.path}.resnets.{j}"
            t_res = None if tb is None or tj is None else f"{tb.path}.resnets.{tj}"
            t_in = tb.inputs[tj] if tb is not None and tj is not None else ()
            units.append(Unit(s_res, t_res, "resnet", sb.stream, sb.inputs[j], t_in, teacher_stream=t_stream))
            attention_units, split = _transformer_units(sb, j, tb, tj)
            units += attention_units
            regrouped |= split
        if regrouped and tb is not None:
            notes.append(f"{sb.path}: transformer layers regrouped from the teacher's {teacher.attention_layout} "
                         f"{tb.path} (nas/teacher/plan.py); an initialisation, not the teacher's function")  # fmt: skip
        if sb.resampler is not None:
            src = tb if tb is not None and tb.resampler == sb.resampler else None
            if src is None and sb.side == "mid":  # a half mid block's upsampler: the up path's there
                src = t_blocks.get(("up", sb.level))
            if src is None or src.resampler != sb.resampler:
                raise NasError(
                    f"{sb.path}.{sb.resampler}: the teacher has no such resampler at level {sb.level}"
                )
            s_res, t_res = f"{sb.path}.{sb.resampler}", f"{src.path}.{src.resampler}"
            units.append(Unit(s_res, t_res, "resampler", sb.stream, teacher_stream=src.stream))
        if sb.side == "mid" and tb is not None and (tb.side != "mid" or tb.resampler != sb.resampler):
            extra = f", its upsampler <- {units[-1].teacher}" if sb.resampler else ""
            notes.append(f"{sb.path} (mid.resolution {'half' if sb.resampler else 'same'}) <- the teacher's "
                         f"{tb.path} at latent_size/2**{sb.level}{extra}; an initialisation, not the "
                         "teacher's function")  # fmt: skip
    dropped = _dropped(t_blocks, units)
    t_cond, s_cond = teacher.settings.time_cond_proj_dim, student.settings.time_cond_proj_dim
    if t_cond is not None and s_cond is None:
        dropped.append("time_embedding.cond_proj")
        notes.append("time_embedding.cond_proj: the teacher's guidance embedding is dropped (the student "
                     "has no settings.time_cond_proj_dim)")  # fmt: skip
    elif s_cond is not None and t_cond != s_cond:
        had = "none" if t_cond is None else f"width {t_cond}"
        notes.append(f"time_embedding.cond_proj: new guidance embedding (width {s_cond}; the teacher's: {had}), "
                     "zero: the student computes the teacher's function at every guidance weight")  # fmt: skip
    return Plan(units, dropped, notes)


def _dropped(t_blocks: dict[tuple[str, int], Block], units: list[Unit]) -> list[str]:
    """Teacher modules (or parts of transformers) no student unit takes weights from."""
    used = set(STEMS) | {u.teacher for u in units if u.teacher is not None}
    used_blocks = {b for u in units for b in u.blocks if b is not None}
    dropped = []
    for tb in t_blocks.values():
        names = [f"{tb.path}.resnets.{j}" for j in range(len(tb.depths))]
        names += [f"{tb.path}.{tb.resampler}"] if tb.resampler else []
        dropped += [n for n in names if n not in used]
        for a, depth in enumerate(tb.transformer_depths()):
            att = f"{tb.path}.attentions.{a}"
            unused = [f"{att}.transformer_blocks.{m}" for m in range(depth)]
            unused = [b for b in unused if b not in used_blocks]
            if att not in used and len(unused) == depth:
                dropped.append(att)
                continue
            if att not in used:  # its layers lent to a transformer that has another's norm/projections
                dropped += [f"{att}.{part}" for part in ("norm", "proj_in", "proj_out")]
            dropped += unused
    return dropped
