"""`nas eval`: image quality against the number of denoising steps, on fixed prompts and seeds.

The seed's argument that 30 steps match 50 is a curve: quality at each step count on the same
prompts and starting noise. Quality is measured by the evaluator given with --evaluator
(nas/evaluate/evaluators.py opens either kind) and, where the user has the weights on disk, by CLIP
(--clip) and Inception FID (--fid-weights); nas/evaluate/scorers.py holds one scorer per instrument:

- alignment: for the shapes evaluator the fraction of prompted attributes (shape, colour, size,
  position, background) it reads in the image, `chance` being the same images scored against other
  prompts; for the contrastive evaluator and CLIP how often an image ranks its own prompt first among
  K (chance 1/K);
- Frechet distance of evaluator features to the real images of the same prompts (a domain FID), with
  `fd_real_floor` (real images of other prompts vs the reference) as its noise floor;
- the ceiling any U-Net on the run's VAE can reach: the real images through encode + decode
  (`vae_alignment`, `fd_vae`);
- per step count, the distance to the images of the largest step count from the same noise
  (`rmse_to_max`, pixels in [0, 1]): 0 means "the same image as with more steps".

Prompts: for a run trained on shapes, scenes of the validation split (never sharing a scene with the
training split); for other data, the items the trainer held out (the cache's last val_items), with
their real images read from the cache's source. Nothing is downloaded: without an evaluator, CLIP or
Inception weights, a run on other data is refused in one line before any work.
"""

from __future__ import annotations

import json
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

    kind: str  # "shapes" (validation scenes, labelled) or "held_out" (the trainer's held-out items)
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
    """The items the trainer held out (the cache's last val_items), real images from the source; the
    floor set is as many training items just before them (real images of other prompts)."""
    from nas.data.folders import UnreadableImage, open_source
    from nas.sample.components import read_run_config

    config = read_run_config(components.run)
    records = components.cache.records()
    first = len(records) - min(config.val_items, len(records))
    held = records[first:][:n]
    other = records[max(0, first - len(held)) : first]
    source_path = components.manifest.get("source", {}).get("path")
    try:
        source = open_source(source_path)
    except NasError as exc:
        raise NasError(f"nas eval needs the real images of the cache's source: {exc}") from None

    def load(rows: list[dict]) -> list:
        try:
            return [source.load(source.entries[int(r["source_index"])], components.resolution) for r in rows]
        except (UnreadableImage, IndexError, KeyError):
            raise NasError(f"{source_path}: an item of the cache cannot be read; "
                           "the source changed since the cache was made") from None  # fmt: skip

    images, floor = load(held), load(other)
    source.close()
    return EvalSet("held_out", [r["text"] for r in held], held, [seed + i for i in range(len(held))],
                   _to_unit(images), _to_unit(floor) if len(floor) >= 2 else None,
                   f"{len(held)} items held out of training")  # fmt: skip


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
    scorers: list | None = None,
    control: tuple[list, float] | None = None,
) -> dict:
    """Generate the eval set at each step count and score it; a JSON-ready report.

    `scorers` (nas/evaluate/scorers.py) default to the one for `evaluator`; `control`: (a control
    image per prompt, scale) for a ControlNet pipeline."""
    from dataclasses import replace

    from nas.sample.generate import generate, image_grid, to_uint8
    from nas.sample.timing import StageClock

    if scorers is None:
        if evaluator is None:
            raise NasError("nas eval: no evaluator (make one with `nas data train-evaluator`)")
        scorers = [_evaluator_scorer(evaluator, components)]
    jobs = list(zip(eval_set.prompts, eval_set.seeds))
    reference: dict = {"images": len(eval_set.reference)}
    # What any U-Net on this VAE can reach: the real images through encode + decode.
    recon = vae_roundtrip(components.vae, eval_set.reference)
    for scorer in scorers:
        reference.update(scorer.reference(eval_set, recon))
    rows, images_by_steps = [], {}
    for steps in steps_list:
        clock = StageClock()
        floats = generate(
            components, pipe, jobs, replace(settings, steps=steps), progress, f"{steps} steps", clock, control
        )
        split = clock.report()  # end to end: text encoder, U-Net calls, VAE decode, the rest
        pixels = to_uint8(floats)  # scored as saved: 8-bit, like the real images
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        images_by_steps[steps] = images
        row: dict[str, Any] = {"steps": steps}
        for scorer in scorers:
            row.update(scorer.score(images, eval_set))
        row.update(
            seconds=round(split["seconds"], 2), images_per_s=round(split["images_per_s"], 3), split=split
        )
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


