"""Inheritance and the guidance embedding (time_embedding.cond_proj): a new one starts at zero, so
the student computes its teacher's function at every guidance weight; one the teacher has is copied."""

from __future__ import annotations

import pytest
import torch

from nas.cost.measure import example_inputs
from nas.models.guidance import guidance_embedding
from nas.space import arch_from_dict, build_unet, load_arch
from nas.teacher.inherit import COND_PROJ, inherit
from tests.fixtures.space import ARCHS


def variant(name: str, dim: int | None, first_channels: int | None = None):
    data = load_arch(ARCHS / f"{name}.yaml").to_data()
    data["settings"]["time_cond_proj_dim"] = dim
    if first_channels is not None:
        data["levels"][0]["channels"] = first_channels
    return arch_from_dict(data)


def pair(teacher_arch, student_arch):
    torch.manual_seed(0)
    teacher = build_unet(teacher_arch).eval()
    if teacher_arch.settings.time_cond_proj_dim is not None:
        torch.nn.init.normal_(teacher.time_embedding.cond_proj.weight)  # a trained guidance embedding
    torch.manual_seed(1)
    student = build_unet(student_arch).eval()
    if student.time_embedding.cond_proj is not None:  # random, so that a zero start is inheritance's
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight)
    return teacher, student, inherit(teacher, teacher_arch, student, student_arch)


def status(report, name: str) -> str:
    return next(step.status for step in report.steps if step.student == name)


@pytest.mark.parametrize("name", ["tiny_stock", "tiny_flex"])
def test_new_guidance_embedding_starts_as_the_teachers_function_at_every_w(name):
    """Classic LCM: the student is the teacher's architecture plus a guidance embedding."""
    t_arch, s_arch = variant(name, None), variant(name, 16)
    teacher, student, report = pair(t_arch, s_arch)
    assert status(report, COND_PROJ) == "identity-init"
    assert not student.time_embedding.cond_proj.weight.any()
    assert any("new guidance embedding (width 16" in note for note in report.notes)
    x, t, text = example_inputs(s_arch, batch=3)
    with torch.no_grad():
        expected = teacher(x, t, text).sample
        for w in ([0.0, 0.0, 0.0], [5.0, 9.5, 15.0], [100.0, 1.0, 42.0]):
            cond = guidance_embedding(torch.tensor(w), 16)
            assert torch.equal(student(x, t, text, timestep_cond=cond).sample, expected), w


def test_a_teachers_guidance_embedding_is_copied_or_sliced():
    t_arch = variant("tiny_stock", 16)
    teacher, student, report = pair(t_arch, variant("tiny_stock", 16))
    assert status(report, COND_PROJ) == "copied"
    assert torch.equal(student.time_embedding.cond_proj.weight, teacher.time_embedding.cond_proj.weight)
    x, t, text = example_inputs(t_arch, batch=2)
    cond = guidance_embedding(torch.tensor([3.0, 12.0]), 16)
    with torch.no_grad():
        assert torch.equal(
            student(x, t, text, timestep_cond=cond).sample, teacher(x, t, text, timestep_cond=cond).sample
        )
    # a narrower first level: the embedding's output rows follow the kept sinusoid features
    _, narrow, report = pair(t_arch, variant("tiny_stock", 16, first_channels=8))
    assert status(report, COND_PROJ) == "sliced" and narrow.time_embedding.cond_proj.weight.shape == (8, 16)


def test_other_width_starts_at_zero_and_a_student_without_one_drops_it():
    _, student, report = pair(variant("tiny_flex", 16), variant("tiny_flex", 32))
    assert status(report, COND_PROJ) == "identity-init" and not student.time_embedding.cond_proj.weight.any()
    assert any("the teacher's: width 16" in note for note in report.notes)
    _, plain, report = pair(variant("tiny_flex", 16), variant("tiny_flex", None))
    assert plain.time_embedding.cond_proj is None and "time_embedding.cond_proj" in report.dropped
    assert any("guidance embedding is dropped" in note for note in report.notes)
