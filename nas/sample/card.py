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


# --- LoRA run card --------------------------------------------------------------------------------

LORA_INFO_FILE = "lora.json"  # written by nas/train/lora.py beside pytorch_lora_weights.safetensors


def lora_metadata(base_model: str | None = None) -> dict[str, Any]:
    """A LoRA folder's Hub metadata; `base_model` only as a Hub id (the Hub rejects local paths)."""
    data: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["text-to-image", "diffusers", "lora", "nas"],
    }
    if base_model and HUB_ID.match(base_model) and not Path(base_model).exists():
        data["base_model"] = base_model
    return data


def lora_card(run: Path, base_model: str | None = None) -> str:
    """The card of a `lora:` training run (RUN/lora.json, config.yaml, summary.json): what the adapter
    is, its settings and share of parameters, the data and steps, the validation loss before/after."""
    run = Path(run)
    info = read_json(run / LORA_INFO_FILE, {})
    config = yaml.safe_load((run / CONFIG).read_text()) if (run / CONFIG).is_file() else {}
    summary = read_json(run / SUMMARY, {})
    base = str(info.get("init_from", "?"))
    where = base_model if "base_model" in lora_metadata(base_model) else None
    loaded = where or "BASE_PIPELINE"  # no Hub id given: the base run's `nas export-pipeline` folder
    before, after = summary.get("val_loss_start"), summary.get("val_loss")
    loss = "not recorded" if after is None else f"{after:.4g}"
    if before is not None and after is not None:
        loss = f"{before:.4g} before (the base model: the adapter starts as the identity), {after:.4g} after"
    data = config.get("cache_filter")
    subset = "" if not data else f", only the items with {', '.join(f'{k} = {v}' for k, v in data.items())}"
    lines = [
        "---",
        yaml.safe_dump(lora_metadata(base_model), sort_keys=False).strip(),
        "---",
        "",
        f"# LoRA {run.name}",
        "",
        f"A LoRA adapter (diffusers' format: `{info.get('weights', 'pytorch_lora_weights.safetensors')}`) for the"
        f" U-Net of the `nas` run `{Path(base).name}` ({info.get('base_unet_class', '?')}, its"
        f" {info.get('base_weights', '?')} weights), trained with `nas train` and a `lora:` section.",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{loaded}", trust_remote_code=True)  # the base pipeline',
        f'pipe.load_lora_weights("{run.name}")  # this folder',
        'image = pipe("a prompt").images[0]',
        "```",
        "",
        f"With `nas`: `nas sample BASE_RUN --lora {run.name} [--lora-scale S]`.",
        "",
        "## Adapter",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base | `{base}` |",
        f"| rank | {info.get('rank', '?')} |",
        f"| alpha | {info.get('alpha', '?')} |",
        f"| target modules | {', '.join(f'`{m}`' for m in info.get('target_modules', []))} |",
        f"| trainable parameters | {info.get('trainable_params', 0):,} of {info.get('total_params', 0):,}"
        f" ({100 * info.get('trainable_share', 0):.3f}%) |",
        "",
        "## Training",
        "",
        f"- Steps: {summary.get('step', config.get('max_steps', '?'))}, batch {config.get('batch_size', '?')},"
        f" lr {config.get('lr', '?')} ({config.get('lr_schedule', '?')}).",
        f"- Data: the latent cache `{Path(str(config.get('cache', '?'))).name}`{subset}; the last"
        f" {config.get('val_items', '?')} of them held out.",
        f"- Validation loss on the held-out items: {loss}.",
        "",
        "## Limits",
        "",
        "The adapter fits only the U-Net it was trained on (its module names and widths). Name the base"
        " pipeline's Hub id as `base_model` and add a `license:` to the metadata before publishing.",
        "",
    ]
    return "\n".join(lines)


def write_lora_card(run: Path, base_model: str | None = None) -> Path:
    """RUN/README.md: the LoRA run folder is then what `huggingface_hub.upload_folder` takes."""
    write_text(Path(run) / CARD, lora_card(run, base_model))
    return Path(run) / CARD


# --- ControlNet card ------------------------------------------------------------------------------

CONTROLNET_INFO_FILE = "controlnet.json"  # written by nas/train/controlnet.py beside RUN/controlnet/


def controlnet_metadata(custom_code: bool, base_model: str | None = None) -> dict[str, Any]:
    """A ControlNet folder's Hub metadata; `base_model` only as a Hub id (the Hub rejects local paths:
    the base run is named in the text)."""
    data: dict[str, Any] = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["controlnet", "text-to-image", "diffusers", "nas"]
        + (["custom-code"] if custom_code else []),
    }
    if base_model and HUB_ID.match(base_model) and not Path(base_model).exists():
        data["base_model"] = base_model
    return data


