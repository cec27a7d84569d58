"""Start a student U-Net from a trained teacher by weight inheritance (BK-SDM's recipe, generalised).

Every student layer takes the weights of the teacher layer at the same resolution and position (up
path: first and last kept, as BK-SDM); a narrower level keeps the teacher's most important channels
(--narrow slice) or starts fresh; a layer the teacher lacks starts as an identity. OUT gets the
student as a diffusers model folder (config.json + safetensors), its arch.yaml and inherit.md (what
each tensor got), ready for training or distillation from the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("inherit",)
    teacher: str = arg(
        help="a `nas train` run folder, a diffusers U-Net folder (config.json + safetensors) or a "
        "pipeline folder with unet/",
        input="folder",
    )
    arch: str = arg(help="the student's architecture YAML", input="arch")
    out: str = arg(help="folder to write (must be new or empty)")
    narrow: Literal["slice", "fresh"] = arg(
        "slice", "narrower levels: slice (keep the teacher's strongest channels) or fresh"
    )
    seed: int = arg(0, "seed of the student's random init (new layers)", ge=0, le=2**31 - 1)


SETTINGS = Settings


def _plan(settings: Settings, units: list | None = None):
    """(teacher Arch, student Arch, report) on meta models: the plan without reading weights;
    `units` (if given) receives the plan's modules (nas.teacher.plan.Unit)."""
    import torch

    from nas.space import build_unet, load_arch
    from nas.teacher.arch import teacher_arch
    from nas.teacher.inherit import InheritReport, plan, tensor_plan

    _, t_arch = teacher_arch(settings.teacher, "--teacher")
    s_arch = load_arch(settings.arch)
    the_plan = plan(t_arch, s_arch)
    if units is not None:
        units += the_plan.units
    shapes = {}
    for key, arch in (("t", t_arch), ("s", s_arch)):
        with torch.device("meta"):
            shapes[key] = {k: v.shape for k, v in build_unet(arch, device="meta").state_dict().items()}
    steps = tensor_plan(the_plan, shapes["s"], shapes["t"], settings.narrow)
    return t_arch, s_arch, InheritReport(steps, the_plan.dropped, the_plan.notes, settings.narrow)


def dry_run(settings: Settings) -> dict:
    from nas.sample.generate import check_out_folder

    check_out_folder(Path(settings.out))
    units: list = []
    report = _plan(settings, units)[2]
    # Which teacher module each student ResNet, transformer and resampler starts from ("new": an
    # identity-initialised layer the teacher lacks): the BK-SDM rule, readable without weights.
    mapping = [f"{u.student} <- {u.teacher or 'new'}" for u in units if u.kind != "stem"]
    return {"plan": report.summary(), "mapping": mapping, "dropped": report.dropped, "notes": report.notes}


def run(settings: Settings) -> int:
    import torch

    from nas.core.runfolder import ARCH, staged_folder, write_text, write_yaml
    from nas.sample.generate import check_out_folder
    from nas.space import build_unet
    from nas.teacher.arch import load_teacher
    from nas.teacher.inherit import inherit

    out = Path(settings.out)
    check_out_folder(out)
    _, s_arch, _ = _plan(settings)  # every refusal before a weight is read
    teacher, t_arch = load_teacher(settings.teacher, "--teacher")
    torch.manual_seed(settings.seed)
    student = build_unet(s_arch)
    report = inherit(teacher, t_arch, student, s_arch, narrow=settings.narrow)
    with staged_folder(out) as staging:  # `out` absent or empty (checked); nothing left on error
        student.save_pretrained(staging, safe_serialization=True)
        write_yaml(staging / ARCH, s_arch.to_data())
        title = f"Weight inheritance: {s_arch.name} from {settings.teacher}"
        write_text(staging / "inherit.md", report.to_markdown(title))
    print(f"inherited {s_arch.name} from {settings.teacher}: {report.summary()}; wrote {out}")
    return 0
