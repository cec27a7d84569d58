"""SD size on a CPU: the whole `nas` path once with Stable Diffusion 1.5's parts at their true configs
(random weights; experiments/studies/sd_parts.py), each stage a subprocess whose wall time and peak
RSS are recorded (os.wait4: the stage's own resource usage).

Stages: parts (build and save the SD folders), 1 precompute (64 shapes images at 512 px through the
SD VAE and CLIP text encoder), 2 inherit (SD 1.5 -> BK-SDM-Small and -> DeciDiffusion 1.0's layout),
3 train (`distill:` from the SD teacher, 3 steps at batch 1, 64x64 latents, gradient checkpointing),
4 sample (2 steps at 512 px), export-pipeline, and a plain diffusers StableDiffusionPipeline on the
export (one step), 5 export-onnx of the SD U-Net (external data) checked by ONNX Runtime, 6 the
decidiffusion.yaml latency table on the CPU (64x64, batch 2) and its validation on random
architectures measured whole.

    python experiments/studies/sd_scale.py --work /tmp/sd_scale --out results/sd_scale
    python experiments/studies/sd_scale.py --small --work W --out O     # test size, same code

A rerun skips the stages OUT/results.json holds (delete it, or pass --stages, to run one again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SD = dict(
    teacher="search_spaces/archs/sd15.yaml",
    students=["search_spaces/archs/bksdm_small.yaml", "search_spaces/archs/decidiffusion_v1.yaml"],
    images=64,  # issue #31
    resolution=512,  # px: 64x64 latents
    precompute_batch=4,  # images per VAE call (activations at 512 px: ~1 GB per image)
    max_length=77,
    space="search_spaces/decidiffusion.yaml",
    table=["--rounds", "1", "--fit", "2", "--fit-iters", "1", "--warmup", "1"],  # 2 loaded cores
    validate=10,
    whole_iters=1,  # timed forwards per validation network (after one warm-up)
    sample_resolution=512,
    small=False,
)
SMALL = dict(
    teacher="search_spaces/archs/tiny_stock.yaml",
    students=["search_spaces/archs/tiny_flex.yaml"],
    images=8,
    resolution=64,  # 8x8 latents through the 8x-downsampling small VAE
    precompute_batch=4,
    max_length=32,
    space="search_spaces/tiny.yaml",
    table=["--rounds", "1", "--fit", "2", "--fit-iters", "1", "--warmup", "1"],
    validate=3,
    whole_iters=1,
    sample_resolution=64,
    small=True,
)
# export_onnx needs only the parts: it runs before the 30-minute precompute (its failures show early)
STAGES = ["parts", "export_onnx", "precompute", "inherit", "train", "sample", "export_pipeline",
          "diffusers_pipeline", "latency_table", "table_validation"]  # fmt: skip
PROMPT = "a big red circle in the centre"


def nas(*args: str) -> None:
    from nas.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"nas {' '.join(map(str, args))}: exit code {code}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def image_subset(work: Path, count: int) -> Path:
    """The first `count` images of the parts stage's folder (all of them: that folder itself)."""
    import shutil

    source = work / "images" / "train"
    rows = (source / "metadata.jsonl").read_text().splitlines()
    if count >= len(rows):
        return source
    target = work / f"images_{count}"
    target.mkdir(exist_ok=True)
    for row in rows[:count]:
        name = json.loads(row)["file_name"]
        shutil.copyfile(source / name, target / name)
    (target / "metadata.jsonl").write_text("\n".join(rows[:count]) + "\n")
    return target


