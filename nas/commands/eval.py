"""Quality against the number of denoising steps on fixed prompts and seeds: prompt alignment (with
its chance level) and a Frechet distance in the evaluator's feature space, from a shapes evaluator
or, for any other captioned data, a contrastive one (`nas data train-evaluator --cache`); where the
weights are on disk, also CLIP alignment and score (--clip) and Inception FID (--fid-weights).
Nothing is downloaded. Writes OUT/eval.json, OUT/quality_vs_steps.png and a grid per step count."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from nas.commands.sample import MAX_IMAGES, MAX_STEPS, Sampling, check_device
from nas.core.settings import arg, comma_list


class Settings(Sampling):
    command = ("eval",)
    run: str = arg(help="run folder of `nas train`", positional=True)
    steps: list[int] = arg(
        [10, 20, 30, 50], "step counts, comma- or space-separated", min_length=1, max_length=64
    )
    n: int = arg(200, "images per step count: prompts x 1 seed each", ge=2, le=MAX_IMAGES)
    evaluator: str | None = arg(
        None,
        "evaluator folder of `nas data train-evaluator` (shapes, or --cache: contrastive)",
        input="folder",
    )
    clip: str | None = arg(None, "local CLIP model folder (CLIPModel, loaded offline): CLIP alignment and score",
                           input="folder")  # fmt: skip
    fid_weights: str | None = arg(None, "Inception weights file for FID (torchmetrics + torch-fidelity, offline)",
                                  input="file")  # fmt: skip
    k: int = arg(8, "alignment by retrieval: prompts each image is ranked among, its own included (chance 1/K)",
                 ge=2, le=1000)  # fmt: skip
    out: str | None = arg(None, "output folder (default RUN/eval/<scheduler>-seed<K>)")
    lora: str | None = arg(None, "LoRA to apply: a `lora:` run of nas train, or a folder with pytorch_lora_weights.safetensors",
                           input="folder")  # fmt: skip
    lora_scale: float = arg(1.0, "strength of --lora (1 = as trained, 0 = none)", ge=-10, le=10)
    controlnet: str | None = arg(None, "ControlNet to steer with (a `controlnet:` run of nas train); shapes runs: "
                                 "each prompt's control image is drawn from its validation record", input="folder")  # fmt: skip
    controlnet_scale: float = arg(1.0, "strength of --controlnet (1 = as trained, 0 = none)", ge=-10, le=10)

    _commas = comma_list("steps")

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if any(s < 1 or s > MAX_STEPS for s in value):
            raise ValueError(f"every step count must be in 1..{MAX_STEPS}")
        return sorted(set(value))


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.evaluate.quality import evaluate_run
    from nas.sample.components import lora_choice
    from nas.sample.controlnet import controlnet_choice
    from nas.sample.timing import split_line

    steps_list = settings.steps
    sampling = settings.sample_settings(steps_list[-1])
    check_device(settings.device)
    run_dir = Path(settings.run)
    out = (
        Path(settings.out) if settings.out else run_dir / "eval" / f"{settings.scheduler}-seed{settings.seed}"
    )
    report = evaluate_run(
        run_dir,
        out,
        steps_list,
        settings.n,
        sampling,
        evaluator_path=settings.evaluator and Path(settings.evaluator),
        seed=settings.seed,
        weights=settings.weights,
        device=settings.device,
        progress=not settings.quiet,
        lora=lora_choice(settings.lora, settings.lora_scale),
        controlnet=controlnet_choice(settings.controlnet, settings.controlnet_scale),
        clip=settings.clip,
        fid_weights=settings.fid_weights,
        k=settings.k,
    )
    for row in report["results"]:
        parts = []
        if "alignment" in row:
            parts.append(f"alignment {row['alignment']:.3f} (chance {row['chance_alignment']:.3f})")
            parts.append(f"Frechet distance {row['frechet_distance']:.2f}")
        parts += [f"{name} {row[key]:.3f}" for key, name in (("clip_alignment", "CLIP alignment"),
                                                              ("clip_score", "CLIP score"), ("fid", "FID")) if key in row]  # fmt: skip
        print(
            f"{row['steps']:>4} steps: {', '.join(parts)}, rmse to {steps_list[-1]} steps {row['rmse_to_max']:.4f}"
        )
        if "split" in row:
            print(f"           {split_line(row['split'])}")
        attrs = row.get("alignment_by_attribute", {})
        if report.get("controlnet") and "position" in attrs:  # what a ControlNet steers
            print(
                f"           with the ControlNet: position {attrs['position']:.3f}, size {attrs['size']:.3f}"
            )
    ref = report["reference"]
    if "real_alignment" in ref:
        retrieval = ref.get("retrieval")
        among = f" (own prompt first among K={retrieval['k']})" if retrieval else ""
        print(
            f"real images: alignment {ref['real_alignment']:.3f}{among}, Frechet floor {ref.get('fd_real_floor', float('nan')):.2f};"
            f" through the VAE: alignment {ref['vae_alignment']:.3f}, Frechet distance {ref['fd_vae']:.2f}"
        )
    print(f"wrote {out / 'eval.json'} and {out / 'quality_vs_steps.png'}")
    return 0
