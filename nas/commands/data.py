"""Datasets: write the embedded `shapes` dataset, train the evaluator that reads its images.

nas data shapes --out DIR --n 2000             DIR/train and DIR/validation, image folders with
                                               metadata.jsonl (caption + labels), same seed = same bytes
nas data train-evaluator --out DIR [--data D]  classifier for prompt alignment and a Frechet distance;
                                               validation accuracy on D/validation (or generated scenes)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage table above
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = sub.add_parser("shapes", help="write the procedurally generated captioned dataset")
    p.add_argument("--out", type=Path, required=True, help="new folder to write (refused if not empty)")
    p.add_argument("--n", type=int, required=True, help="number of images, train + validation")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; same seed, same bytes (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of scenes held out (default 0.1)")

    p = sub.add_parser("train-evaluator", help="train the shapes evaluator (alignment + features)")
    p.add_argument("--out", type=Path, required=True, help="new folder for evaluator.json + .safetensors")
    p.add_argument("--data", type=Path, help="shapes folder whose validation split measures accuracy")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps (default 2500)")
    p.add_argument(
        "--train-images", type=int, default=20000, help="generated training images (default 20000)"
    )
    p.add_argument("--seed", type=int, default=1, help="training seed (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.data_command == "shapes":
        from nas.data import shapes

        info = shapes.write(args.out, args.n, args.size, args.seed, args.val_fraction)
        splits = ", ".join(f"{n} {s}" for s, n in info["splits"].items())
        print(f"wrote {args.n} images ({splits}) to {args.out}")
        return 0
    return _train_evaluator(args)


def _train_evaluator(args) -> int:
    from nas.config import validate
    from nas.errors import NasError
    from nas.evaluate import shapes_evaluator as ev

    config = validate(
        ev.EvaluatorConfig,
        {"resolution": args.size, "steps": args.steps, "train_images": args.train_images, "seed": args.seed},
        "command line",
    )
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise NasError(f"{args.out}: exists and is not empty; choose a new --out (nothing was written)")
    val = _validation_split(args.data, args.size) if args.data else None
    evaluator, metrics = ev.train_evaluator(config, val)
    ev.save_evaluator(evaluator, args.out)
    accuracy = ", ".join(f"{k} {v:.3f}" for k, v in metrics["val_accuracy"].items())
    print(
        f"evaluator: validation alignment {metrics['val_alignment']:.4f} on {metrics['val_images']} images "
        f"({accuracy}; exact scenes {metrics['val_exact_scene']:.3f}); saved to {args.out}"
    )
    return 0


def _validation_split(data: Path, size: int):
    """Images in [0, 1] and labels of DATA/validation (or DATA itself if it is one split)."""
    from nas.data.folders import METADATA, load_images, open_source
    from nas.errors import NasError

    folder = data / "validation" if (data / "validation" / METADATA).is_file() else data
    source = open_source(folder)
    if "objects" not in source.entries[0].record:
        raise NasError(f"{folder / METADATA}: no 'objects' labels; the evaluator needs a shapes dataset")
    images, kept, _ = load_images(source, size)
    return (images + 1) / 2, [source.entries[i].record for i in kept]
