"""The hand-designed students shipped in search_spaces/archs/ follow their papers' rules, as
`nas inherit --dry-run` shows: BK-SDM (Kim et al. 2023) Base keeps the first ResNet (+ transformer)
of each down stage and the first and last of each up stage, Small also drops the mid block, Tiny
also the innermost stage pair; the DeciDiffusion-like layout runs its mid block one resolution
lower with the teacher's upsampler. At the quickstart's scale (teacher quickstart_baseline) and at
SD's (teacher sd15). Dry runs read configs only: the teacher folders hold a config and no weights."""

from __future__ import annotations

import json

import pytest

from nas.cli import main
from nas.space import load_arch, unet_config
from tests.fixtures.space import ARCHS


def teacher_folder(tmp_path, name: str):
    """A diffusers U-Net folder of archs/<name>.yaml: config.json and an (unread) weights file."""
    folder = tmp_path / name
    folder.mkdir()
    _, config = unet_config(load_arch(ARCHS / f"{name}.yaml"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # a dry run reads no weights
    return folder


def dry_run(capsys, teacher, student: str) -> dict:
    assert main(["inherit", "--teacher", str(teacher), "--arch", str(ARCHS / f"{student}.yaml"),
                 "--out", "unused", "--dry-run"]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def sources(plan: dict, block: str) -> dict[str, str]:
    """student module (relative to `block`) -> teacher module, for one block of the plan."""
    pairs = (line.split(" <- ") for line in plan["mapping"])
    return {s[len(block) + 1 :]: t for s, t in pairs if s.startswith(block + ".")}


SCALES = [("quickstart_baseline", "quickstart_bksdm_"), ("sd15", "bksdm_")]


@pytest.mark.parametrize(("teacher", "prefix"), SCALES, ids=["quickstart", "sd"])
def test_bksdm_rules(teacher, prefix, tmp_path, capsys):
    folder = teacher_folder(tmp_path, teacher)
    levels = len(load_arch(ARCHS / f"{teacher}.yaml").levels)
    base = dry_run(capsys, folder, prefix + "base")
    for i in range(levels):
        down = sources(base, f"down_blocks.{i}")
        assert {k: v for k, v in down.items() if ".resnets." in f".{k}"} == {
            "resnets.0": f"down_blocks.{i}.resnets.0"
        }  # one ResNet fewer: the first kept
        assert set(v for k, v in down.items() if k.startswith("attentions")) <= {
            f"down_blocks.{i}.attentions.0"
        }
        up = sources(base, f"up_blocks.{i}")
        assert up["resnets.0"] == f"up_blocks.{i}.resnets.0" and up["resnets.1"] == f"up_blocks.{i}.resnets.2"
        assert "resnets.2" not in up  # the middle of the 3 dropped: first and last kept
    assert sources(base, "mid_block") and "new" not in " ".join(base["mapping"])
    assert not base["notes"]

    small = dry_run(capsys, folder, prefix + "small")
    assert not sources(small, "mid_block") and "mid_block.resnets.0" in small["dropped"]
    assert small["mapping"] == [line for line in base["mapping"] if not line.startswith("mid_block")]

    tiny = dry_run(capsys, folder, prefix + "tiny")
    inner = levels - 1  # the innermost stage pair (down level `inner`, its up block 0) goes
    assert not sources(tiny, f"down_blocks.{inner}") and f"down_blocks.{inner}.resnets.0" in tiny["dropped"]
    assert "up_blocks.0.resnets.0" in tiny["dropped"]  # the teacher's innermost up block
    assert sources(tiny, "up_blocks.0")["resnets.0"] == "up_blocks.1.resnets.0"  # next stage up


def test_decidiffusion_like_layout_at_the_quickstart_scale(tmp_path, capsys):
    arch = load_arch(ARCHS / "quickstart_decidiffusion.yaml")
    assert arch.attention_layout == "interleaved" and arch.mid.resolution == "half"
    assert unet_config(arch)[0] == "FlexUNet2DConditionModel"
    plan = dry_run(capsys, teacher_folder(tmp_path, "quickstart_baseline"), "quickstart_decidiffusion")
    mid = sources(plan, "mid_block")
    # the mid block at 2x2, where the teacher's innermost stage and mid block were: its ResNets and
    # transformer from the teacher's mid block, its upsampler from the teacher's innermost up block
    assert mid["resnets.0"] == "mid_block.resnets.0" and mid["upsamplers.0"] == "up_blocks.0.upsamplers.0"
    assert "down_blocks.2.resnets.0" in plan["dropped"]  # the innermost stage pair is gone
