"""Weight inheritance (nas/teacher/inherit.py, inherit_plan.py, teacher.py; `nas inherit`)."""

import json

import pytest
import torch

from nas.cli import main
from nas.core.errors import NasError
from nas.cost.measure import example_inputs
from nas.space import build_unet, load_arch
from nas.space.build import arch_from_dict, flex_config, stock_config
from nas.teacher.arch import arch_from_unet_config, load_teacher
from nas.teacher.inherit import inherit, keep_down, keep_up, plan, tensor_plan
from tests.fixtures.space import ARCHS

SMALL = {"latent_size": 16, "cross_attention_dim": 32, "norm_num_groups": 8, "text_len": 4}


def sd_like(channels=(32, 64, 64, 64), resnets=2, mid=True, levels=4, settings=None, heads=8):
    """SD 1.5's structure (cross-attention on all but the innermost level) at any width; the BK-SDM
    students are resnets=1 (Base), + mid=False (Small), + levels=3 (Tiny)."""
    lv = [
        {"channels": channels[i], "resnets": resnets, "attentions": resnets if i < 3 else 0,
         "up_attentions": resnets + 1 if i < 3 else 0, "heads": heads}
        for i in range(levels)
    ]  # fmt: skip
    s = SMALL if settings is None else settings
    mid_block = {"resnets": 2, "attentions": 1} if mid else None
    return arch_from_dict({"name": "sd", "settings": s, "levels": lv, "mid": mid_block})


def tiny(levels, mid=(2, 1)):
    """levels: (channels, resnets, attentions, up_attentions) per level, 2 heads each."""
    lv = [
        {"channels": c, "resnets": r, "attentions": a, "up_attentions": u, "heads": 2}
        for c, r, a, u in levels
    ]
    s = {**SMALL, "latent_size": 8}
    mid_block = None if mid is None else {"resnets": mid[0], "attentions": mid[1]}
    return arch_from_dict({"name": "t", "settings": s, "levels": lv, "mid": mid_block})


BK = {
    "base": {"resnets": 1},
    "small": {"resnets": 1, "mid": False},
    "tiny": {"resnets": 1, "mid": False, "levels": 3},
}


# ---- selection rules (no weights) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, n, k, expected",
    [
        (keep_down, 2, 1, [0]),  # BK-SDM down path: the first of two
        (keep_down, 2, 2, [0, 1]),
        (keep_down, 3, 1, [0]),
        (keep_down, 1, 3, [0, None, None]),  # deeper: new identities after the teacher's
        (keep_up, 3, 2, [0, 2]),  # BK-SDM up path: student resnets.1 <- teacher resnets.2
        (keep_up, 3, 3, [0, 1, 2]),
        (keep_up, 4, 3, [0, 1, 3]),
        (keep_up, 4, 2, [0, 3]),
        (keep_up, 2, 4, [0, None, None, 1]),  # deeper: new layers right after the first
        (keep_up, 3, 4, [0, None, 1, 2]),
        (keep_up, 1, 2, [0, None]),
    ],
)
def test_selection_rules(rule, n, k, expected):
    assert rule(n, k) == expected


# BK-SDM's copy_weight_from_teacher (src/kd_train_text_to_image.py): student prefix -> teacher prefix;
# every other student layer copies the teacher layer of the same name.
BK_FORCED = {
    "base": {
        f"up_blocks.{u}.{m}.1": f"up_blocks.{u}.{m}.2"
        for u in range(4)
        for m in ("resnets", "attentions")
        if (u, m) != (0, "attentions")
    },
    "tiny": {
        **{
            f"up_blocks.{u}.resnets.{j}": f"up_blocks.{u + 1}.resnets.{2 * j}"
            for u in range(3)
            for j in (0, 1)
        },
        **{
            f"up_blocks.{u}.attentions.{j}": f"up_blocks.{u + 1}.attentions.{2 * j}"
            for u in range(3)
            for j in (0, 1)
        },
        **{f"up_blocks.{u}.upsamplers.0": f"up_blocks.{u + 1}.upsamplers.0" for u in range(2)},
    },
}
BK_FORCED["small"] = BK_FORCED["base"]


