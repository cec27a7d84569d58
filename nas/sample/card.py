"""The model card of an exported pipeline folder: README.md with the Hugging Face Hub's YAML metadata.

`nas export-pipeline` writes it beside model_index.json, so the folder is what
`huggingface_hub.upload_folder` takes (nothing is uploaded here). The metadata block follows the
Hub's model-card spec (https://huggingface.co/docs/hub/model-cards): `library_name: diffusers`,
`pipeline_tag: text-to-image`, tags, and `base_model` only where the teacher is a Hub repository
id (a local folder is named in the text instead: the Hub rejects paths there). The text states what
the folder is and how it was made, from files the run already has: the architecture (class, levels,
parameters and U-Net MACs, counted on the meta device), the recipe and training steps (config.yaml,
summary.json), the teacher (`distill:`), the measured latency with its device and source (the
search's card.json: `nas export`) and the evaluation figures (`nas eval`'s eval.json) when given or
found where `nas run` puts them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from nas.core.runfolder import ARCH, CONFIG, SUMMARY, read_json, write_text

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as Hub repository ids are written


def find_beside(run: Path) -> dict[str, Path]:
    """The search card and eval report `nas run` writes for this run, if present:
    RESULTS/<experiment>/{export/card.json, evaluate/eval/eval.json} around .../train/run."""
    root = run.resolve().parent.parent
    found = {"search_card": root / "export" / "card.json", "eval": root / "evaluate" / "eval" / "eval.json"}
    return {k: p for k, p in found.items() if p.is_file()}


def _teacher(config: dict) -> str | None:
    distill = config.get("distill") or {}
    return distill.get("teacher")


def metadata(info: dict, config: dict) -> dict[str, Any]:
    data: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["text-to-image", "diffusers", "stable-diffusion", "architecture-search", "nas"],
    }
    teacher = _teacher(config)
    if teacher and HUB_ID.match(teacher) and not Path(teacher).exists():
        data["base_model"] = teacher
    if info["unet_class"] != "UNet2DConditionModel":
        data["tags"].append("custom-code")  # trust_remote_code=True
    return data


def _levels(arch: dict) -> list[str]:
    rows = ["| level | channels | ResNets (down / up) | transformers (down / up) |", "|---:|---:|---|---|"]
    for i, lv in enumerate(arch["levels"]):
        resnets = f"{lv['resnets']} / {lv['resnets'] + 1}"
        rows.append(f"| {i} | {lv['channels']} | {resnets} | {lv['attentions']} / {lv['up_attentions']} |")
    mid = arch.get("mid")
    where = f", at {mid['resolution']} resolution" if mid and mid.get("resolution") else ""
    text = "none" if not mid else f"{mid['resnets']} ResNets, {mid['attentions']} transformers{where}"
    return [*rows, "", f"Mid block: {text}."]


def _use(out: Path, info: dict) -> list[str]:
    trust = ", trust_remote_code=True" if info.get("unet_code") else ""
    steps, guidance = info["suggested"]["num_inference_steps"], info["suggested"]["guidance_scale"]
    lines = [
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{out.name}"{trust})  # or its Hub id',
        f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance}).images[0]',
        "```",
        "",
    ]
    if info.get("unet_code"):
        code = info["unet_code"]  # its path in the folder, e.g. unet/flex_unet.py
        lines += [
            f"The U-Net is `{info['unet_class']}`, shipped as code in `{code}` (hence trust_remote_code).",
            "",
        ]
    return lines


def _architecture(arch) -> list[str]:
    from nas.cost.measure import arch_cost

    cost = arch_cost(arch)
    size = cost["latent_size"]
    return [
        "## Architecture",
        "",
        f"`{cost['model_class']}`: {cost['params']:,} parameters, {cost['macs'] / 1e9:.3f} GMACs per U-Net call"
        f" (batch 1, {size}x{size} latents, {cost['tokens']} text tokens; attention matmuls included:"
        f" {cost['attention_share']:.0%} of the MACs).",
        "",
        *_levels(arch.to_data()),
        "",
    ]


def _latency(card: dict) -> list[str]:
    device = card.get("latency_device") or "unknown device"
    how = f"{card.get('latency_source', 'measure')}, study `{card.get('study')}` trial {card.get('trial')}"
    return [
        "## Latency",
        "",
        f"{card['latency_ms_p50']:.2f} ms per U-Net call (p90 {card['latency_ms_p90']:.2f} ms), batch"
        f" {card.get('batch', 1)}, on {device} ({how}).",
        "",
    ]


def _training(info: dict, config: dict, summary: dict) -> list[str]:
    recipe = info["recipe"]
    encoder = info["text_encoder"]
    encoder_name = Path(str(encoder.get("path", "?"))).name if isinstance(encoder, dict) else str(encoder)
    val = summary.get("val_loss")
    ema = summary.get("val_loss_ema")
    loss = (
        "" if val is None else f"; validation loss {val:.4g}" + ("" if ema is None else f" (EMA {ema:.4g})")
    )
    lines = [
        "## Training",
        "",
        f"- Steps: {summary.get('step', config.get('max_steps', '?'))}{loss}.",
        f"- Recipe: {recipe.get('schedule', '?')} betas, prediction {recipe.get('prediction', '?')}, zero"
        f" terminal SNR {recipe.get('zero_terminal_snr', '?')}, Min-SNR gamma {recipe.get('min_snr_gamma')}.",
        f"- Text encoder `{encoder_name}`; images at {info['resolution']} px.",
        f"- Scheduler saved: {info['scheduler_class']} ({info['timestep_spacing']} timestep spacing).",
    ]
    teacher = _teacher(config)
    if teacher:
        kind = (config.get("distill") or {}).get("kind", "bk_sdm")
        shown = Path(teacher).name if Path(teacher).exists() else teacher
        lines.append(f"- Distilled ({kind}) from the teacher `{shown}`.")
    return [*lines, ""]


def _evaluation(report: dict) -> list[str]:
    lines = ["## Evaluation", "", "| steps | alignment | Frechet distance |", "|---:|---:|---:|"]
    for row in report.get("results", []):
        if "alignment" in row:
            lines.append(f"| {row['steps']} | {row['alignment']:.3f} | {row['frechet_distance']:.1f} |")
    real = report.get("reference", {}).get("real_alignment")
    if real is not None:
        lines += ["", f"Real images score alignment {real:.3f} with the same evaluator."]
    return [*lines, ""]


def model_card(
    out: Path, run: Path, info: dict, search_card: Path | None = None, eval_report: Path | None = None
) -> str:
    """The card's text (front matter + body) for the pipeline exported from `run` into `out`."""
    from nas.space import load_arch

    run = Path(run)
    config = yaml.safe_load((run / CONFIG).read_text()) if (run / CONFIG).is_file() else {}
    arch = load_arch(run / ARCH) if (run / ARCH).is_file() else None
    title = arch.name if arch is not None else run.name
    lines = [
        "---",
        yaml.safe_dump(metadata(info, config), sort_keys=False).strip(),
        "---",
        "",
        f"# {title}",
        "",
    ]
    lines += [
        "A latent text-to-image diffusion pipeline (a diffusers `StableDiffusionPipeline` folder) whose"
        " U-Net was found by architecture search and trained with `nas`.",
        "",
    ]
    lines += _use(out, info)
    if arch is not None:
        lines += _architecture(arch)
    card = read_json(search_card, None) if search_card else None
    if card:
        lines += _latency(card)
    lines += _training(info, config, read_json(run / SUMMARY, {}))
    report = read_json(eval_report, None) if eval_report else None
    if report:
        lines += _evaluation(report)
    lines += [
        "## Limits",
        "",
        "Quality holds for the data it was trained on (the cache named in the run's config). Add a"
        " `license:` to the metadata before publishing.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out: Path, run: Path, info: dict, search_card: Path | None = None,
                     eval_report: Path | None = None) -> Path:  # fmt: skip
    found = find_beside(Path(run))
    text = model_card(
        out, run, info, search_card or found.get("search_card"), eval_report or found.get("eval")
    )
    write_text(out / CARD, text)
    return out / CARD
