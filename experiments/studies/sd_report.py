"""results.json, table.md and README.md of experiments/studies/sd_scale.py."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

WHAT = {
    "parts": "build SD 1.5's U-Net, VAE, CLIP text encoder + tokenizer (random weights), save_pretrained",
    "precompute": "1. `nas precompute`: images through the SD VAE and text encoder",
    "inherit": "2. `nas inherit` SD 1.5 -> each student layout",
    "train": "3. `nas train` with `distill:` from the SD teacher, gradient checkpointing",
    "sample": "4. `nas sample`, 2 steps",
    "export_pipeline": "4. `nas export-pipeline`",
    "diffusers_pipeline": "4. plain `StableDiffusionPipeline.from_pretrained` on the export, 1 step",
    "export_onnx": "5. `nas export-onnx` of the SD U-Net, ONNX Runtime vs eager",
    "latency_table": "6. `nas latency-table SPACE --device cpu --dtype fp32 --batch 2`",
    "table_validation": "6. the table against random architectures measured whole",
}


def _figures(name: str, f: dict) -> str:
    if name == "parts":
        return (f"U-Net {f['unet_params']:,}, VAE {f['vae_params']:,}, text encoder {f['text_encoder_params']:,}"
                f" params; tokenizer vocabulary {f['vocab']}")  # fmt: skip
    if name == "precompute":
        return f"{f['items']} items, {f['bytes_per_item'] / 1024:.1f} KiB per item, {f['latent_size']}x{f['latent_size']} latents"
    if name == "inherit":
        return "; ".join(f"{k}: {v['seconds']} s, {v['bytes'] / 1e9:.2f} GB" for k, v in f.items())
    if name == "train":
        steady = f["step_s"][1:] or f["step_s"]
        return (f"{f['steps']} steps of {f['student']}, {sum(steady) / len(steady):.1f} s/step after the first"
                f" ({f['step_s'][0]:.1f} s), teacher {100 * f['teacher_share']:.0f}% of step time")  # fmt: skip
    if name in ("sample", "diffusers_pipeline"):
        return f"image {f['size'][0]}x{f['size'][1]}" + (f", {f['class']}" if "class" in f else "")
    if name == "export_pipeline":
        return f"{f['bytes'] / 1e9:.2f} GB"
    if name == "export_onnx":
        data = f"{f['external_data']} {f['data_bytes'] / 1e9:.2f} GB" if f["external_data"] else "inline"
        return (f"graph {f['graph_bytes'] / 1e6:.1f} MB + {data}; max abs diff {f['max_abs_diff']:.2e}"
                f" (tolerance {f['tolerance']:g})")  # fmt: skip
    if name == "latency_table":
        return f"{f['blocks']} blocks, built in {f['build_seconds']:.0f} s, {f['fit_networks']} fit networks"
    if name == "table_validation":
        return (f"{f['count']} networks: Spearman rho {f['spearman']:.3f}, MAPE {f['mape_pct']:.1f}%,"
                f" {100 * f['within_10pct']:.0f}% within +-10%")  # fmt: skip
    return json.dumps(f)[:200]


def table_md(data: dict) -> str:
    lines = ["| stage | what | wall time | peak RSS | figures |", "|---|---|---:|---:|---|"]
    for name, row in data["stages"].items():
        figures = _figures(name, row["figures"]) if "figures" in row else f"FAILED (exit {row['exit_code']})"
        what = WHAT[name].replace("SPACE", data["scale"]["space"])
        lines.append(
            f"| {name} | {what} | {row['wall_s']:.0f} s | {row['peak_rss_gib']:.1f} GiB | {figures} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data.setdefault(
        "machine", {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    )
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "table.md").write_text(table_md(data))
    readme = out / "README.md"
    notes = data.get("notes", "")
    readme.write_text(
        f"# SD size on a CPU{' (test size)' if data.get('small') else ''}\n\n"
        f"Command: `{data['command']}` (last stage {data['updated']}). Each stage runs as its own process;"
        " wall time and peak RSS are that process's (os.wait4).\n\n"
        + table_md(data)
        + ("\n" + notes if notes else "")
    )
