"""Evaluator for `shapes`: a small CNN trained on the generator's labels.

It reads each cell of the 3x3 grid (empty or which shape, colour, size) and the background, which
gives (a) prompt alignment: the fraction of prompted attributes a generated image shows, and (b)
penultimate-layer features for a Frechet distance on this domain (an FID analogue that needs no
Inception weights; with weights on disk, nas/evaluate/local_models.py computes the standard FID).
Training images are drawn fresh from the generator's train split, so validation scenes are never
seen. Weights are safetensors + JSON config, never a pickle.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.core.config import Strict
from nas.core.errors import NasError
from nas.core.runfolder import atomic_path, write_json
from nas.data import shapes
from nas.evaluate.folder import CONFIG, WEIGHTS, load_weights, read_config

CELLS = len(shapes.POSITION_NAMES)
N_SHAPE = len(shapes.SHAPES) + 1  # class 0 = empty cell
N_COLOUR, N_SIZE, N_BG = len(shapes.COLOURS), len(shapes.SIZES), len(shapes.BACKGROUNDS)
ATTRIBUTES = ("shape", "colour", "size", "position")  # per object; plus the background per image


class EvaluatorConfig(Strict):
    resolution: int = 32  # pixels; other image sizes are resized to this
    channels: tuple[int, ...] = (32, 64, 128)  # conv widths; each after the first halves the size
    feature_dim: int = 256  # width of the feature layer used for the Frechet distance
    train_images: int = 20000  # generated from the train split (fresh scenes, not the dataset's)
    steps: int = 2500  # optimizer steps
    batch_size: int = 64  # images per step
    learning_rate: float = 2e-3  # AdamW peak, one-cycle schedule
    val_images: int = 1000  # generated from the validation split when no --data is given
    seed: int = 1  # differs from the dataset's default seed 0: other images, same distribution


class ShapesClassifier(nn.Module):
    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(config.channels):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(c_in, c, 3, stride, 1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, 1, 1),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            ]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = config.resolution // 2 ** (len(config.channels) - 1)
        # Flatten (not pool): the heads must know where things are.
        self.feature = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * side * side, config.feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(config.feature_dim, CELLS * (N_SHAPE + N_COLOUR + N_SIZE) + N_BG)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        feats = self.feature(self.body(x * 2 - 1))
        out = self.head(feats)
        cells, bg = out[:, :-N_BG].view(len(x), CELLS, -1), out[:, -N_BG:]
        logits = {
            "shape": cells[..., :N_SHAPE],
            "colour": cells[..., N_SHAPE : N_SHAPE + N_COLOUR],
            "size": cells[..., N_SHAPE + N_COLOUR :],
            "background": bg,
        }
        return feats, logits


def targets(records: list[dict]) -> dict[str, torch.Tensor]:
    """Labels as class indices: per cell shape (0 = empty), colour and size (-1 where empty)."""
    n = len(records)
    shape = torch.zeros(n, CELLS, dtype=torch.long)
    colour = torch.full((n, CELLS), -1, dtype=torch.long)
    size = torch.full((n, CELLS), -1, dtype=torch.long)
    bg = torch.zeros(n, dtype=torch.long)
    colours, sizes, bgs = list(shapes.COLOURS), list(shapes.SIZES), list(shapes.BACKGROUNDS)
    for i, r in enumerate(records):
        bg[i] = bgs.index(r["background"])
        for obj in r["objects"]:
            cell = shapes.POSITION_NAMES.index(obj["position"])
            shape[i, cell] = shapes.SHAPES.index(obj["shape"]) + 1
            colour[i, cell] = colours.index(obj["colour"])
            size[i, cell] = sizes.index(obj["size"])
    return {"shape": shape, "colour": colour, "size": size, "background": bg}


def decode(logits: dict) -> list[dict]:
    """Predicted scenes ({"objects": [...], "background"}) from classifier logits."""
    shape = logits["shape"].argmax(-1)
    colour, size, bg = logits["colour"].argmax(-1), logits["size"].argmax(-1), logits["background"].argmax(-1)
    colours, sizes, bgs = list(shapes.COLOURS), list(shapes.SIZES), list(shapes.BACKGROUNDS)
    scenes = []
    for i in range(len(shape)):
        objects = [
            {
                "shape": shapes.SHAPES[int(shape[i, c]) - 1],
                "colour": colours[int(colour[i, c])],
                "size": sizes[int(size[i, c])],
                "position": shapes.POSITION_NAMES[c],
            }
            for c in range(CELLS)
            if int(shape[i, c]) > 0
        ]
        scenes.append({"objects": objects, "background": bgs[int(bg[i])]})
    return scenes


def score_scene(predicted: dict, prompted: dict) -> dict[str, tuple[int, int]]:
    """Per attribute (matched, prompted) for one image.

    Each prompted object is paired with at most one detected object (the pairing that matches the
    most attributes), so one drawn object cannot satisfy two prompted ones.
    """
    from scipy.optimize import linear_sum_assignment

    want, got = prompted["objects"], predicted["objects"]
    counts = {a: [0, len(want)] for a in ATTRIBUTES}
    counts["background"] = [int(predicted["background"] == prompted["background"]), 1]
    if want and got:
        match = np.array([[[w[a] == g[a] for a in ATTRIBUTES] for g in got] for w in want], dtype=np.int64)
        rows, cols = linear_sum_assignment(-match.sum(-1))
        for r, c in zip(rows, cols):
            for k, a in enumerate(ATTRIBUTES):
                counts[a][0] += int(match[r, c, k])
    return {a: (m, n) for a, (m, n) in counts.items()}


def alignment_report(predicted: list[dict], prompted: list[dict]) -> dict[str, float]:
    """Fraction of prompted attributes shown, overall ("alignment") and per attribute.

    Unprompted extra objects do not lower the alignment (it measures what was asked for);
    "extra_objects" (mean per image) reports them, so an image full of shapes cannot pass unseen.
    """
    totals: dict[str, list[int]] = {}
    extra = 0
    for p, w in zip(predicted, prompted, strict=True):
        for a, (m, n) in score_scene(p, w).items():
            t = totals.setdefault(a, [0, 0])
            t[0], t[1] = t[0] + m, t[1] + n
        extra += max(0, len(p["objects"]) - len(w["objects"]))
    report = {a: m / n for a, (m, n) in totals.items() if n}
    report["alignment"] = sum(m for m, _ in totals.values()) / max(1, sum(n for _, n in totals.values()))
    report["extra_objects"] = extra / max(1, len(prompted))
    return report


class Evaluator:
    """A trained ShapesClassifier in eval mode; images are FloatTensor[B, 3, H, W] in [0, 1]."""

    kind = "shapes"

    def __init__(self, model: ShapesClassifier, config: EvaluatorConfig, info: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.info = info or {}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise NasError(f"evaluator: expected images [B, 3, H, W], got {list(images.shape)}")
        images = images.float().clamp(0, 1)
        r = self.config.resolution
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return images.to(next(self.model.parameters()).device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> list[dict]:
        scenes = []
        for i in range(0, len(images), batch):
            scenes += decode(self.model(self._prepare(images[i : i + batch]))[1])
        return scenes

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """FloatTensor[B, feature_dim]: inputs to `frechet_distance`."""
        return torch.cat(
            [self.model(self._prepare(images[i : i + batch]))[0].cpu() for i in range(0, len(images), batch)]
        )

    def alignment(self, images: torch.Tensor, records: list[dict]) -> float:
        """Fraction of prompted attributes (shape, colour, size, position, background) shown."""
        return alignment_report(self.predict(images), records)["alignment"]

    def report(self, images: torch.Tensor, records: list[dict]) -> dict[str, float]:
        return alignment_report(self.predict(images), records)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as FID (Heusel et al. 2017)."""
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise NasError(f"frechet_distance: need two [N>=2, F] feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # With fewer images than feature dimensions the covariances are rank-deficient and scipy
        # warns that the square root "might be inaccurate"; pytorch-fid computes the same value and
        # ignores it too. A non-finite root is handled below, as pytorch-fid does.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)  # (`disp` is deprecated since SciPy 1.16)
    if not np.isfinite(covmean).all():  # singular product: offset as pytorch-fid does
        offset = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def _as_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def generated(n: int, config: EvaluatorConfig, split: str) -> tuple[torch.Tensor, list[dict]]:
    pairs = list(shapes.generate(n, config.resolution, config.seed, split=split))
    return _as_tensor([p[0] for p in pairs]), [p[1] for p in pairs]


def train_evaluator(
    config: EvaluatorConfig, val: tuple[torch.Tensor, list[dict]] | None = None, log=print
) -> tuple[Evaluator, dict]:
    """Train on fresh train-split images; report validation accuracy on `val` (or generated ones)."""
    from tqdm import tqdm

    start = time.perf_counter()
    x, records = generated(config.train_images, config, "train")
    y = targets(records)
    val_x, val_records = val if val is not None else generated(config.val_images, config, "validation")
    torch.manual_seed(config.seed)
    model = ShapesClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="evaluator", unit="step")
    for step in bar:
        idx = torch.randint(len(x), (config.batch_size,), generator=gen)
        _, logits = model(x[idx])
        losses = [
            F.cross_entropy(
                logits[k].reshape(-1, logits[k].shape[-1]), y[k][idx].reshape(-1), ignore_index=-1
            )
            for k in ("shape", "colour", "size", "background")
        ]
        loss = sum(losses[1:], losses[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    evaluator = Evaluator(model, config)
    metrics = validation_metrics(evaluator, val_x, val_records)
    metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    evaluator.info = metrics
    return evaluator, metrics


def validation_metrics(evaluator: Evaluator, images: torch.Tensor, records: list[dict]) -> dict:
    """Per-attribute accuracy on ground-truth images and the share of images read exactly right."""
    predicted = evaluator.predict(images)
    report = alignment_report(predicted, records)
    extra = report.pop("extra_objects")
    # Exact: every attribute right and nothing extra.
    exact = np.mean(
        [p == {"objects": r["objects"], "background": r["background"]} for p, r in zip(predicted, records)]
    )
    return {
        "val_images": len(records),
        "val_alignment": report.pop("alignment"),
        "val_accuracy": {k: round(v, 4) for k, v in report.items()},
        "val_exact_scene": float(exact),
        "val_extra_objects": extra,
    }


def save_evaluator(evaluator: Evaluator, out: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in evaluator.model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    vocabulary = {
        "shapes": list(shapes.SHAPES),
        "colours": list(shapes.COLOURS),
        "sizes": list(shapes.SIZES),
        "positions": list(shapes.POSITION_NAMES),
        "backgrounds": list(shapes.BACKGROUNDS),
    }
    doc = {
        "kind": "shapes",  # nas/evaluate/evaluators.py opens a folder by its kind
        "config": evaluator.config.model_dump(mode="json"),
        "vocabulary": vocabulary,
        "metrics": evaluator.info,
    }
    write_json(out / CONFIG, doc)


def load_evaluator(path: str | Path) -> Evaluator:
    """An evaluator saved by `nas data train-evaluator` (evaluator.json + evaluator.safetensors)."""
    from nas.core.config import validate

    path = Path(path)
    doc = read_config(path)
    if doc.get("kind", "shapes") != "shapes":
        raise NasError(f"{path / CONFIG}: a {doc.get('kind')!r} evaluator, not a shapes one "
                       "(nas.evaluate.evaluators.load_evaluator opens every kind)")  # fmt: skip
    config = validate(EvaluatorConfig, doc.get("config"), f"{path / CONFIG}: config")
    if doc.get("vocabulary", {}).get("shapes") != list(shapes.SHAPES):
        raise NasError(f"{path / CONFIG}: trained for another shapes vocabulary; retrain the evaluator")
    model = load_weights(ShapesClassifier(config), path)
    return Evaluator(model, config, doc.get("metrics"))
