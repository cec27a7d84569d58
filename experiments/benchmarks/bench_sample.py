"""Images/s of `nas sample` against the exported diffusers pipeline, same components and settings.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python experiments/benchmarks/bench_sample.py RUN [--steps 30] [--batch-size 8]
        [--prompts 8] [--n 2] [--scheduler ddim] [--repeats 3] [--device cpu] [--out FILE.json]

The run is exported to a temporary folder and loaded back with
`StableDiffusionPipeline.from_pretrained`, so both sides use the same weights, scheduler, steps,
guidance, prompts and seeds. Three ways are timed, interleaved in each repeat so that load from
other processes hits them alike (the median of the repeats is reported):

- nas:            `nas.sample.generate` (what `nas sample` runs), `--batch-size` images per call;
- pipe_batched:   the exported pipeline called with a list of `--batch-size` prompts and one
                  generator per image (the fastest way a diffusers user would call it);
- pipe_per_image: the exported pipeline called once per image (the usual one-prompt call).

Only generation is timed (no PNG writing, no loading). The images of the three ways are compared
too, so the speed comparison is between runs that produce the same pictures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run folder of `nas train`")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batch-size", type=int, default=8, help="images per call (nas and pipe_batched)")
    p.add_argument("--prompts", type=int, default=8, help="held-out captions used as prompts")
    p.add_argument("--n", type=int, default=2, help="images per prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers
    from diffusers import StableDiffusionPipeline

    from nas.sample import SampleSettings, build_pipeline, export_pipeline, generate, jobs_for, load_run
    from nas.sample.components import held_out_captions

    settings = SampleSettings(args.steps, args.guidance, args.scheduler, batch_size=args.batch_size).check()
    components = load_run(args.run, device=args.device)
    ours = build_pipeline(components, args.scheduler)
    jobs = jobs_for(held_out_captions(args.run, args.prompts), args.n, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        export_pipeline(args.run, Path(tmp) / "pipe", scheduler=args.scheduler)
        pipe = StableDiffusionPipeline.from_pretrained(
            Path(tmp) / "pipe", local_files_only=True, trust_remote_code=True
        ).to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def run_nas(batch_jobs):
        return generate(components, ours, batch_jobs, settings, progress=False)

    def run_pipe(batch_jobs, per_call):
        images = []
        for start in range(0, len(batch_jobs), per_call):
            chunk = batch_jobs[start : start + per_call]
            out = pipe(
                [prompt for prompt, _ in chunk],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
                output_type="np",
            )
            images.append(out.images)
        return np.concatenate(images)

    ways = {
        "nas": run_nas,
        "pipe_batched": lambda j: run_pipe(j, args.batch_size),
        "pipe_per_image": lambda j: run_pipe(j, 1),
    }
    warm = jobs[: min(2, len(jobs))]
    for way in ways.values():  # first calls allocate and pick kernels
        way(warm)
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    images = {}
    for _ in range(args.repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            images[name] = way(jobs)
            seconds[name].append(time.perf_counter() - start)
    rate = {name: len(jobs) / statistics.median(s) for name, s in seconds.items()}
    result = {
        "run": str(args.run.resolve()),
        "unet_class": type(components.unet).__name__,
        "images": len(jobs),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "batch_size": args.batch_size,
        "resolution": components.resolution,
        "repeats": args.repeats,
        "images_per_s": {k: round(v, 3) for k, v in rate.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "ratio_nas_to_pipe_batched": round(rate["nas"] / rate["pipe_batched"], 3),
        "ratio_nas_to_pipe_per_image": round(rate["nas"] / rate["pipe_per_image"], 3),
        "max_abs_diff_nas_vs_pipe": float(np.abs(images["nas"] - images["pipe_per_image"]).max()),
        "max_pixel_diff_uint8": int(
            np.abs(
                (images["nas"] * 255).round().astype(int)
                - (images["pipe_per_image"] * 255).round().astype(int)
            ).max()
        ),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