@pytest.mark.parametrize("student", list(BK))
def test_bk_sdm_students_map_as_bk_sdm_does(student):
    the_plan = plan(sd_like(), sd_like(**BK[student]))
    mapping = {u.student: u.teacher for u in the_plan.units}
    for s, t in mapping.items():
        assert t == BK_FORCED[student].get(s, s), s
    # one transformer layer each, copied from the transformer it maps to
    assert all(u.blocks in ([], [f"{u.teacher}.transformer_blocks.0"]) for u in the_plan.units)
    if student != "base":
        assert "mid_block.resnets.0" in the_plan.dropped and "mid_block" not in mapping


@pytest.mark.parametrize("student", list(BK))
def test_plan_covers_every_tensor_at_full_sd_size(student):
    sd15 = load_arch(ARCHS / "sd15.yaml")
    bk = sd_like((320, 640, 1280, 1280), settings=sd15.settings.model_dump(), **BK[student])
    t_shapes = {k: v.shape for k, v in build_unet(sd15, device="meta").state_dict().items()}
    s_shapes = {k: v.shape for k, v in build_unet(bk, device="meta").state_dict().items()}
    the_plan = plan(sd15, bk)
    steps = tensor_plan(the_plan, s_shapes, t_shapes, "slice")
    assert {s.student for s in steps} == set(s_shapes)
    assert all(s.status == "copied" for s in steps)  # BK students are SD with blocks removed
    used = {s.teacher for s in steps}
    unused = set(t_shapes) - used
    assert unused and all(any(k.startswith(d + ".") for d in the_plan.dropped) for k in unused)
    assert not any(k.startswith(d + ".") for d in the_plan.dropped for k in used)


def test_a_level_the_teacher_lacks_is_refused():
    with pytest.raises(NasError, match=r"levels\.3: the teacher has no level"):
        plan(sd_like(levels=3), sd_like())
    with pytest.raises(NasError, match=r"settings\.cross_attention_dim"):
        plan(sd_like(), sd_like(settings={**SMALL, "cross_attention_dim": 64}))


def test_a_half_mid_below_every_teacher_block_is_refused_by_name():
    """The one layout combination inheritance refuses (tests/teacher/test_inherit_layouts.py: the others)."""
    data = sd_like(levels=3).to_data()
    data["mid"] = {**data["mid"], "resolution": "half"}
    with pytest.raises(NasError, match=r"^mid\.resolution: the student's is 'half'.*allowed: 'same'"):
        plan(sd_like(levels=3), arch_from_dict(data))
    plan(arch_from_dict(data), sd_like(levels=3))  # the other way round: a new mid block
    plan(sd_like(levels=4), arch_from_dict(data))  # SD's mid block sits where the half one works


# ---- weights -------------------------------------------------------------------------------------


def _outputs(teacher, student, arch):
    inputs = example_inputs(arch, batch=2)
    with torch.no_grad():
        return teacher.eval()(*inputs).sample, student.eval()(*inputs).sample


@pytest.mark.parametrize("force_flex", [False, True])
def test_same_layout_gives_identical_outputs(force_flex):
    arch = sd_like((16, 32, 32, 32), resnets=1)
    torch.manual_seed(0)
    teacher = build_unet(arch)
    torch.manual_seed(1)
    student = build_unet(arch, force_flex=force_flex)
    report = inherit(teacher, arch, student, arch)
    assert report.counts()["copied"][0] == len(student.state_dict()) and not report.dropped
    a, b = _outputs(teacher, student, arch)
    assert torch.equal(a, b)


IDENTITY_CASES = {  # student layers that the teacher's layers are a subset of
    "transformer where the teacher has none": [(16, 1, 1, 2), (32, 1, 1, 1)],
    "deeper levels": [(16, 2, 2, 3), (32, 3, 0, 0)],
    "deeper transformers": [(16, 1, 2, 4), (32, 1, 0, 0)],
}


