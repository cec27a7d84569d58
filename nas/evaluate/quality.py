"""`nas eval`: image quality against the number of denoising steps, on fixed prompts and seeds.

The seed's argument that 30 steps match 50 is a curve: quality at each step count on the same
prompts and starting noise. For a model trained on `shapes` the quality is measured by the shapes
evaluator (nas/evaluate/shapes_evaluator.py):

- alignment: the fraction of prompted attributes (shape, colour, size, position, background) the
  evaluator reads in the image; `chance` is the same images scored against other prompts (each
  image against the next image's prompt), i.e. what an image that ignores its prompt gets;
- Frechet distance of evaluator features to real images of the same validation scenes (a domain
  FID), with `fd_real_floor` (real images of other scenes vs the reference) as its noise floor;
- the ceiling any U-Net on the run's VAE can reach: the real images through encode + decode
  (`vae_alignment`, `fd_vae`); a weak VAE caps alignment well below the real images';
- per step count, the distance to the images of the largest step count from the same noise
  (`rmse_to_max`, pixels in [0, 1]): 0 means "the same image as with more steps".

Prompts are scenes of the shapes validation split, which never share a scene with the training
split. For other data, Inception FID (torchmetrics, with Inception weights available locally) against
the real images of the items the trainer held out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.core.errors import NasError
from nas.core.runfolder import EVAL_FILE, portable, write_json

GRID_COLUMNS = 8  # grid_<steps>.png: the first 64 samples, 8 per row
DEFAULT_STEPS = (10, 20, 30, 50)  # the seed compares 30 with 50; 10 and 20 show where quality breaks


def parse_steps(text: str) -> list[int]:
    """'10,20,30,50' -> [10, 20, 30, 50] (sorted, unique); NasError on anything else."""
    try:
        steps = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise NasError(f"--steps {text!r}: expected comma-separated integers, e.g. 10,20,30,50") from None
    if not steps or steps[0] < 1:
        raise NasError(f"--steps {text!r}: every step count must be >= 1")
    return steps


@dataclass
class EvalSet:
    """Fixed prompts and seeds, and the real images quality is measured against."""

    kind: str  # "shapes" (evaluator alignment + domain Frechet distance) or "fid" (Inception FID)
    prompts: list[str]
    records: list[dict]  # labels per prompt (shapes) or metadata rows
    seeds: list[int]  # starting noise of image i
    reference: torch.Tensor  # real images [N, 3, H, W] in [0, 1]
    floor: torch.Tensor | None  # real images of other scenes: the Frechet distance's noise floor
    source: str  # where the prompts came from, for the report


def is_shapes(cache) -> bool:
    records = cache.records()
    return bool(records) and all(k in records[0] for k in ("objects", "background"))


def _to_unit(images) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def _shapes_dataset_info(cache) -> dict:
    """seed and val_fraction of the shapes dataset the cache was made from (shapes.json beside it)."""
    source = Path(cache.manifest.get("source", {}).get("path", ""))
    for folder in (source, source.parent):
        info = folder / "shapes.json"
        if info.is_file():
            data = json.loads(info.read_text())
            return {
                "seed": int(data["seed"]),
                "val_fraction": float(data["val_fraction"]),
                "found": str(info),
            }
    return {"seed": 0, "val_fraction": 0.1, "found": None}  # shapes' defaults


def shapes_eval_set(components, n: int, seed: int) -> EvalSet:
    """The first `n` validation-split scenes of the run's shapes dataset, rendered at its resolution."""
    from nas.data import shapes

    info = _shapes_dataset_info(components.cache)
    size = components.resolution
    pairs = list(shapes.generate(2 * n, size, info["seed"], info["val_fraction"], split="validation"))
    records = [record for _, record in pairs[:n]]
    images = _to_unit([image for image, _ in pairs])
    source = f"shapes validation split (dataset seed {info['seed']}, val_fraction {info['val_fraction']})"
    if info["found"] is None:
        source += ", dataset shapes.json not found: shapes defaults assumed"
    return EvalSet("shapes", [r["text"] for r in records], records, [seed + i for i in range(n)],
                   images[:n], images[n:], source)  # fmt: skip


