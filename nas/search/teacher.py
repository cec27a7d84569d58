"""Proxy distillation in a search (`proxy: distill:` of a space, or `nas search --teacher`): every
trial's U-Net starts from the teacher's weights (init: inherit) and distils from it for its proxy
steps (nas/train/distill.py).

Before any trial `prepare_distill` resolves the teacher path (relative to the space file, as
`latency.table` and `baselines:` are) and checks, from the teacher's config alone (no weights
loaded), that it can seed every point of the space. During the search `cached_teacher` loads the
weights once per worker process: every trial of a process reads the same frozen module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.space.distill import DistillConfig
from nas.space.schema import Arch, Space

# settings a teacher must share with every student even without inheritance: the outputs are
# compared element-wise (latent channels) and both read the same text features
DISTILL_SETTINGS = ("latent_channels", "cross_attention_dim")


def with_teacher(space: Space, teacher: str | Path | None) -> Space:
    """The space with `proxy.distill.teacher` set to `teacher` (absolute); with no `proxy.distill`
    yet, one with DistillConfig's defaults (BK-SDM's weights, init: inherit). `None`: unchanged."""
    if teacher is None:
        return space
    path = str(Path(teacher).resolve())
    distill = space.proxy.distill or DistillConfig(teacher=path)
    proxy = space.proxy.model_copy(update={"distill": distill.model_copy(update={"teacher": path})})
    return space.model_copy(update={"proxy": proxy})


def resolve_teacher_path(space: Space, space_path: str | Path | None) -> Path | None:
    """`proxy.distill.teacher` relative to the space file; None without `proxy.distill`."""
    if space.proxy.distill is None:
        return None
    teacher = Path(space.proxy.distill.teacher)
    if not teacher.is_absolute() and space_path is not None:
        teacher = Path(space_path).parent / teacher
    return teacher


def check_space_teacher(space: Space, teacher: Arch, init: str = "inherit") -> None:
    """NasError if `teacher` cannot seed (init: inherit) or teach (init: scratch) some point of
    `space`. Checked on the largest point of each depth and mid resolution (every count, channel
    and layout choice at its maximum, DeciDiffusion's layouts included where the space offers
    them): a teacher that seeds it seeds every smaller point, as inheritance slices narrower levels
    and appends nothing a smaller point would need."""
    from nas.space.sample import extreme_archs
    from nas.teacher.plan import check_compatible

    if init != "inherit":
        for name in DISTILL_SETTINGS:
            mine, theirs = getattr(space.settings, name), getattr(teacher.settings, name)
            if mine != theirs:
                raise NasError(
                    f"settings.{name}: the space has {mine}, the teacher {theirs}; they must match"
                )
        return
    for _, _, largest in extreme_archs(space):
        check_compatible(teacher, largest)
        for i, level in enumerate(largest.levels):
            have = teacher.levels[i].channels
            if level.channels > have:
                raise NasError(
                    f"levels.{i}.channels: the space allows {level.channels}, the teacher has {have};"
                    " a student wider than its teacher cannot inherit (narrow the space or widen the teacher)"
                )


def prepare_distill(space: Space, space_path: str | Path | None, teacher: str | Path | None = None) -> Space:
    """Before any trial: the space with `teacher` applied (`with_teacher`) and its teacher path
    resolved, the teacher's config read and checked against the space (NasError naming the space
    file and the field otherwise); a space without proxy distillation unchanged."""
    from nas.teacher.arch import teacher_arch

    space = with_teacher(space, teacher)
    path = resolve_teacher_path(space, space_path)
    if path is None:
        return space
    assert space.proxy.distill is not None  # resolve_teacher_path returns a path only with it
    where = f"{space_path or space.name}: proxy.distill.teacher"
    try:
        _, arch = teacher_arch(path, what="teacher")
        check_space_teacher(space, arch, space.proxy.distill.init)
    except NasError as exc:
        raise NasError(f"{where}: {exc}") from None
    distill = space.proxy.distill.model_copy(update={"teacher": str(path.resolve())})
    return space.model_copy(update={"proxy": space.proxy.model_copy(update={"distill": distill})})


_TEACHERS: dict[str, Any] = {}  # resolved path -> (module, Arch): one load per worker process


def cached_teacher(path: str | Path) -> tuple[Any, Arch]:
    """The teacher (module, Arch), loaded on first use in this process and kept."""
    from nas.teacher import arch as teachers  # looked up at call time: tests count the loads

    key = str(Path(path).resolve())
    if key not in _TEACHERS:
        _TEACHERS[key] = teachers.load_teacher(key, what="teacher")
    return _TEACHERS[key]
