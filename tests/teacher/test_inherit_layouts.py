"""Weight inheritance across DeciDiffusion's layouts (`attention_layout: interleaved`,
`mid.resolution: half`) and SD's (nas/teacher/plan.py, module doc)."""

import re

import pytest
import torch

from nas.core.errors import NasError
from nas.cost.measure import example_inputs
from nas.space import build_unet, load_arch
from nas.space.build import arch_from_dict, flex_config
from nas.teacher.arch import load_teacher, teacher_arch
from nas.teacher.inherit import inherit, layout, plan, tensor_plan
from tests.fixtures.space import ARCHS
from tests.teacher.test_inherit import sd_like

SETTINGS = {"latent_size": 16, "cross_attention_dim": 32, "norm_num_groups": 8, "text_len": 4}
# (attention_layout, mid.resolution): SD's, DeciDiffusion's and the two mixes
LAYOUTS = [("stacked", "same"), ("interleaved", "same"), ("stacked", "half"), ("interleaved", "half")]
# per level: channels, resnets, attentions, up_attentions; rows of 2 layers put stacked and
# interleaved apart (stacked [2, 1], interleaved [1, 2] over two ResNets)
LEVELS = [(16, 1, 2, 3), (32, 2, 3, 4), (48, 1, 0, 0)]


def arch(lay, levels=3, widths=None, mid=(2, 3)):
    attention_layout, resolution = lay
    widths = widths or [c for c, *_ in LEVELS]
    lv = [
        {"channels": widths[i], "resnets": r, "attentions": a, "up_attentions": u, "heads": 2}
        for i, (_, r, a, u) in enumerate(LEVELS[:levels])
    ]
    data = {"name": "a", "settings": SETTINGS, "levels": lv, "attention_layout": attention_layout,
            "mid": {"resnets": mid[0], "attentions": mid[1], "resolution": resolution}}  # fmt: skip
    return arch_from_dict(data)


def deci_like(channels, settings):
    """search_spaces/archs/decidiffusion_v1.yaml's structure at other widths and settings."""
    data = load_arch(ARCHS / "decidiffusion_v1.yaml").to_data()
    data["settings"] = settings
    for level, c in zip(data["levels"], channels, strict=True):
        level["channels"] = c
    return arch_from_dict(data)


def _shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_coverage(the_plan, steps, s_shapes, t_shapes):
    """Every student tensor has one step; a teacher tensor is used xor under a dropped module."""
    assert [s.student for s in steps] == list(s_shapes)
    used = {s.teacher for s in steps if s.teacher is not None}
    assert used <= set(t_shapes)
    for step in steps:
        if step.status == "copied":
            assert t_shapes[step.teacher] == s_shapes[step.student]
        elif step.status == "sliced":
            assert len(t_shapes[step.teacher]) == len(s_shapes[step.student])
    prefixes = tuple(d + "." for d in the_plan.dropped)
    # a 1x1 shortcut is left where the student's ResNet keeps its channel count (a mid block from a level)
    unused = {k for k in set(t_shapes) - used if ".conv_shortcut." not in k}
    assert all(k.startswith(prefixes) for k in unused), unused
    assert not any(k.startswith(prefixes) for k in used)


# ---- layout() is the built model ------------------------------------------------------------------

MODULE = re.compile(
    r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets\.\d+|attentions\.\d+|\w+samplers\.0)"
)