def controlnet_card(run: Path, base_model: str | None = None, eval_reports: dict | None = None) -> str:
    """The card of a `controlnet:` training run's RUN/controlnet folder (RUN/controlnet.json,
    config.yaml, summary.json): the base U-Net, the condition, the parameters, the training, and
    (`eval_reports`: {"without": eval.json, "with": eval.json}) position and size accuracy."""
    run = Path(run)
    info = read_json(run / CONTROLNET_INFO_FILE, {})
    config = yaml.safe_load((run / CONFIG).read_text()) if (run / CONFIG).is_file() else {}
    summary = read_json(run / SUMMARY, {})
    custom = info.get("controlnet_class") == "FlexControlNetModel"
    base = str(info.get("init_from", "?"))
    trust = ", trust_remote_code=True" if custom else ""
    loader = "AutoModel" if custom else "ControlNetModel"
    before, after = summary.get("val_loss_start"), summary.get("val_loss")
    loss = "not recorded" if after is None else f"{after:.4g}"
    if before is not None and after is not None:
        loss = f"{before:.4g} before (zero output convolutions: the bare U-Net), {after:.4g} after"
    kind = info.get("condition", "?")
    drawn = {"mask": "the objects' silhouettes", "edges": "the objects' outlines"}.get(kind, kind)
    lines = [
        "---",
        yaml.safe_dump(controlnet_metadata(custom, base_model), sort_keys=False).strip(),
        "---",
        "",
        f"# ControlNet ({kind}) for {'/'.join(Path(base).parts[-3:])}",
        "",
        f"A ControlNet (Zhang et al. 2023; a diffusers folder of `{info.get('controlnet_class', 'ControlNetModel')}`)"
        f" for the U-Net of the `nas` run `{Path(base).name}` ({info.get('base_unet_class', '?')}, its"
        f" {info.get('base_weights', '?')} weights), trained with `nas train` and a `controlnet:` section,"
        " the U-Net frozen.",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {loader}, StableDiffusionControlNetPipeline, StableDiffusionPipeline",
        "",
        f'base = StableDiffusionPipeline.from_pretrained("BASE_PIPELINE"{trust})  # nas export-pipeline of the base run',
        f'controlnet = {loader}.from_pretrained("{CONTROLNET_DIR_NAME}"{trust})  # this folder',
        "pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)",
        f'image = pipe("a prompt", image=control_image).images[0]  # control image: {info.get("resolution", "?")} px',
        "```",
        "",
        f"With `nas`: `nas sample BASE_RUN --controlnet {CONTROLNET_DIR_NAME} --control-image FILE"
        " [--controlnet-scale S]`.",
        "",
        "## Condition",
        "",
        f"`{kind}`: {drawn}, white on black, {info.get('resolution', '?')} x {info.get('resolution', '?')} px"
        f" (the output size), re-drawn from each shapes record (dataset seed {info.get('dataset_seed', '?')}).",
        "",
        "## Training",
        "",
        f"- Base: `{base}`.",
        f"- Parameters: {info.get('controlnet_params', 0):,} trained (the ControlNet), the U-Net's"
        f" {info.get('unet_params', 0):,} frozen.",
        f"- Steps: {summary.get('step', config.get('max_steps', '?'))}, batch {config.get('batch_size', '?')},"
        f" lr {config.get('lr', '?')} ({config.get('lr_schedule', '?')}).",
        f"- Validation loss on the held-out items: {loss}.",
        "",
    ]
    reports = eval_reports or {}
    if reports.get("with") and reports.get("without"):
        lines += ["## Control", "", "| | position | size | alignment |", "|---|---:|---:|---:|"]
        for name in ("without", "with"):
            row = reports[name]["results"][-1]
            attrs = row.get("alignment_by_attribute", {})
            lines.append(f"| {name} ControlNet | {attrs.get('position', float('nan')):.3f} |"
                         f" {attrs.get('size', float('nan')):.3f} | {row.get('alignment', float('nan')):.3f} |")  # fmt: skip
        lines += ["", "The shapes evaluator's accuracy on the same prompts and seeds (`nas eval`).", ""]
    lines += [
        "## Limits",
        "",
        "The ControlNet fits only the U-Net it was made from (its encoder's shapes). Name the base"
        " pipeline's Hub id as `base_model` and add a `license:` to the metadata before publishing.",
        "",
    ]
    return "\n".join(lines)


CONTROLNET_DIR_NAME = "controlnet"  # RUN/controlnet (nas/train/controlnet.py CONTROLNET_DIR)


def write_controlnet_card(run: Path, base_model: str | None = None, eval_reports: dict | None = None) -> Path:
    """RUN/controlnet/README.md: the ControlNet folder is then what `huggingface_hub.upload_folder` takes."""
    out = Path(run) / CONTROLNET_DIR_NAME / CARD
    write_text(out, controlnet_card(run, base_model, eval_reports))
    return out
