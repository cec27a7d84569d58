"""`nas export-pipeline`: a trained run as a diffusers StableDiffusionPipeline folder.

OUT/ holds unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json (written by
`StableDiffusionPipeline.save_pretrained`, safetensors), plus nas_export.json (where it came from).
It loads offline with `StableDiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` and
takes a plain text prompt:

- the text encoder's config carries `use_attention_mask: true` (BERT-like encoders such as MiniLM
  need the padding masked, as the cache was encoded) and the tokenizer's `model_max_length` is the
  cache's text length, so the pipeline's own tokenization and encoding equal the cache's;
- the VAE's `scaling_factor` is the cache's;
- the scheduler is the run's recipe (betas, zero terminal SNR, prediction type, trailing spacing).

A U-Net of the project's own class (`FlexUNet2DConditionModel`) ships its code: nas/models/flex_unet.py
is copied to unet/flex_unet.py and model_index.json names it `["flex_unet", "FlexUNet2DConditionModel"]`,
diffusers' form for a component's custom class in the component's folder (pipeline_loading_utils.py,
`get_class_obj_and_candidates`), as DeciDiffusion's published pipeline ships its U-Net. So the folder
loads without `nas`, with `trust_remote_code=True` (without it diffusers refuses: "contains custom
code ... Pass `trust_remote_code=True`"). A stock U-Net needs no code, and the flag changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from nas.core.errors import NasError
from nas.core.runfolder import portable, staged_folder, write_json
from nas.models import ship_code
from nas.sample.components import SCHEDULERS, load_run
from nas.sample.generate import SampleSettings, build_pipeline, check_out_folder

EXPORT_INFO = "nas_export.json"


def export_pipeline(
    run: str | Path,
    out: str | Path,
    scheduler: str = "ddim",
    spacing: str = "trailing",
    weights: str = "auto",
) -> dict:
    """Write the run as a pipeline folder at `out` (refused if not empty); return nas_export.json's data.

    The folder is written beside `out` and renamed into place, so an interrupted export leaves no
    half pipeline behind.
    """
    import diffusers

    out = Path(out)
    check_out_folder(out)
    settings = SampleSettings(scheduler=scheduler, spacing=spacing).check()
    components = load_run(run, weights=weights)
    pipe = build_pipeline(components, scheduler, spacing)
    info = {
        "run": portable(run),
        "weights": components.weights,
        "model_sha256": components.model_sha256,
        "unet_class": type(components.unet).__name__,
        "scheduler": scheduler,
        "scheduler_class": SCHEDULERS[scheduler][0],
        "timestep_spacing": spacing,
        "resolution": components.resolution,
        "text_len": components.text_encoder.max_length,
        "text_encoder": components.manifest["text_encoder"],
        "vae": components.manifest["vae"],
        "recipe": components.recipe.model_dump(mode="json"),
        # what `nas sample` uses by default; the pipeline's own defaults are 50 steps, guidance 7.5
        "suggested": {"num_inference_steps": settings.steps, "guidance_scale": settings.guidance},
        "diffusers": diffusers.__version__,
    }
    with staged_folder(out) as staging:  # `out` is absent or empty (checked above)
        pipe.save_pretrained(staging, safe_serialization=True)
        info["unet_code"] = _ship_unet_code(type(components.unet), staging)
        write_json(staging / EXPORT_INFO, info)
        _check_folder(staging)
    return info


def _ship_unet_code(cls: type, folder: Path) -> str | None:
    """unet/MODULE.py and model_index.json's `"unet": [MODULE, CLASS]` for a class of nas.models;
    return the file's path in the folder, or None for a diffusers class."""
    module = ship_code(cls, folder / "unet")
    if module is None:
        return None
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["unet"] = [module, cls.__name__]
    write_json(index_file, index, sort_keys=True)  # diffusers writes it sorted, indent 2
    return f"unet/{module}.py"


def _check_folder(folder: Path) -> None:
    """What from_pretrained will need is there, in safetensors (no pickle files)."""
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / name).is_dir() or index.get(name, [None])[0] is None:
            raise NasError(
                f"{folder}: export is missing {name}/ (diffusers {index.get('_diffusers_version')})"
            )
    library, class_name = index["unet"]
    if library != "diffusers" and not (folder / "unet" / f"{library}.py").is_file():
        raise NasError(f"{folder}: model_index.json names unet/{library}.py for {class_name}, not written")
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.bin"))
    if pickles:
        raise NasError(f"{folder}: export wrote pickle files {pickles}; expected safetensors only")