def _controlled(components, choice, eval_set: EvalSet, settings, shapes: bool, run):
    """`nas eval --controlnet`: the ControlNet pipeline and, per prompt, the condition image drawn from
    its shapes record (the kind the ControlNet was trained on, nas/data/conditions.py)."""
    from nas.data.conditions import record_condition
    from nas.sample.controlnet import attach_controlnet, controlnet_pipeline

    if not shapes:
        raise NasError(f"--controlnet: {run} was not trained on shapes; nas eval draws each prompt's control "
                       "image from its shapes record (use nas sample --controlnet --control-image FILE)")  # fmt: skip
    if choice.condition is None:
        raise NasError(f"--controlnet {choice.folder}: no controlnet.json beside it names its condition "
                       "(mask or edges); give the folder of a `controlnet:` run of nas train")  # fmt: skip
    pipe = controlnet_pipeline(
        components, attach_controlnet(components, choice), settings.scheduler, settings.spacing
    )
    seed = _shapes_dataset_info(components.cache)["seed"]
    images = [record_condition(r, seed, components.resolution, choice.condition) for r in eval_set.records]
    return pipe, (images, choice.scale)


def _evaluator_scorer(evaluator, components, k: int | None = None):
    from nas.evaluate import scorers

    if getattr(evaluator, "kind", "shapes") == "contrastive":
        model = scorers.ContrastiveWithText(evaluator, components.text_encoder)
        return scorers.RetrievalScorer(model, "contrastive", k or scorers.DEFAULT_K)
    return scorers.ShapesScorer(evaluator)


ALIGNMENT_LABELS = {  # kind -> (y label, chance label); K is filled in from the report
    "shapes": ("prompt alignment (share of attributes)", "chance (other prompt)"),
    "contrastive": ("own prompt first among K={k} (contrastive evaluator)", "chance 1/K = {chance:.3f}"),
    "clip": ("own prompt first among K={k} (CLIP)", "chance 1/K = {chance:.3f}"),
}


