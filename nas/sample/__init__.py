"""Sampling from trained runs and diffusers pipeline export (on diffusers' StableDiffusionPipeline)."""

from nas.models.load import WEIGHTS
from nas.sample.components import (
    SCHEDULERS,
    SPACINGS,
    RunComponents,
    held_out_captions,
    load_run,
    make_scheduler,
    read_prompts,
)
from nas.sample.export import export_pipeline
from nas.sample.generate import (
    SampleSettings,
    build_pipeline,
    generate,
    image_grid,
    jobs_for,
    sample_run,
    to_uint8,
    write_samples,
)

__all__ = [
    "SCHEDULERS",
    "SPACINGS",
    "WEIGHTS",
    "RunComponents",
    "SampleSettings",
    "build_pipeline",
    "export_pipeline",
    "generate",
    "held_out_captions",
    "image_grid",
    "jobs_for",
    "load_run",
    "make_scheduler",
    "read_prompts",
    "sample_run",
    "to_uint8",
    "write_samples",
]