def held_out_eval_set(components, n: int, seed: int) -> EvalSet:
    """The items the trainer held out (the cache's last val_items), real images from the source."""
    from nas.data.folders import UnreadableImage, open_source
    from nas.sample.components import read_run_config

    config = read_run_config(components.run)
    records = components.cache.records()
    held = records[len(records) - min(config.val_items, len(records)) :][:n]
    source_path = components.manifest.get("source", {}).get("path")
    try:
        source = open_source(source_path)
    except NasError as exc:
        raise NasError(f"FID needs the real images of the cache's source: {exc}") from None
    images = []
    for record in held:
        try:
            images.append(source.load(source.entries[int(record["source_index"])], components.resolution))
        except (UnreadableImage, IndexError, KeyError):
            raise NasError(f"{source_path}: item {record.get('source_index')} cannot be read; "
                           "the source changed since the cache was made") from None  # fmt: skip
    source.close()
    return EvalSet("fid", [r["text"] for r in held], held, [seed + i for i in range(len(held))],
                   _to_unit(images), None, f"{len(held)} items held out of training")  # fmt: skip


def _score(kind: str, images: torch.Tensor, eval_set: EvalSet, evaluator, ref_features) -> dict:
    if kind == "fid":
        from nas.evaluate.shapes_evaluator import inception_fid

        return {"fid": inception_fid(eval_set.reference, images)}
    from nas.evaluate.shapes_evaluator import frechet_distance

    report = evaluator.report(images, eval_set.records)
    # Each image against the next image's prompt: what an image that ignores its prompt scores.
    chance = evaluator.report(images, eval_set.records[1:] + eval_set.records[:1])
    return {
        "alignment": report.pop("alignment"),
        "alignment_by_attribute": report,
        "chance_alignment": chance.pop("alignment"),
        "chance_by_attribute": chance,
        "frechet_distance": frechet_distance(evaluator.features(images), ref_features),
    }


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images in [0, 1] through the VAE (posterior mode), back in [0, 1] and 8-bit like the samples."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device) * 2 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().cpu()
        out.append(((decoded.clamp(-1, 1) + 1) / 2 * 255).round() / 255)
    return torch.cat(out)


def quality_vs_steps(
    components,
    pipe,
    steps_list: list[int],
    eval_set: EvalSet,
    settings,
    evaluator=None,
    progress: bool = True,
    grid_dir: Path | None = None,
) -> dict:
    """Generate the eval set at each step count and score it; a JSON-ready report."""
    from dataclasses import replace

    from nas.sample.generate import generate, image_grid, to_uint8

    if eval_set.kind == "shapes" and evaluator is None:
        raise NasError("a shapes run needs --evaluator (made by `nas data train-evaluator`)")
    jobs = list(zip(eval_set.prompts, eval_set.seeds))
    reference: dict = {"images": len(eval_set.reference)}
    ref_features = None
    if eval_set.kind == "shapes":
        from nas.evaluate.shapes_evaluator import frechet_distance

        ref_features = evaluator.features(eval_set.reference)
        reference["real_alignment"] = evaluator.alignment(eval_set.reference, eval_set.records)
        # What any U-Net on this VAE can reach: the real images through encode + decode.
        recon = vae_roundtrip(components.vae, eval_set.reference)
        reference["vae_alignment"] = evaluator.alignment(recon, eval_set.records)
        reference["fd_vae"] = frechet_distance(evaluator.features(recon), ref_features)
        if eval_set.floor is not None and len(eval_set.floor) >= 2:
            reference["fd_real_floor"] = frechet_distance(evaluator.features(eval_set.floor), ref_features)
    rows, images_by_steps = [], {}
    for steps in steps_list:
        start = time.perf_counter()
        floats = generate(components, pipe, jobs, replace(settings, steps=steps), progress, f"{steps} steps")
        seconds = time.perf_counter() - start
        pixels = to_uint8(floats)  # scored as saved: 8-bit, like the real images
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        images_by_steps[steps] = images
        row = {"steps": steps, **_score(eval_set.kind, images, eval_set, evaluator, ref_features)}
        row.update(seconds=round(seconds, 2), images_per_s=round(len(jobs) / seconds, 3))
        rows.append(row)
        if grid_dir is not None:
            from PIL import Image

            Image.fromarray(image_grid(pixels[: GRID_COLUMNS**2], columns=GRID_COLUMNS)).save(
                grid_dir / f"grid_{steps:03d}.png"
            )
    top = images_by_steps[steps_list[-1]]
    for row in rows:
        row["rmse_to_max"] = float((images_by_steps[row["steps"]] - top).pow(2).mean().sqrt())
    return {"reference": reference, "results": rows}