def plot_quality(report: dict, out_png: str | Path) -> None:
    """Quality against steps: alignment (with chance, real images, the VAE ceiling), Frechet distance
    and Inception FID, the panels the report has figures for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ref = report["results"], report["reference"]
    steps = [r["steps"] for r in rows]
    panels = [key for key in ("alignment", "frechet_distance", "fid") if key in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(
            steps,
            [r[key] for r in rows],
            "o-",
            label="generated, own prompt" if key == "alignment" else "generated vs real",
        )
        if key == "alignment":
            retrieval = ref.get("retrieval", {})
            y_label, chance_label = ALIGNMENT_LABELS.get(report["kind"], ALIGNMENT_LABELS["shapes"])
            fill = {"k": retrieval.get("k"), "chance": retrieval.get("chance", 0.0)}
            ax.plot(steps, [r["chance_alignment"] for r in rows], "s--", label=chance_label.format(**fill))
            ax.axhline(ref["real_alignment"], color="gray", ls=":", label="real images")
            ax.axhline(
                ref["vae_alignment"], color="tab:green", ls="-.", label="real through the VAE (ceiling)"
            )
            ax.set_ylabel(y_label.format(**fill))
            ax.set_ylim(0, 1)
        elif key == "frechet_distance":
            if "fd_real_floor" in ref:
                ax.axhline(ref["fd_real_floor"], color="gray", ls=":", label="real vs real (floor)")
            ax.axhline(ref["fd_vae"], color="tab:green", ls="-.", label="VAE reconstructions vs real")
            ax.set_ylabel("Frechet distance (evaluator features)")
        else:
            if "fid_vae" in ref:
                ax.axhline(ref["fid_vae"], color="tab:green", ls="-.", label="VAE reconstructions vs real")
            ax.set_ylabel("FID (Inception)")
        ax.legend(fontsize=8)
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


def _no_scorer(run, cache, shapes: bool) -> NasError:
    if shapes:
        return NasError(
            f"{run}: trained on shapes; pass --evaluator DIR (made by `nas data train-evaluator`)"
        )
    return NasError(f"{run}: no evaluator for this data (not shapes): train one offline with "
                    f"`nas data train-evaluator --cache {cache.path} --out EVALUATOR` and pass --evaluator "
                    "EVALUATOR (or --clip / --fid-weights with weights on disk)")  # fmt: skip


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
    clip: str | Path | None = None,
    fid_weights: str | Path | None = None,
    k: int | None = None,
    lora=None,
    controlnet=None,
) -> dict:
    """`nas eval`: OUT/eval.json, OUT/quality_vs_steps.png and OUT/grid_<steps>.png; returns the report.

    Scorers, first one primary: the evaluator, then CLIP (`clip`: a local model folder), then
    Inception FID (`fid_weights`: a local weights file). Everything is checked before any work."""
    from nas.evaluate import scorers as sc
    from nas.sample.components import load_run
    from nas.sample.generate import build_pipeline, check_out_folder

    settings.check()
    if n < 2:
        raise NasError(f"--n must be >= 2 (a Frechet distance needs two images), got {n}")
    out = Path(out)
    check_out_folder(out)
    evaluator = None
    if evaluator_path is not None:
        from nas.evaluate.evaluators import load_evaluator

        evaluator = load_evaluator(evaluator_path)
    if fid_weights is not None:
        from nas.evaluate.local_models import check_fid_available

        check_fid_available(fid_weights)
    cache = _run_cache(run)
    shapes = is_shapes(cache)
    if evaluator is None and clip is None and fid_weights is None:
        raise _no_scorer(run, cache, shapes)
    if evaluator is not None and evaluator.kind == "contrastive":
        evaluator.check_text_encoder(cache.manifest["text_encoder"], f"{run}: cache {cache.path}")
    elif evaluator is not None and not shapes:
        raise NasError(f"--evaluator {evaluator_path}: a shapes evaluator reads only shapes images, and {run} "
                       f"was not trained on shapes; train one with `nas data train-evaluator --cache {cache.path}`")  # fmt: skip
    scorers: list = []
    if clip is not None:
        from nas.evaluate.local_models import LocalClip

        prefix = "clip_" if evaluator is not None else ""
        model = LocalClip(clip, device)
        scorers.append(sc.RetrievalScorer(model, "clip", k or sc.DEFAULT_K, prefix, clip_score=True))
    if fid_weights is not None:
        from nas.evaluate.local_models import InceptionFid

        scorers.append(sc.FidScorer(InceptionFid(fid_weights, device)))
    components = load_run(run, weights=weights, device=device, lora=lora)  # lora: a LoraChoice
    if evaluator is not None:
        scorers.insert(0, _evaluator_scorer(evaluator, components, k))
    eval_set = shapes_eval_set(components, n, seed) if shapes else held_out_eval_set(components, n, seed)
    pipe = build_pipeline(
        components, settings.scheduler, settings.spacing, settings.runtime, settings.precision
    )
    control = None
    if controlnet is not None:  # a nas.sample.controlnet.ControlChoice: each prompt's condition image
        pipe, control = _controlled(components, controlnet, eval_set, settings, shapes, run)
    out.mkdir(parents=True, exist_ok=True)
    measured = quality_vs_steps(
        components, pipe, steps_list, eval_set, settings, evaluator, progress, out, scorers, control
    )
    report = {
        "run": portable(run),
        "weights": components.weights,
        "lora": components.lora,  # file, sha256 and scale of a LoRA in the U-Net (None: none)
        "controlnet": getattr(components, "controlnet", None),  # folder, sha256, scale, condition
        "model_sha256": components.model_sha256,
        "kind": scorers[0].kind,
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
        "clip": portable(clip),
        "fid_weights": portable(fid_weights),
        **measured,
    }
    write_json(out / EVAL_FILE, report)
    plot_quality(report, out / "quality_vs_steps.png")
    return report
