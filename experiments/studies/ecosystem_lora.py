"""LoRA on the trained quickstart model: rank 4 and rank 16 adapters on the shapes class the base
model draws worst (results/ecosystem/README.md, section "LoRA: rank 4 and 16 on a weak class").

1. The base run's shape accuracy per class: the first N validation-split scenes of the shapes
   dataset (the prompts of `nas eval`), sampled with fixed seeds and read by the shapes evaluator;
   per class over the scenes with a single object of that class. The class with the lowest accuracy
   is the subset (shape is the attribute eval.json puts at chance: 0.22-0.24 vs chance 0.22-0.23).
2. `nas train` with `lora:` (rank 4, rank 16; alpha = rank) and `cache_filter: {objects.shape: C}`:
   only the cache items with a C are trained on, and the last `val_items` of them are held out; the
   run's summary.json has the validation loss before (step 0: the adapter starts as the identity, so
   it is the base model's) and after.
3. The evaluator's shape accuracy on that class's scenes with each adapter (`--lora`), same seeds.
4. diffusers' `pipe.load_lora_weights` on the exported base pipeline (one image per call) against
   `nas sample --lora` with --batch-size 1 and with its default 8: the largest difference in 8-bit
   levels over 4 images.

Everything is read from BASE (never written); runs and the exported pipeline go to WORK (/tmp);
figures to results/ecosystem/lora/ (lora.json, each run's README.md card, lora.json, summary.json).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/studies/ecosystem_lora.py \
        --base /tmp/clean/results/quickstart/train/run \
        --evaluator /tmp/clean/results/quickstart/data/evaluator
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nas.cli import main as nas  # noqa: E402
from nas.evaluate.evaluators import load_evaluator  # noqa: E402
from nas.evaluate.quality import shapes_eval_set  # noqa: E402
from nas.evaluate.shapes_evaluator import score_scene  # noqa: E402
from nas.sample import SampleSettings, build_pipeline, generate, load_run, to_uint8  # noqa: E402
from nas.sample.components import LoraChoice  # noqa: E402

SETTINGS = SampleSettings(steps=20, guidance=7.5, scheduler="ddim", spacing="trailing", batch_size=50)
RANKS = (4, 16)


def shape_accuracy(images: torch.Tensor, records: list[dict], evaluator) -> float:
    matched = prompted = 0
    for predicted, record in zip(evaluator.predict(images), records):
        m, n = score_scene(predicted, record)["shape"]
        matched, prompted = matched + m, prompted + n
    return matched / prompted


def draw(base: Path, prompts: list[str], seeds: list[int], lora: Path | None = None) -> torch.Tensor:
    components = load_run(base, lora=LoraChoice(lora) if lora else None)
    pipe = build_pipeline(components, SETTINGS.scheduler, SETTINGS.spacing)
    images = generate(components, pipe, list(zip(prompts, seeds)), SETTINGS, progress=False)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def per_class(base: Path, evaluator, n: int) -> tuple[dict, list[dict], list[str], list[int]]:
    components = load_run(base)
    eval_set = shapes_eval_set(components, n, seed=0)
    images = draw(base, eval_set.prompts, eval_set.seeds)
    single = [i for i, r in enumerate(eval_set.records) if len(r["objects"]) == 1]
    classes: dict[str, list[int]] = {}
    for i in single:
        classes.setdefault(eval_set.records[i]["objects"][0]["shape"], []).append(i)
    table = {
        c: {
            "scenes": len(ix),
            "accuracy": shape_accuracy(images[ix], [eval_set.records[i] for i in ix], evaluator),
        }
        for c, ix in sorted(classes.items())
    }
    overall = shape_accuracy(images, eval_set.records, evaluator)
    return {"per_class": table, "all_scenes": overall}, eval_set.records, eval_set.prompts, eval_set.seeds


def train_lora(base: Path, shape: str, rank: int, steps: int, out: Path) -> Path:
    config = {
        "preset": "tiny",
        "name": f"lora-r{rank}",
        "max_steps": steps,
        "ema": None,
        "lr": 1e-3,  # the base run's peak lr (preset tiny); a rank-r adapter starts at B = 0
        "warmup_steps": 20,
        "val_every": 50,
        "checkpoint_every": steps,
        "cache_filter": {"objects.shape": shape},
        "lora": {"init_from": str(base), "rank": rank},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"lora-r{rank}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if (out / "summary.json").is_file() and (out / "README.md").is_file():  # finished before: reused
        return out
    shutil.rmtree(out, ignore_errors=True)
    base_config = yaml.safe_load((base / "config.yaml").read_text())
    argv = ["train", str(path), "--cache", base_config["cache"], "--out", str(out), "--quiet"]
    print("nas", " ".join(argv), flush=True)
    assert nas(argv) == 0
    return out


def diffusers_vs_nas(base: Path, lora: Path, work: Path, prompt: str) -> dict[str, int]:
    """Largest difference in 8-bit levels between `nas sample --lora` and pipe.load_lora_weights
    (one image per pipeline call), with `nas sample --batch-size 1` and with its default batch (8)."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe_dir = work / "pipe"
    if not pipe_dir.is_dir():
        assert nas(["export-pipeline", str(base), "--out", str(pipe_dir)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, local_files_only=True, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    theirs = [
        pipe(prompt, num_inference_steps=SETTINGS.steps, guidance_scale=SETTINGS.guidance, output_type="np",
             generator=torch.Generator().manual_seed(seed)).images[0]
        for seed in range(4)
    ]  # fmt: skip
    theirs_u8 = to_uint8(np.stack(theirs)).astype(int)
    out = {}
    for batch in (1, 8):
        ours_dir = work / f"sample-{lora.name}-b{batch}"
        shutil.rmtree(ours_dir, ignore_errors=True)
        argv = ["sample", str(base), "--prompt", prompt, "--n", "4", "--steps", str(SETTINGS.steps),
                "--batch-size", str(batch), "--out", str(ours_dir), "--lora", str(lora), "--quiet"]  # fmt: skip
        assert nas(argv) == 0
        ours = np.stack([np.asarray(Image.open(ours_dir / f"{i:04d}.png")) for i in range(4)]).astype(int)
        out[f"batch_{batch}"] = int(np.abs(ours - theirs_u8).max())
    return out


def run(args) -> dict:
    torch.set_num_threads(1)
    base, work, out = Path(args.base).resolve(), Path(args.work), Path(args.out)
    evaluator = load_evaluator(args.evaluator)
    start = time.perf_counter()
    before, records, prompts, seeds = per_class(base, evaluator, args.scenes)
    shape = min(before["per_class"], key=lambda c: before["per_class"][c]["accuracy"])
    print(f"per-class shape accuracy of the base: {before['per_class']}; subset: {shape}", flush=True)
    chosen = [
        i for i, r in enumerate(records) if len(r["objects"]) == 1 and r["objects"][0]["shape"] == shape
    ]
    report: dict = {"date": str(date.today()), "base": str(base), "scenes": args.scenes, "steps": SETTINGS.steps,
                    "guidance": SETTINGS.guidance, "base_accuracy": before, "subset": {"objects.shape": shape},
                    "subset_scenes": len(chosen), "ranks": {}}  # fmt: skip
    for rank in RANKS:
        folder = train_lora(base, shape, rank, args.steps, work / f"lora-r{rank}")
        images = draw(base, [prompts[i] for i in chosen], [seeds[i] for i in chosen], lora=folder)
        summary = json.loads((folder / "summary.json").read_text())
        info = json.loads((folder / "lora.json").read_text())
        report["ranks"][str(rank)] = {
            "val_loss_before": summary["val_loss_start"],
            "val_loss_after": summary["val_loss"],
            "trainable_params": info["trainable_params"],
            "total_params": info["total_params"],
            "trainable_share": info["trainable_share"],
            "shape_accuracy_before": before["per_class"][shape]["accuracy"],
            "shape_accuracy_after": shape_accuracy(images, [records[i] for i in chosen], evaluator),
            "diffusers_vs_nas_max_levels": diffusers_vs_nas(base, folder, work, prompts[chosen[0]]),
        }
        print(f"rank {rank}: {report['ranks'][str(rank)]}", flush=True)
        keep = out / f"lora-r{rank}"
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "lora.json", "summary.json", "metrics.csv", "config.yaml", "loss.png"):
            shutil.copy2(folder / name, keep / name)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "lora.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="/tmp/clean/results/quickstart/train/run")
    p.add_argument("--evaluator", default="/tmp/clean/results/quickstart/data/evaluator")
    p.add_argument("--work", default="/tmp/ecosystem_lora", help="runs and the exported pipeline (large)")
    p.add_argument("--out", default=str(ROOT / "results" / "ecosystem" / "lora"))
    p.add_argument(
        "--scenes", type=int, default=400, help="validation scenes sampled for the per-class accuracy"
    )
    p.add_argument("--steps", type=int, default=600, help="LoRA optimizer steps per rank")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse()), indent=2))
