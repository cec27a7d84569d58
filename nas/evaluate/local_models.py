"""Pretrained scorers whose weights the user has on disk: nothing here downloads.

- `InceptionFid(weights)`: the standard FID (Heusel et al. 2017) through torchmetrics, whose Inception
  network (torch-fidelity's port of the 2015 TensorFlow graph) is loaded from the given file with
  `feature_extractor_weights_path`; `nas eval --fid-weights FILE`.
- `LocalClip(folder)`: a CLIP model folder (transformers' `CLIPModel`, loaded with
  `local_files_only=True`), for prompt alignment by retrieval and the CLIP score (Hessel et al. 2021,
  as torchmetrics computes it: 100 * max(cos, 0)); `nas eval --clip DIR`.

torchmetrics and torch-fidelity are not dependencies of nas; where they are missing the error says what
to install, with the installed torch pinned (nas/core/install.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nas.core.errors import NasError
from nas.core.install import pip_install

FID_BATCH = 50  # images per Inception forward (at 299 px: ~54 MB of input each)


def check_fid_available(weights: str | Path) -> Path:
    """Before any work: the weights file exists and torchmetrics + torch-fidelity import."""
    path = Path(weights)
    if not path.is_file():
        raise NasError(f"--fid-weights {path}: no such file (expected torch-fidelity's Inception weights, "
                       "weights-inception-2015-12-05-6726825d.pth)")  # fmt: skip
    missing = [name for name, module in (("torchmetrics", "torchmetrics"), ("torch-fidelity", "torch_fidelity"))
               if importlib.util.find_spec(module) is None]  # fmt: skip
    if missing:
        raise NasError(f"--fid-weights: Inception FID needs {' and '.join(missing)} "
                       f"({pip_install('torchmetrics[image]', 'torch-fidelity')})")  # fmt: skip
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InceptionFid:
    """FID of image sets against one real set; images FloatTensor[N, 3, H, W] in [0, 1]."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu"):
        path = check_fid_available(weights)
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            self.metric = FrechetInceptionDistance(
                feature=2048,
                normalize=True,
                reset_real_features=False,
                feature_extractor_weights_path=str(path),
            ).to(device)
        except TypeError:
            raise NasError("--fid-weights: this torchmetrics cannot load Inception weights from a file; "
                           f"upgrade it ({pip_install('-U', 'torchmetrics[image]')})") from None  # fmt: skip
        except Exception as exc:  # a wrong or damaged file surfaces as assorted errors
            raise NasError(
                f"--fid-weights {path}: cannot load Inception weights ({_first_line(exc)})"
            ) from None
        self.device = device
        self.has_real = False

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for i in range(0, len(images), FID_BATCH):
            self.metric.update(images[i : i + FID_BATCH].float().clamp(0, 1).to(self.device), real=real)

    def set_real(self, images: torch.Tensor) -> None:
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        self._update(images, real=True)
        self.has_real = True

    def __call__(self, images: torch.Tensor) -> float:
        """FID of `images` against the real set (>= 2 images each)."""
        if not self.has_real or len(images) < 2:
            raise NasError("Inception FID: needs a real set and at least 2 images")
        self.metric.reset()  # keeps the real features (reset_real_features=False)
        self._update(images, real=False)
        return float(self.metric.compute())


class LocalClip:
    """A CLIP model from a local folder: unit image and prompt embeddings, image features."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        import transformers

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise NasError(f"--clip {path}: no config.json (expected a local CLIP model folder, "
                           "as CLIPModel.save_pretrained writes it, with its tokenizer and image processor)")  # fmt: skip
        transformers.utils.logging.disable_progress_bar()
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            if config.model_type != "clip":
                raise NasError(f"--clip {path}: model_type {config.model_type!r}, expected 'clip' "
                               "(a full CLIP model with text and vision towers)")  # fmt: skip
            self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise NasError(f"--clip {path}: cannot load the CLIP model, tokenizer and image processor "
                           f"({_first_line(exc)})") from None  # fmt: skip
        self.model.eval().requires_grad_(False).to(device)
        self.device = device
        self.path = path
        self.max_length = int(
            getattr(self.model.config.text_config, "max_position_embeddings", 77)
        )  # CLIP: 77

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 4 / 5

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Projected image embeddings [N, projection_dim] (not normalised): the Frechet features."""
        out = []
        for i in range(0, len(images), batch):
            pixels = (images[i : i + batch].float().clamp(0, 1) * 255).round().to(torch.uint8)
            arrays = list(pixels.permute(0, 2, 3, 1).numpy().astype(np.uint8))
            inputs = self.processor(images=arrays, return_tensors="pt")
            emb = self._pooled(
                self.model.get_image_features(pixel_values=inputs.pixel_values.to(self.device))
            )
            out.append(emb.float().cpu())
        return torch.cat(out)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(images), dim=-1)

    @torch.no_grad()
    def prompt_embeddings(self, prompts: list[str], batch: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch):
            tokens = self.tokenizer(prompts[i : i + batch], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)  # fmt: skip
            out.append(self._pooled(self.model.get_text_features(**tokens)).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)
