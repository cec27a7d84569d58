"""Datasets: write the embedded `shapes` dataset, train the evaluator `nas eval` scores images with.

nas data shapes --out DIR --n 2000             DIR/train and DIR/validation, image folders with
                                               metadata.jsonl (caption + labels), same seed = same bytes
nas data train-evaluator --out DIR [--data D]  shapes classifier for prompt alignment and a Frechet
                                               distance; validation accuracy on D/validation (or
                                               generated scenes)
nas data train-evaluator --out DIR --cache C   any captioned data: an image encoder trained
                                               contrastively against the cache's caption states, on
                                               the images the cache was made from; retrieval of the
                                               held-out items' captions is its validation
"""

from __future__ import annotations

import os
from pathlib import Path

from nas.core.settings import CommandSettings, arg

MAX_IMAGES = 10_000_000  # generated images; more is a typo (each is held in memory or on disk)
MAX_SIZE = 1024  # pixels per side


class ShapesSettings(CommandSettings):
    """write the procedurally generated captioned dataset"""

    command = ("data", "shapes")
    out: str = arg(help="new folder to write (refused if not empty)")
    n: int = arg(help="number of images, train + validation", ge=10, le=MAX_IMAGES)
    size: int = arg(32, "image side in pixels", ge=8, le=MAX_SIZE)
    seed: int = arg(0, "dataset seed; same seed, same bytes", ge=0)
    val_fraction: float = arg(0.1, "share of scenes held out", gt=0, lt=1)


class EvaluatorSettings(CommandSettings):
    """train the evaluator nas eval scores with: shapes, or any captioned data with --cache"""

    command = ("data", "train-evaluator")
    out: str = arg(help="new folder for evaluator.json + .safetensors")
    data: str | None = arg(None, "shapes folder whose validation split measures accuracy", input="folder")
    cache: str | None = arg(
        None, "latent cache of `nas precompute`: train the contrastive evaluator on its items", input="folder"
    )
    size: int | None = arg(
        None, "image side in pixels (default 32; with --cache the cache's)", ge=8, le=MAX_SIZE
    )
    steps: int | None = arg(None, "optimizer steps (default 2500; with --cache 1000)", ge=1, le=1_000_000)
    train_images: int | None = arg(
        None, "generated training images, shapes only (default 20000)", ge=1, le=MAX_IMAGES
    )
    val_items: int = arg(
        64, "with --cache: last items held out, as `nas train` holds them out", ge=1, le=MAX_IMAGES
    )
    seed: int = arg(1, "training seed", ge=0)


SETTINGS = {"shapes": ShapesSettings, "train-evaluator": EvaluatorSettings}


def _evaluator_config(settings: EvaluatorSettings):
    from nas.core.config import validate
    from nas.core.errors import NasError

    if settings.cache is None:
        from nas.evaluate import shapes_evaluator as ev

        values = {"resolution": settings.size, "steps": settings.steps, "train_images": settings.train_images}
        values = {k: v for k, v in values.items() if v is not None}
        return validate(ev.EvaluatorConfig, {**values, "seed": settings.seed}, "command line")
    from nas.evaluate import contrastive_evaluator as ce

    for flag, value in (
        ("--data", settings.data),
        ("--size", settings.size),
        ("--train-images", settings.train_images),
    ):
        if value is not None:
            raise NasError(f"{flag}: not with --cache (the contrastive evaluator trains on the cache's items, "
                           "at the cache's resolution)")  # fmt: skip
    values = {"val_items": settings.val_items, "seed": settings.seed}
    if settings.steps is not None:
        values["steps"] = settings.steps
    return validate(ce.ContrastiveConfig, values, "command line")


def dry_run(settings) -> dict:
    if isinstance(settings, EvaluatorSettings):
        return {"resolved_config": _evaluator_config(settings).model_dump(mode="json")}
    return {}


def run(settings) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if isinstance(settings, ShapesSettings):
        from nas.data import shapes

        info = shapes.write(settings.out, settings.n, settings.size, settings.seed, settings.val_fraction)
        splits = ", ".join(f"{n} {s}" for s, n in info["splits"].items())
        print(f"wrote {settings.n} images ({splits}) to {settings.out}")
        return 0
    return _train_evaluator(settings)


def _train_evaluator(settings: EvaluatorSettings) -> int:
    from nas.core.errors import NasError
    from nas.evaluate import shapes_evaluator as ev

    config = _evaluator_config(settings)
    out = Path(settings.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NasError(f"{out}: exists and is not empty; choose a new --out (nothing was written)")
    if settings.cache is not None:
        return _train_contrastive(settings, config, out)
    val = _validation_split(Path(settings.data), config.resolution) if settings.data else None
    evaluator, metrics = ev.train_evaluator(config, val)
    ev.save_evaluator(evaluator, out)
    accuracy = ", ".join(f"{k} {v:.3f}" for k, v in metrics["val_accuracy"].items())
    print(
        f"evaluator: validation alignment {metrics['val_alignment']:.4f} on {metrics['val_images']} images "
        f"({accuracy}; exact scenes {metrics['val_exact_scene']:.3f}); saved to {out}"
    )
    return 0


def _train_contrastive(settings: EvaluatorSettings, config, out: Path) -> int:
    from nas.data.cache import open_cache
    from nas.evaluate import contrastive_evaluator as ce

    assert settings.cache is not None  # the caller's branch
    cache = open_cache(settings.cache)
    evaluator, m = ce.train_contrastive(cache, config)
    ce.save_evaluator(evaluator, out, cache_path=cache.path)
    print(
        f"evaluator: held-out retrieval {m['val_alignment']:.3f} (own caption first among K={m['val_alignment_k']}, "
        f"chance {m['val_chance_alignment']:.3f}; among all {m['val_distinct_prompts']} distinct captions "
        f"{m['val_top1_all']:.3f}) on {m['val_items']} items; training items {m['train_alignment']:.3f}; saved to {out}"
    )
    return 0


def _validation_split(data: Path, size: int):
    """Images in [0, 1] and labels of DATA/validation (or DATA itself if it is one split)."""
    from nas.core.errors import NasError
    from nas.data.folders import METADATA, load_images, open_source

    folder = data / "validation" if (data / "validation" / METADATA).is_file() else data
    source = open_source(folder)
    if "objects" not in source.entries[0].record:
        raise NasError(f"{folder / METADATA}: no 'objects' labels; the evaluator needs a shapes dataset")
    images, kept, _ = load_images(source, size)
    return (images + 1) / 2, [source.entries[i].record for i in kept]
