"""Export a trained run as a diffusers StableDiffusionPipeline folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json; safetensors; a FlexUNet's code in unet/flex_unet.py) that
`StableDiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` loads offline without `nas`
and runs with a plain text prompt, giving the images `nas sample` gives. README.md is a model card
with the Hugging Face Hub's metadata: the folder is what `huggingface_hub.upload_folder` takes."""

from __future__ import annotations

from pathlib import Path

from nas.commands.sample import Scheduler, Spacing, Weights
from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("export-pipeline",)
    run: str = arg(help="run folder of `nas train` (config.yaml, final/unet_ema/)", positional=True)
    out: str = arg(help="pipeline folder to write (must be new or empty)")
    scheduler: Scheduler = arg("ddim", "scheduler saved in the folder")
    spacing: Spacing = arg("trailing", "timestep grid")
    weights: Weights = arg("auto", "auto (EMA if the run has it), ema or raw")
    search_card: str | None = arg(
        None,
        "`nas export`'s card.json whose measured latency goes into the model card (README.md); default:"
        " RESULTS/<experiment>/export/card.json when RUN is a `nas run` training",
        input="file",
    )
    eval: str | None = arg(
        None,
        "`nas eval`'s eval.json whose figures go into the model card; default: RESULTS/<experiment>/"
        "evaluate/eval/eval.json when RUN is a `nas run` training",
        input="file",
    )


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.sample import export_pipeline

    out = Path(settings.out)
    from nas.sample.card import write_model_card

    info = export_pipeline(Path(settings.run), out, settings.scheduler, settings.spacing, settings.weights)
    search_card = Path(settings.search_card) if settings.search_card else None
    eval_report = Path(settings.eval) if settings.eval else None
    write_model_card(out, Path(settings.run), info, search_card, eval_report)  # README.md: the Hub's card
    trust = ", trust_remote_code=True" if info["unet_code"] else ""  # code shipped in unet/
    print(
        f"exported {info['unet_class']} ({info['weights']} weights) with {info['scheduler_class']} to {out};"
        f" load with StableDiffusionPipeline.from_pretrained({str(out)!r}{trust})"
    )
    return 0
