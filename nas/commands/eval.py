"""Quality against the number of denoising steps on fixed prompts and seeds: for a model trained on
shapes, prompt alignment (with its chance level) and the domain Frechet distance from the shapes
evaluator; for other data, Inception FID (torchmetrics, Inception weights available locally).
Writes OUT/eval.json, OUT/quality_vs_steps.png and a grid of images per step count."""

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
    evaluator: str | None = arg(None, "shapes evaluator folder (`nas data train-evaluator`)", input="folder")
    out: str | None = arg(None, "output folder (default RUN/eval/<scheduler>-seed<K>)")

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
    )
    for row in report["results"]:
        if report["kind"] == "shapes":
            print(
                f"{row['steps']:>4} steps: alignment {row['alignment']:.3f} (chance {row['chance_alignment']:.3f}),"
                f" Frechet distance {row['frechet_distance']:.2f}, rmse to {steps_list[-1]} steps {row['rmse_to_max']:.4f}"
            )
        else:
            print(
                f"{row['steps']:>4} steps: FID {row['fid']:.2f}, rmse to {steps_list[-1]} steps {row['rmse_to_max']:.4f}"
            )
    if report["kind"] == "shapes":
        ref = report["reference"]
        print(
            f"real images: alignment {ref['real_alignment']:.3f}, Frechet floor {ref.get('fd_real_floor', float('nan')):.2f};"
            f" through the VAE: alignment {ref['vae_alignment']:.3f}, Frechet distance {ref['fd_vae']:.2f}"
        )
    print(f"wrote {out / 'eval.json'} and {out / 'quality_vs_steps.png'}")
    return 0
