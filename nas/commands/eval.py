"""Quality against the number of denoising steps on fixed prompts and seeds: for a model trained on
shapes, prompt alignment (with its chance level) and the domain Frechet distance from the shapes
evaluator; for other data, Inception FID (torchmetrics, Inception weights available locally).
Writes OUT/eval.json, OUT/quality_vs_steps.png and a grid of images per step count."""

from __future__ import annotations

import argparse
from pathlib import Path

from nas.commands.sample import add_sampling_arguments, check_device, settings_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder of `nas train`")
    p.add_argument(
        "--steps", default="10,20,30,50", help="step counts, comma-separated (default 10,20,30,50)"
    )
    p.add_argument(
        "--n", type=int, default=200, help="images per step count: prompts x 1 seed each (default 200)"
    )
    p.add_argument("--evaluator", type=Path, help="shapes evaluator folder (`nas data train-evaluator`)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/eval/<scheduler>-seed<K>)")
    add_sampling_arguments(p, steps=False)


def run(args) -> int:
    from nas.evaluate.quality import evaluate_run, parse_steps

    steps_list = parse_steps(args.steps)
    settings = settings_from(args, steps=steps_list[-1])
    check_device(args.device)
    out = args.out or args.run / "eval" / f"{args.scheduler}-seed{args.seed}"
    report = evaluate_run(
        args.run,
        out,
        steps_list,
        args.n,
        settings,
        evaluator_path=args.evaluator,
        seed=args.seed,
        weights=args.weights,
        device=args.device,
        progress=not args.quiet,
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