@pytest.mark.parametrize("case", [*IDENTITY_CASES, "a mid block", "all at once"])
def test_identity_init_keeps_the_teachers_function(case):
    t_arch = tiny([(16, 1, 1, 2), (32, 1, 0, 0)], mid=None)
    if case == "a mid block":
        s_arch = tiny([(16, 1, 1, 2), (32, 1, 0, 0)], mid=(2, 1))
    elif case == "all at once":
        s_arch = tiny([(16, 3, 3, 5), (32, 2, 2, 3)], mid=(1, 2))
    else:
        s_arch = tiny(IDENTITY_CASES[case], mid=None)
    torch.manual_seed(0)
    teacher = build_unet(t_arch)
    student = build_unet(s_arch)
    report = inherit(teacher, t_arch, student, s_arch)
    assert report.counts()["identity-init"][0] > 0 and report.counts()["sliced"][0] == 0
    a, b = _outputs(teacher, student, s_arch)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_slicing_keeps_the_strongest_channels_consistently():
    t_arch, s_arch = sd_like((16, 32, 32, 32), resnets=1), sd_like((8, 16, 16, 16), resnets=1)
    torch.manual_seed(0)
    teacher, student = build_unet(t_arch), build_unet(s_arch)
    strong = torch.tensor([1, 4, 6, 9, 10, 12, 13, 15])  # make these level-0 channels the loudest writers
    teacher.state_dict()["conv_in.weight"][strong] *= 1000
    report = inherit(teacher, t_arch, student, s_arch)
    counts = report.counts()
    assert counts["sliced"][0] > 0 and counts["new"][0] == 0 and counts["identity-init"][0] == 0
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["conv_in.weight"], t["conv_in.weight"][strong])
    # the same channels everywhere level 0's stream is read or written
    assert torch.equal(s["conv_norm_out.weight"], t["conv_norm_out.weight"][strong])
    assert torch.equal(s["conv_out.weight"], t["conv_out.weight"][:, strong])
    assert torch.equal(
        s["down_blocks.0.resnets.0.norm1.weight"], t["down_blocks.0.resnets.0.norm1.weight"][strong]
    )
    # input [level-0 stream, conv_in skip]: both parts keep the same channels; output: its own hidden
    # channels, a subset of the teacher's filters in their order
    up = "up_blocks.3.resnets.1.conv1.weight"
    t_in = t[up].index_select(1, torch.cat([strong, 16 + strong]))
    rows = [
        next(r for r in range(t_in.shape[0]) if torch.equal(t_in[r], s[up][i])) for i in range(s[up].shape[0])
    ]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    out = _outputs(teacher, student, s_arch)[1]
    assert torch.isfinite(out).all()


def test_fresh_and_wider_students():
    t_arch, narrow = sd_like((16, 32, 32, 32), resnets=1), sd_like((8, 16, 16, 16), resnets=1)
    teacher, student = build_unet(t_arch), build_unet(narrow)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit(teacher, t_arch, student, narrow, narrow="fresh")
    assert report.counts()["sliced"][0] == 0 and report.counts()["new"][0] > 0
    for step in report.steps:
        if step.status == "new":
            assert torch.equal(student.state_dict()[step.student], before[step.student])
    with pytest.raises(NasError, match="wider than its teacher"):
        inherit(student, narrow, build_unet(t_arch), t_arch)


# ---- teacher configs -----------------------------------------------------------------------------


def test_sd15_config_round_trips():
    sd15 = load_arch(ARCHS / "sd15.yaml")
    assert arch_from_unet_config(stock_config(sd15), name="sd15") == sd15
    full = dict(build_unet(sd15, device="meta").config)  # every key diffusers writes to config.json
    assert arch_from_unet_config(json.loads(json.dumps(full)), name="sd15") == sd15