def run_stage(name: str, work: Path, scale: dict) -> dict:
    """One stage, in this process; returns its figures."""
    sd, teacher = work / "sd15", ROOT / scale["teacher"]
    if name == "parts":
        from experiments.studies.sd_parts import save_parts
        from nas.data import shapes

        shapes.write(work / "images", n=scale["images"], size=scale["resolution"], seed=0, val_fraction=0.0)
        rows = [json.loads(line) for line in (work / "images" / "train" / "metadata.jsonl").open()]
        return save_parts(sd, teacher, [r["text"] for r in rows], small=scale["small"])
    if name == "precompute":
        nas("precompute", "--data", image_subset(work, scale.get("images_precomputed", scale["images"])), "--vae", sd / "vae", "--text-encoder", sd,
            "--out", work / "cache", "--resolution", scale["resolution"], "--batch", scale["precompute_batch"],
            "--max-length", scale["max_length"], "--device", "cpu")  # fmt: skip
        manifest = json.loads((work / "cache" / "manifest.json").read_text())
        total = folder_bytes(work / "cache")
        return {"items": manifest["count"], "cache_bytes": total, "bytes_per_item": total / manifest["count"],
                "latent_size": manifest["latent_size"], "text_len": manifest["text_len"]}  # fmt: skip
    if name == "inherit":
        out = {}
        for student in scale["students"]:
            target = work / "inherit" / Path(student).stem
            started = time.perf_counter()
            nas("inherit", "--teacher", sd / "unet", "--arch", ROOT / student, "--out", target)
            out[Path(student).stem] = {"seconds": round(time.perf_counter() - started, 1),
                                       "bytes": folder_bytes(target)}  # fmt: skip
        return out
    if name == "train":
        config = work / "train.yaml"
        config.write_text(
            json.dumps(
                {
                    "preset": "sd15",
                    "name": "sd-scale",
                    "max_steps": 3,
                    "batch_size": 1,
                    "grad_accum": 1,
                    "gradient_checkpointing": True,
                    "ema": None,
                    "warmup_steps": 0,
                    "val_items": 1,
                    "val_timesteps": 1,
                    "val_every": 1000,
                    "log_every": 1,
                    "checkpoint_every": 1000,
                    "distill": {"teacher": str(sd / "unet"), "kind": "bk_sdm"},
                },
                indent=2,
            )
        )  # fmt: skip  (JSON is YAML)
        nas("train", config, "--arch", ROOT / scale["students"][0], "--cache", work / "cache",
            "--out", work / "train", "--quiet")  # fmt: skip
        import csv

        rows = [r for r in csv.DictReader((work / "train" / "metrics.csv").open()) if r.get("step_s")]
        steps = [float(r["step_s"]) for r in rows]
        teacher_s = [float(r["teacher_s"]) for r in rows]
        return {"steps": len(steps), "step_s": steps, "teacher_s": teacher_s,
                "teacher_share": sum(teacher_s) / sum(steps), "student": Path(scale["students"][0]).stem}  # fmt: skip
    if name == "sample":
        nas("sample", work / "train", "--steps", 2, "--prompt", PROMPT, "--n", 1, "--out", work / "samples",
            "--quiet")  # fmt: skip
        from PIL import Image

        images = sorted((work / "samples").rglob("*.png"))
        return {"images": len(images), "size": list(Image.open(images[0]).size)}
    if name == "export_pipeline":
        nas("export-pipeline", work / "train", "--out", work / "pipeline")
        return {"bytes": folder_bytes(work / "pipeline")}
    if name == "diffusers_pipeline":
        import torch
        from diffusers import StableDiffusionPipeline

        # a Flex U-Net ships its class in unet/flex_unet.py (nas/models/flex_unet.py): trusted, ours
        pipe = StableDiffusionPipeline.from_pretrained(
            work / "pipeline", local_files_only=True, trust_remote_code=True
        )
        size = scale["sample_resolution"]
        image = pipe(PROMPT, num_inference_steps=1, height=size, width=size,
                     generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        image.save(work / "diffusers_pipeline.png")
        return {
            "class": type(pipe).__name__,
            "unet_class": type(pipe.unet).__name__,
            "size": list(image.size),
        }
    if name == "export_onnx":
        out = work / "onnx"
        threshold = ["--external-data-threshold", "0"] if scale["small"] else []  # force it at test size
        nas("export-onnx", sd / "unet", "--out", out, *threshold)
        report = json.loads((out / "export.json").read_text())
        return {"graph_bytes": (out / "unet.onnx").stat().st_size, "external_data": report["external_data"],
                "data_bytes": (out / report["external_data"]).stat().st_size if report["external_data"] else 0,
                "max_abs_diff": report["check"]["max_abs_diff"], "tolerance": report["check"]["tolerance"]}  # fmt: skip
    if name == "latency_table":
        nas("latency-table", ROOT / scale["space"], "--out", work / "table.json", "--device", "cpu",
            "--dtype", "fp32", "--batch", 2, *scale["table"])  # fmt: skip
        table = json.loads((work / "table.json").read_text())
        return {"blocks": len(table["blocks"]), "build_seconds": table["build_seconds"],
                "fit_networks": len(table["fit"]["points"]), "other_cores_busy": table["other_cores_busy"],
                "setup": table["setup"]}  # fmt: skip
    if name == "table_validation":
        from experiments.studies.sd_validate import validate

        return validate(ROOT / scale["space"], work / "table.json", scale["validate"], scale["whole_iters"])
    raise SystemExit(f"unknown stage {name} (allowed: {', '.join(STAGES)})")


def measured(name: str, work: Path, small: bool, images: int | None = None) -> dict:
    """Run stage `name` in a child process: its wall time, peak RSS and figures."""
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(work)] + (["--small"] if small else [])
    cmd += ["--images", str(images)] if images else []
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss: KiB on Linux)
    child.returncode = os.waitstatus_to_exitcode(status)
    row = {"stage": name, "wall_s": round(time.perf_counter() - started, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "exit_code": child.returncode}  # fmt: skip
    figures = work / "figures" / f"{name}.json"
    if child.returncode == 0 and figures.is_file():
        row["figures"] = json.loads(figures.read_text())
    else:
        row["error"] = log.read_text()[-1500:]
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="scratch folder for the SD folders, cache, runs")
    parser.add_argument("--out", help="results folder (results.json, table.md, README.md)")
    parser.add_argument("--small", action="store_true", help="tiny parts at test size, same stages")
    parser.add_argument("--stages", nargs="*", choices=STAGES, help="run these again (default: all not done)")
    parser.add_argument("--images", type=int, help="images to precompute (default: 64, the issue's count)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    work, scale = Path(args.work), dict(SMALL if args.small else SD)
    if args.images:
        scale["images_precomputed"] = args.images
    work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        figures = run_stage(args.stage, work, scale)
        (work / "figures").mkdir(exist_ok=True)
        (work / "figures" / f"{args.stage}.json").write_text(json.dumps(figures, indent=2, default=str))
        return figures
    if not args.out:
        parser.error("--out is required")
    from experiments.studies.sd_report import write_report

    out = Path(args.out)
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    data.update(small=args.small, scale=scale, command=" ".join(["python", "experiments/studies/sd_scale.py",
                *(argv if argv is not None else sys.argv[1:])]))  # fmt: skip
    for name in STAGES:
        if name in data["stages"] and "error" not in data["stages"][name] and name not in (args.stages or []):
            continue
        print(f"stage {name} ...", flush=True)
        row = data["stages"][name] = measured(name, work, args.small, args.images)
        print(f"stage {name}: {row['wall_s']} s, peak RSS {row['peak_rss_gib']} GiB"
              + (f", FAILED (see {work}/logs/{name}.log)" if "error" in row else ""), flush=True)  # fmt: skip
        write_report(out, data)
        if "error" in row:
            break
    return data


if __name__ == "__main__":
    main()