def plot_quality(report: dict, out_png: str | Path) -> None:
    """Quality against steps: alignment (with chance and real images) and Frechet distance / FID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ref = report["results"], report["reference"]
    steps = [r["steps"] for r in rows]
    if report["kind"] == "shapes":
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
        left.plot(steps, [r["alignment"] for r in rows], "o-", label="generated, own prompt")
        left.plot(steps, [r["chance_alignment"] for r in rows], "s--", label="chance (other prompt)")
        left.axhline(ref["real_alignment"], color="gray", ls=":", label="real images")
        left.axhline(ref["vae_alignment"], color="tab:green", ls="-.", label="real through the VAE (ceiling)")
        left.set_ylabel("prompt alignment (share of attributes)")
        left.set_ylim(0, 1)
        left.legend(fontsize=8)
        right.plot(steps, [r["frechet_distance"] for r in rows], "o-", label="generated vs real")
        if "fd_real_floor" in ref:
            right.axhline(ref["fd_real_floor"], color="gray", ls=":", label="real vs real (floor)")
        right.axhline(ref["fd_vae"], color="tab:green", ls="-.", label="VAE reconstructions vs real")
        right.set_ylabel("Frechet distance (evaluator features)")
        right.legend(fontsize=8)
        axes: tuple[Any, ...] = (left, right)
    else:
        fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
        ax.plot(steps, [r["fid"] for r in rows], "o-")
        ax.set_ylabel("FID (Inception)")
        axes = (ax,)
    for ax in axes:
        ax.set_xlabel("denoising steps")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['scheduler']}, guidance {report['guidance']}, {report['images']} images per point")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def _run_cache(run):
    from nas.data.cache import open_cache
    from nas.sample.components import read_run_config, weights_folder

    config = read_run_config(Path(run))
    weights_folder(Path(run))  # no weights: say so before anything is loaded
    if config.cache is None:
        raise NasError(
            f"{Path(run) / 'config.yaml'}: cache: not set; the sampler needs the run's latent cache"
        )
    return open_cache(config.cache)


def evaluate_run(
    run: str | Path,
    out: str | Path,
    steps_list: list[int],
    n: int,
    settings,
    evaluator_path: str | Path | None = None,
    seed: int = 0,
    weights: str = "auto",
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """`nas eval`: OUT/eval.json, OUT/quality_vs_steps.png and OUT/grid_<steps>.png; returns the report."""
    from nas.sample.components import load_run
    from nas.sample.generate import build_pipeline, check_out_folder

    settings.check()
    if n < 2:
        raise NasError(f"--n must be >= 2 (a Frechet distance needs two images), got {n}")
    out = Path(out)
    check_out_folder(out)
    evaluator = None
    if evaluator_path is not None:
        from nas.evaluate.shapes_evaluator import load_evaluator

        evaluator = load_evaluator(evaluator_path)
    shapes = is_shapes(_run_cache(run))
    if shapes and evaluator is None:
        raise NasError(f"{run}: trained on shapes; pass --evaluator DIR (made by `nas data train-evaluator`)")
    components = load_run(run, weights=weights, device=device)
    eval_set = shapes_eval_set(components, n, seed) if shapes else held_out_eval_set(components, n, seed)
    pipe = build_pipeline(
        components, settings.scheduler, settings.spacing, settings.runtime, settings.precision
    )
    out.mkdir(parents=True, exist_ok=True)
    measured = quality_vs_steps(components, pipe, steps_list, eval_set, settings, evaluator, progress, out)
    report = {
        "run": portable(run),
        "weights": components.weights,
        "model_sha256": components.model_sha256,
        "kind": eval_set.kind,
        "prompts": eval_set.source,
        "images": len(eval_set.prompts),
        "seed": seed,
        "scheduler": settings.scheduler,
        "timestep_spacing": settings.spacing,
        "guidance": settings.guidance,
        "runtime": settings.runtime,
        "precision": settings.precision,
        "steps": steps_list,
        "evaluator": portable(evaluator_path),
        **measured,
    }
    write_json(out / EVAL_FILE, report)
    plot_quality(report, out / "quality_vs_steps.png")
    return report