@pytest.mark.parametrize("lay", LAYOUTS, ids=["/".join(x) for x in LAYOUTS])
@pytest.mark.parametrize("force_flex", [False, True])
def test_layout_is_the_built_models_structure(lay, force_flex):
    # mid (2, 1): a stacked mid block of 2 ResNets and A >= 2 layers builds as one depth-A
    # transformer in the stock class but spread [1, 1] in the flex one (nas/space/build.py)
    a = arch(lay, widths=[16, 32, 48], mid=(2, 3) if force_flex else (2, 1))
    model = build_unet(a, force_flex=force_flex)
    modules = dict(model.named_modules())
    blocks = layout(a)
    expected = set()
    sizes = {f"level{i}": lv.channels for i, lv in enumerate(a.levels)}
    for b in blocks.values():
        for j, inputs in enumerate(b.inputs):
            resnet = modules[f"{b.path}.resnets.{j}"]
            # the channel groups at its input and of its stream are the built ones (skips included)
            assert (resnet.in_channels, resnet.out_channels) == (
                sum(sizes[g] for g in inputs),
                sizes[b.stream],
            )
            expected.add(f"{b.path}.resnets.{j}")
        for t, depth in enumerate(b.transformer_depths()):
            assert len(modules[f"{b.path}.attentions.{t}"].transformer_blocks) == depth
            expected.add(f"{b.path}.attentions.{t}")
        if b.resampler:
            assert modules[f"{b.path}.{b.resampler}"].channels == sizes[b.stream]
            expected.add(f"{b.path}.{b.resampler}")
        flex = modules[b.path]
        if hasattr(flex, "attention_after"):  # FlexBlock: the transformers run after each ResNet
            assert flex.attention_after == [b.transformers(j) for j in range(len(b.depths))]
    assert {n for n in modules if MODULE.fullmatch(n)} == expected
    # each block works at its resolution index: latent_size / 2**level
    seen: dict[tuple[str, int], set[int]] = {}
    hooks = [modules[f"{b.path}.resnets.{j}"].register_forward_hook(  # (a hook returning None keeps the output)
        lambda m, i, o, key=(b.path, b.level): seen.setdefault(key, set()).add(o.shape[-1]))
        for b in blocks.values() for j in range(len(b.depths))]  # fmt: skip
    with torch.no_grad():
        model(*example_inputs(a))
    for h in hooks:
        h.remove()
    assert seen == {(b.path, b.level): {16 // 2**b.level} for b in blocks.values()}
    assert (lay[1] == "half") == (("mid", 3) in blocks)


# ---- every pair of layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("s_levels", [2, 3])
@pytest.mark.parametrize("s_lay", LAYOUTS, ids=["/".join(x) for x in LAYOUTS])
@pytest.mark.parametrize("t_lay", LAYOUTS, ids=["/".join(x) for x in LAYOUTS])
def test_every_pair_of_layouts_inherits(t_lay, s_lay, s_levels):
    t_arch = arch(t_lay)
    s_arch = arch(s_lay, levels=s_levels, widths=[8, 32, 32][:s_levels], mid=(3, 2))
    if s_levels == 3 and s_lay[1] == "half" and t_lay[1] == "same":
        # the student's mid block one resolution below every block of the teacher
        with pytest.raises(NasError, match=r"^mid\.resolution: the student's is 'half'.*allowed: 'same'"):
            plan(t_arch, s_arch)
        return
    torch.manual_seed(0)  # flex: a stacked mid (2, 3) builds otherwise in the stock class (see above)
    teacher, student = build_unet(t_arch, force_flex=True), build_unet(s_arch, force_flex=True)
    the_plan = plan(t_arch, s_arch)
    s_shapes, t_shapes = _shapes(student), _shapes(teacher)
    _check_coverage(the_plan, tensor_plan(the_plan, s_shapes, t_shapes, "slice"), s_shapes, t_shapes)
    report = inherit(teacher, t_arch, student, s_arch)
    counts = report.counts()
    assert counts["copied"][0] and counts["sliced"][0]  # level 0 is narrower
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    for step in report.steps:
        if step.status == "copied":
            assert torch.equal(s_sd[step.student], t_sd[step.teacher])
    regrouped = any("regrouped" in n for n in report.notes)
    assert regrouped == (t_lay[0] != s_lay[0])  # rows of 2 layers: a split or a merge
    cross_mid = s_lay[1] == "half" and (t_lay[1] == "same" or s_levels == 2)
    assert any(n.startswith("mid_block (mid.resolution half) <- ") for n in report.notes) == cross_mid
    if s_lay[1] == "same" and (t_lay[1] == "half" or s_levels == 2):
        assert any(n.startswith("mid_block: the teacher has none") for n in report.notes)


def test_the_transformer_rules_by_name():
    t_arch, s_arch = arch(("stacked", "same")), arch(("interleaved", "same"))
    units = {u.student: u for u in plan(t_arch, s_arch).units}
    # level 1, ResNet 0: teacher stacked [2, 1] -> student interleaved [1, 2]: one layer, whole
    assert (units["down_blocks.1.attentions.0"].teacher, units["down_blocks.1.attentions.0"].blocks) == (
        "down_blocks.1.attentions.0", ["down_blocks.1.attentions.0.transformer_blocks.0"])  # fmt: skip
    # ResNet 1: the teacher's one layer, then a new single-layer transformer
    assert units["down_blocks.1.attentions.1"].blocks == ["down_blocks.1.attentions.1.transformer_blocks.0"]
    assert units["down_blocks.1.attentions.2"].teacher is None
    # level 0, ResNet 0: stacked depth 2 -> two single-layer transformers sharing its norm/projections
    for m in (0, 1):
        unit = units[f"down_blocks.0.attentions.{m}"]
        assert (unit.teacher, unit.blocks) == ("down_blocks.0.attentions.0",
                                               [f"down_blocks.0.attentions.0.transformer_blocks.{m}"])  # fmt: skip
    back = {u.student: u for u in plan(s_arch, t_arch).units}
    # interleaved -> stacked: the first transformer's shell, the blocks of the first two in order
    assert (back["down_blocks.0.attentions.0"].teacher, back["down_blocks.0.attentions.0"].blocks) == (
        "down_blocks.0.attentions.0",
        ["down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.0.attentions.1.transformer_blocks.0"],
    )  # fmt: skip
    dropped = plan(s_arch, t_arch).dropped
    assert "down_blocks.0.attentions.1.proj_in" in dropped and "down_blocks.0.attentions.1" not in dropped


@pytest.mark.parametrize("lay", LAYOUTS[1:], ids=["/".join(x) for x in LAYOUTS[1:]])
def test_same_layout_gives_identical_outputs_and_deeper_keeps_the_function(lay):
    a = arch(lay)
    torch.manual_seed(0)
    teacher = build_unet(a)
    torch.manual_seed(1)
    student = build_unet(a)
    report = inherit(teacher, a, student, a)
    assert report.counts()["copied"][0] == len(student.state_dict()) and not report.dropped
    assert not report.notes
    inputs = example_inputs(a, batch=2)
    with torch.no_grad():
        assert torch.equal(teacher.eval()(*inputs).sample, student.eval()(*inputs).sample)
    # a deeper student of the same layout whose rows hold the teacher's: identities
    deeper = arch(lay, mid=(2, 4))  # interleaved puts the extra layer after the last ResNet too
    student = build_unet(deeper)
    report = inherit(teacher, a, student, deeper)
    assert report.counts()["identity-init"][0] > 0 and report.counts()["sliced"][0] == 0
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(*inputs).sample, teacher(*inputs).sample, rtol=0, atol=1e-6)


def test_a_decidiffusion_teacher_folder_round_trips(tmp_path):
    a = arch(("interleaved", "half"))
    torch.manual_seed(0)
    build_unet(a).save_pretrained(tmp_path / "unet", safe_serialization=True)
    _, back = teacher_arch(tmp_path / "unet")
    assert (back.attention_layout, back.mid.resolution) == ("interleaved", "half")
    assert flex_config(back) == flex_config(a)
    teacher, t_arch = load_teacher(tmp_path)
    student = build_unet(a)
    report = inherit(teacher, t_arch, student, a)
    assert report.counts()["copied"][0] == len(student.state_dict())
    inputs = example_inputs(a)
    with torch.no_grad():
        assert torch.equal(teacher(*inputs).sample, student(*inputs).sample)


# ---- SD 1.5 -> DeciDiffusion 1.0 -----------------------------------------------------------------

SD_TO_DECI = {  # student module -> teacher module (module doc of inherit_plan.py)
    "mid_block.resnets.0": "mid_block.resnets.0",  # SD's mid block works at 8x8, as Deci's
    "mid_block.attentions.0": "mid_block.attentions.0",
    "mid_block.resnets.1": "mid_block.resnets.1",
    "mid_block.attentions.1": None,  # SD's has no transformer after its second ResNet
    "mid_block.resnets.4": None,
    "down_blocks.2.downsamplers.0": "down_blocks.2.downsamplers.0",
    "mid_block.upsamplers.0": "up_blocks.0.upsamplers.0",
    "down_blocks.2.attentions.0": "down_blocks.2.attentions.0",  # Deci: 3 single layers after 1 ResNet
    "down_blocks.2.attentions.1": None,
    "up_blocks.0.resnets.1": "up_blocks.1.resnets.2",  # up path: first and last of SD's 3
    "up_blocks.0.attentions.1": "up_blocks.1.attentions.2",  # Deci up level 2: layers [1, 5]
    "up_blocks.0.attentions.2": None,
    "up_blocks.0.upsamplers.0": "up_blocks.1.upsamplers.0",
}


def test_sd15_seeds_decidiffusion_at_full_size_on_meta():
    sd15, deci = load_arch(ARCHS / "sd15.yaml"), load_arch(ARCHS / "decidiffusion_v1.yaml")
    t_shapes = _shapes(build_unet(sd15, device="meta"))
    s_shapes = _shapes(build_unet(deci, device="meta"))
    the_plan = plan(sd15, deci)
    steps = tensor_plan(the_plan, s_shapes, t_shapes, "slice")
    _check_coverage(the_plan, steps, s_shapes, t_shapes)
    mapping = {u.student: u.teacher for u in the_plan.units}
    assert {k: mapping[k] for k in SD_TO_DECI} == SD_TO_DECI
    statuses = {s.status for s in steps}
    assert statuses == {"copied", "new", "identity-init"}  # same widths: nothing sliced
    copied = sum(s.numel for s in steps if s.status == "copied")
    assert copied > 0.5 * sum(s.numel for s in steps)
    counts = {status: sum(s.status == status for s in steps) for status in statuses}
    assert (counts, copied, len(the_plan.dropped)) == (  # the README's figures
        {"copied": 400, "new": 192, "identity-init": 20},
        478_004_484,
        15,
    )
    assert "down_blocks.3.resnets.0" in the_plan.dropped and "up_blocks.0.resnets.0" in the_plan.dropped
    assert any(
        n.startswith("mid_block (mid.resolution half) <- the teacher's mid_block") for n in the_plan.notes
    )


@pytest.mark.parametrize("channels, sliced", [((32, 64, 128), False), ((16, 32, 64), True)])
def test_sd15_structured_teacher_seeds_a_decidiffusion_structured_student(channels, sliced):
    settings = {**SETTINGS, "norm_num_groups": 8}
    t_arch = sd_like((32, 64, 128, 128), settings=settings)
    s_arch = deci_like(channels, settings)
    torch.manual_seed(0)
    teacher, student = build_unet(t_arch), build_unet(s_arch)
    report = inherit(teacher, t_arch, student, s_arch)
    counts = report.counts()
    assert counts["copied"][0] > 0 and counts["identity-init"][0] > 0
    assert (counts["sliced"][0] > 0) == sliced
    assert sum(t for t, _ in counts.values()) == len(student.state_dict())
    assert "| copied |" in report.to_markdown() and "mid_block (mid.resolution half)" in report.to_markdown()
    with torch.no_grad():
        assert torch.isfinite(student(*example_inputs(s_arch)).sample).all()
