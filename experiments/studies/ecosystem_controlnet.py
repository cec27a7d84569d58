"""ControlNet on the quickstart's searched U-Net (issue #28): train one on shapes masks, then measure
control (the evaluator's position and size accuracy with and without it, same prompts and seeds),
draw a grid (condition | without | with) and time its cost over the bare U-Net, side by side.

    OMP_NUM_THREADS=1 python experiments/studies/ecosystem_controlnet.py \
        --quickstart /tmp/clean/results/quickstart --out results/ecosystem/controlnet

Reads QUICKSTART/{train/run, precompute/cache, data/evaluator} (a `make demo` results folder), writes
OUT/run (the `controlnet:` run; its weights are gitignored), OUT/eval_without, OUT/eval_with (nas
eval), OUT/grid.png, OUT/figures.json, OUT/card.md (a copy of OUT/run/controlnet/README.md). Each stage is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from time import perf_counter

import numpy as np
import torch

from nas.cli import main as nas

GRID_ROWS = 8  # validation scenes in the grid
TIMED_STEPS = 30  # training steps timed per model (after WARMUP)
TIMED_CALLS = 5  # pipeline calls timed per pipeline (after WARMUP)
WARMUP = 3


def train(quickstart: Path, out: Path, steps: int) -> None:
    if (out / "run" / "controlnet").is_dir():
        return
    argv = ["train", "tiny", "--cache", str(quickstart / "precompute" / "cache"), "--out", str(out / "run"),
            "--max-steps", str(steps), "--quiet", "--set", "ema=null",
            f"controlnet.init_from={quickstart / 'train' / 'run'}", "val_every=100", "checkpoint_every=100"]  # fmt: skip
    assert nas(argv) == 0


def evaluate(quickstart: Path, out: Path, n: int, steps: int) -> dict:
    reports = {}
    for name, extra in (("without", []), ("with", ["--controlnet", str(out / "run")])):
        folder = out / f"eval_{name}"
        if not (folder / "eval.json").is_file():
            argv = ["eval", str(quickstart / "train" / "run"), "--evaluator", str(quickstart / "data" / "evaluator"),
                    "--steps", str(steps), "--n", str(n), "--out", str(folder), "--quiet", *extra]  # fmt: skip
            assert nas(argv) == 0
        reports[name] = json.loads((folder / "eval.json").read_text())
    return reports


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tick = perf_counter()
        fn()
        times.append(perf_counter() - tick)
    return statistics.median(times)


def grid_and_sampling_cost(quickstart: Path, out: Path, steps: int) -> dict:
    """OUT/grid.png (condition | without | with, the eval's first scenes and seeds) and the seconds
    per pipeline call of both pipelines, timed alternately."""
    from PIL import Image

    from nas.core.grid import labelled_grid
    from nas.data.conditions import record_condition
    from nas.evaluate.quality import _shapes_dataset_info, shapes_eval_set
    from nas.sample import SampleSettings, build_pipeline, generate, load_run, to_uint8
    from nas.sample.controlnet import attach_controlnet, controlnet_choice, controlnet_pipeline

    components = load_run(quickstart / "train" / "run")
    eval_set = shapes_eval_set(components, GRID_ROWS, seed=0)
    seed = _shapes_dataset_info(components.cache)["seed"]
    choice = controlnet_choice(out / "run")
    assert choice is not None and choice.condition is not None
    conditions = [
        record_condition(r, seed, components.resolution, choice.condition) for r in eval_set.records
    ]
    settings = SampleSettings(steps=steps, batch_size=GRID_ROWS)
    jobs = list(zip(eval_set.prompts, eval_set.seeds))
    plain = build_pipeline(components)
    controlled = controlnet_pipeline(components, attach_controlnet(components, choice))
    without = to_uint8(generate(components, plain, jobs, settings, progress=False))
    with_ = to_uint8(
        generate(components, controlled, jobs, settings, progress=False, control=(conditions, 1.0))
    )
    cells = []
    for i in range(GRID_ROWS):
        cells += [np.asarray(conditions[i]), without[i], with_[i]]
    grid, _ = labelled_grid(np.stack(cells), 3, row_labels=eval_set.prompts,
                            column_labels=["condition", "without", "with"],
                            title=f"{steps} steps, guidance 7.5, DDIM; same prompts and seeds")  # fmt: skip
    Image.fromarray(grid).save(out / "grid.png")

    def call(pipe, control):
        return lambda: generate(components, pipe, jobs, settings, progress=False, control=control)

    for _ in range(WARMUP):
        call(plain, None)()
        call(controlled, (conditions, 1.0))()
    bare, steered = [], []
    for _ in range(TIMED_CALLS):  # alternately, so load on the machine hits both alike
        bare.append(_median_time(call(plain, None), 1))
        steered.append(_median_time(call(controlled, (conditions, 1.0)), 1))
    return {"sampling_call_s": {"bare": statistics.median(bare), "controlnet": statistics.median(steered),
                                "images_per_call": GRID_ROWS, "steps": steps},
            "sampling_ratio": statistics.median(steered) / statistics.median(bare)}  # fmt: skip


def training_cost(quickstart: Path, out: Path) -> dict:
    """Seconds per optimizer step at the run's batch: the bare U-Net trained (as `nas train`) against
    the ControlNet trained beside the frozen U-Net, on the same batches, timed alternately."""
    from nas.data.cache import open_cache
    from nas.data.conditions import CacheConditions
    from nas.diffusion import noise_scheduler
    from nas.models.controlnet import controlnet_for
    from nas.models.load import load_unet, weights_folder
    from nas.train.config import load_config
    from nas.train.controlnet import ControlBatches, ControlledUNet, task_loss

    config = load_config("tiny", ["ema=null"])
    cache = open_cache(quickstart / "precompute" / "cache")
    scheduler = noise_scheduler(config.diffusion)
    batches = ControlBatches(cache, config, scheduler.config.num_train_timesteps, 0, 1,
                             CacheConditions(cache, "mask"))  # fmt: skip
    _, folder = weights_folder(quickstart / "train" / "run", "auto")
    bare = load_unet(folder).train().requires_grad_(True)
    frozen = load_unet(folder)
    controlled = ControlledUNet(
        frozen, controlnet_for(frozen, cache.manifest["resolution"] // frozen.config.sample_size), {}
    )
    controlled.train()
    gamma = config.diffusion.min_snr_gamma

    def stepper(model, keep_cond: bool):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        counter = [0]

        def step():
            b = batches.get(counter[0], 0)
            counter[0] += 1
            if not keep_cond:
                b.pop("cond")
            task_loss(model, scheduler, b, gamma).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {"bare": stepper(bare, False), "controlnet": stepper(controlled, True)}
    for _ in range(WARMUP):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(TIMED_STEPS):
        for name, fn in steps.items():
            times[name].append(_median_time(fn, 1))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "train_step_s": {**median, "batch": config.batch_size},
        "train_ratio": median["controlnet"] / median["bare"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", type=Path, required=True, help="a `make demo` results folder")
    parser.add_argument("--out", type=Path, default=Path("results/ecosystem/controlnet"))
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--n", type=int, default=200, help="eval images (validation scenes x 1 seed)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of eval, grid and timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    train(args.quickstart, args.out, args.train_steps)
    reports = evaluate(args.quickstart, args.out, args.n, args.steps)
    figures: dict = {}
    for name, report in reports.items():
        row = report["results"][-1]
        attrs = row["alignment_by_attribute"]
        figures[name] = {"position": attrs["position"], "size": attrs["size"], "alignment": row["alignment"],
                         "extra_objects": attrs["extra_objects"], "chance_position": row["chance_by_attribute"]["position"]}  # fmt: skip
    figures.update(grid_and_sampling_cost(args.quickstart, args.out, args.steps))
    figures.update(training_cost(args.quickstart, args.out))
    figures["run"] = json.loads((args.out / "run" / "controlnet.json").read_text())
    figures["summary"] = json.loads((args.out / "run" / "summary.json").read_text())
    from nas.sample.card import write_controlnet_card

    card = write_controlnet_card(args.out / "run", eval_reports=reports)
    (args.out / "card.md").write_text(card.read_text())  # committed (the run folder is not)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    json.dump(figures, sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