@pytest.mark.parametrize("name", ["decidiffusion_v1", "tiny_flex", "tiny_stock", "sd15_small"])
def test_configs_round_trip(name):
    arch = load_arch(ARCHS / f"{name}.yaml")
    config = {"_class_name": "FlexUNet2DConditionModel", **flex_config(arch)}
    back = arch_from_unet_config(config, name=arch.name)
    assert stock_config(back) == stock_config(arch) and flex_config(back) == flex_config(arch)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"upcast_attention": True}, "upcast_attention=True cannot be expressed"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        (
            {
                "transformer_layers_per_block": [[1, 2]] + [[1, 1]] * 3,
                "reverse_transformer_layers_per_block": [[1] * 3] * 4,
            },
            r"per-ResNet depths \[1, 2\] cannot be expressed",
        ),
        ({"transformer_layers_per_block": [[1, 1]] * 4}, "reverse_transformer_layers_per_block is required"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"transformer_layers_per_block": 2}, "transformer_layers_per_block 2 in the mid block"),
        ({"out_channels": 8}, "out_channels=8"),
        ({"_class_name": "UNet2DModel"}, "not a U-Net class of nas"),
        ({"block_out_channels": None}, "malformed"),
    ],
)
def test_inexpressible_configs_are_refused(change, needle):
    config = {**stock_config(load_arch(ARCHS / "sd15.yaml")), **change}
    with pytest.raises(NasError, match=needle):
        arch_from_unet_config(config, source="T/config.json")


def _save(arch, folder, seed=0):
    torch.manual_seed(seed)
    model = build_unet(arch)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_teacher_folders(tmp_path):
    arch = load_arch(ARCHS / "tiny_stock.yaml")
    model = _save(arch, tmp_path / "pipe" / "unet")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}\n")  # load_teacher reads weights + arch.yaml only
    _save(arch, tmp_path / "run" / "final" / "unet_ema")
    (tmp_path / "run" / "arch.yaml").write_text((ARCHS / "tiny_stock.yaml").read_text())
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "unet", tmp_path / "run"):
        teacher, t_arch = load_teacher(path)
        assert stock_config(t_arch) == stock_config(arch)
        assert torch.equal(teacher.state_dict()["conv_in.weight"], model.state_dict()["conv_in.weight"])
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    for path, needle in [
        (tmp_path / "none", "teacher folder not found"),
        (tmp_path / "run" / "final", "no U-Net in the teacher folder"),
        (tmp_path / "pipe", "no \\*.safetensors"),
    ]:
        with pytest.raises(NasError, match=needle):
            load_teacher(path)


def test_cli_writes_a_loadable_student_and_nothing_on_error(tmp_path, capsys):
    teacher_arch = load_arch(ARCHS / "tiny_stock.yaml")
    _save(teacher_arch, tmp_path / "teacher")
    student_yaml = tmp_path / "student.yaml"
    data = teacher_arch.to_data()
    data["name"], data["mid"] = "student", None
    data["levels"][1]["channels"] = 16
    import yaml

    student_yaml.write_text(yaml.safe_dump(data))
    argv = ["inherit", "--teacher", str(tmp_path / "teacher"), "--arch", str(student_yaml)]
    assert main([*argv, "--out", str(tmp_path / "dry"), "--dry-run"]) == 0 and not (tmp_path / "dry").exists()
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("inherited student") and "sliced" in line
    student = build_unet(load_arch(tmp_path / "out" / "arch.yaml"))
    loaded = type(student).from_pretrained(tmp_path / "out")
    assert "| sliced |" in (tmp_path / "out" / "inherit.md").read_text()
    assert loaded.config.block_out_channels == [16, 16]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "settings": {**data["settings"], "cross_attention_dim": 32}}))
    argv = ["inherit", "--teacher", str(tmp_path / "teacher"), "--arch", str(bad)]
    assert main([*argv, "--out", str(tmp_path / "o2")]) == 2
    assert "cross_attention_dim" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_a_shallower_transformer_keeps_the_first_layers():
    t_arch, s_arch = tiny([(16, 1, 2, 4), (32, 1, 0, 0)]), tiny([(16, 1, 1, 2), (32, 1, 0, 0)])
    the_plan = plan(t_arch, s_arch)
    units = [u for u in the_plan.units if u.kind == "attention"]
    assert [u.blocks for u in units] == [[f"{u.teacher}.transformer_blocks.0"] for u in units] and len(
        units
    ) == 4
    assert "down_blocks.0.attentions.0.transformer_blocks.1" in the_plan.dropped
    teacher, student = build_unet(t_arch), build_unet(s_arch)
    assert inherit(teacher, t_arch, student, s_arch).counts()["copied"][0] == len(student.state_dict())
