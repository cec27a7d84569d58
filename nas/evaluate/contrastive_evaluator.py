"""Contrastive evaluator for any captioned data: a small image encoder trained against the cache's text.

`nas data train-evaluator --cache CACHE` trains it on the items of a latent cache (`nas precompute`):
the images are read again from the source the cache was made from (its manifest names it, and its
listing hash is checked), resized as the cache resized them; the text side is the cache's own caption
states, mean-pooled over the valid tokens and kept frozen, with a trainable linear head. The loss is
CLIP's symmetric InfoNCE with a learned temperature (Radford et al. 2021); items with the same caption
are all positives of each other (soft targets), so repeated captions are not pushed apart.

It gives what `nas eval` needs on data without labels, offline:

- alignment: how often an image retrieves its own prompt among K prompts (its own and K-1 drawn at
  random from the other, distinct prompts), computed exactly over all draws; chance is 1/K;
- image features (the layer before the projection) for a Frechet distance, as the shapes evaluator's.

The last `val_items` items are held out, as the trainer holds them out (same default, 64), and the
validation retrieval is reported. Weights are safetensors + JSON, never a pickle.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.core.config import Strict
from nas.core.errors import NasError
from nas.core.runfolder import atomic_path, write_json
from nas.evaluate.folder import CONFIG, WEIGHTS, load_weights, read_config

KIND = "contrastive"  # evaluator.json's "kind"
DEFAULT_K = 8  # prompts each image is ranked among, its own included: chance 1/8 = 0.125
TEXT_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # nas.data.cache.TEXT_DTYPES


class ContrastiveConfig(Strict):
    resolution: int = 32  # pixels: the cache's; other image sizes are resized to this
    max_side: int = 64  # pixels; larger images are area-downsampled to this first (bounds the cost)
    channels: tuple[int, ...] = (32, 64, 128)  # conv widths; each level after the first halves the side
    feature_dim: int = 256  # width of the feature layer used for the Frechet distance
    embed_dim: int = 128  # the shared image-text space
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # items per step (fewer if the training split is smaller)
    learning_rate: float = 2e-3  # AdamW peak, one-cycle schedule (as the shapes evaluator)
    shift: float = 0.0625  # random translation, share of the side (2 px at 32 px); no flips or colours
    val_items: int = 64  # the last items, held out; nas/train/config.py's val_items default
    max_items: int = 20000  # training items read from the source at most (memory: 12 KB each at 64 px)
    temperature: float = 0.07  # initial softmax temperature, learned (CLIP's initial value)
    seed: int = 1  # model initialisation, batches and augmentation


class ImageEncoder(nn.Module):
    """Conv levels (BatchNorm, ReLU), a 4x4 average pool, flatten: position is kept, size is bounded."""

    def __init__(self, config: ContrastiveConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(config.channels):
            layers += [nn.Conv2d(c_in, c, 3, 1 if i == 0 else 2, 1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU()]  # fmt: skip
            c_in = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(c_in * 16, config.feature_dim), nn.ReLU())
        self.project = nn.Linear(config.feature_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (features [B, feature_dim], embedding [B, embed_dim], not normalised)."""
        feats = self.feature(self.body(x))
        return feats, self.project(feats)


class ContrastiveModel(nn.Module):
    def __init__(self, config: ContrastiveConfig, text_dim: int):
        super().__init__()
        self.image = ImageEncoder(config)
        self.text = nn.Linear(text_dim, config.embed_dim)  # the trainable head on frozen text states
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))

    def logits(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        img = F.normalize(self.image(x)[1], dim=-1)
        txt = F.normalize(self.text(pooled), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * img @ txt.T  # CLIP caps the scale at 100


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the caption states over its valid tokens: [B, T, D], [B, T] -> [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


def retrieval_alignment(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], k: int) -> dict:
    """How often image i ranks its own prompt first among K: its own and K-1 other prompts drawn at
    random from the distinct captions unlike its own. Exact expectation over the draws: if the own
    prompt beats m of the D others, P(first) = C(m, K-1) / C(D, K-1). Chance is 1/K; K is capped
    at the number of distinct captions. `top1_all`: first among all of them."""
    if len(captions) != len(image_emb) or len(text_emb) != len(image_emb):
        raise NasError(
            f"retrieval: {len(image_emb)} images, {len(text_emb)} prompts, {len(captions)} captions"
        )
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    distinct = len(first)
    if distinct < 2:
        raise NasError(f"alignment needs at least 2 distinct prompts, got {distinct}; raise --n")
    k = min(k, distinct)
    reps = torch.tensor(list(first.values()))
    sims = (image_emb.float() @ text_emb.float()[reps].T).numpy()  # [N, distinct]
    rep_of = {c: j for j, c in enumerate(first)}
    total = top1 = 0.0
    for i, caption in enumerate(captions):
        own = rep_of[caption]
        others = np.delete(sims[i], own)
        m = int((others < sims[i, own]).sum())
        total += math.comb(m, k - 1) / math.comb(distinct - 1, k - 1)
        top1 += float(m == distinct - 1)
    n = len(captions)
    return {"alignment": total / n, "chance_alignment": 1 / k, "alignment_k": k,
            "top1_all": top1 / n, "distinct_prompts": distinct}  # fmt: skip


class ContrastiveEvaluator:
    """A trained ContrastiveModel in eval mode; images are FloatTensor[B, 3, H, W] in [0, 1]."""

    kind = KIND

    def __init__(
        self, model: ContrastiveModel, config: ContrastiveConfig, text: dict, info: dict | None = None
    ):
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.text = text  # the cache's text encoder: identity (path, sha256, class), text_len, text_dtype
        self.info = info or {}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise NasError(f"evaluator: expected images [B, 3, H, W], got {list(images.shape)}")
        images = fit(images.float().clamp(0, 1), self.config)
        return (images * 2 - 1).to(next(self.model.parameters()).device)

    @torch.no_grad()
    def _run(self, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats, embs = [], []
        for i in range(0, len(images), batch):
            f, e = self.model.image(self._prepare(images[i : i + batch]))
            feats.append(f.cpu())
            embs.append(F.normalize(e, dim=-1).cpu())
        return torch.cat(feats), torch.cat(embs)

    def features(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """FloatTensor[B, feature_dim]: inputs to `frechet_distance`."""
        return self._run(images, batch)[0]

    def image_embeddings(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return self._run(images, batch)[1]

    @torch.no_grad()
    def pooled_embeddings(self, pooled: torch.Tensor) -> torch.Tensor:
        """Unit vectors [B, embed_dim] from mean-pooled caption states [B, text_dim]."""
        return F.normalize(self.model.text(pooled.float().to(self.model.logit_scale.device)), dim=-1).cpu()

    def text_embeddings(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors [B, embed_dim] from caption states, rounded as the cache stores them."""
        stored = hidden.to(TEXT_DTYPES.get(self.text.get("text_dtype", "float32"), torch.float32))
        return self.pooled_embeddings(mean_pool(stored, mask))

    def check_text_encoder(self, identity: dict, where: str) -> None:
        """The prompts must be encoded by the text encoder the evaluator was trained on."""
        mine = self.text.get("identity", {})
        if mine.get("sha256") != identity.get("sha256"):
            raise NasError(f"{where}: text encoder {identity.get('path')} (sha256 {str(identity.get('sha256'))[:12]}) "
                           f"is not the evaluator's {mine.get('path')} (sha256 {str(mine.get('sha256'))[:12]}); "
                           "train the evaluator on this run's cache")  # fmt: skip

    def prompt_embeddings(self, text_encoder, prompts: list[str], batch: int = 256) -> torch.Tensor:
        """Prompts through the run's text encoder (`nas.data.encoders.TextEncoder`), then the head."""
        out = []
        for i in range(0, len(prompts), batch):
            hidden, mask = text_encoder.encode(prompts[i : i + batch])
            out.append(self.text_embeddings(hidden.cpu(), mask.cpu()))
        return torch.cat(out)


def fit(images: torch.Tensor, config: ContrastiveConfig) -> torch.Tensor:
    """Images in [0, 1] at the evaluator's resolution, area-downsampled to max_side if larger."""
    r, side = config.resolution, min(config.resolution, config.max_side)
    if images.shape[-2:] == (side, side):
        return images
    if images.shape[-2:] != (r, r):
        images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
    if r > side:
        images = F.interpolate(images, size=(config.max_side, config.max_side), mode="area")
    return images


# ---------------------------------------------------------------------------------------- training


def cache_items(cache, config: ContrastiveConfig) -> tuple[list[int], list[int]]:
    """(training items, held-out items) of the cache: the last val_items are held out."""
    n = len(cache)
    if n <= config.val_items + 1:
        raise NasError(
            f"{cache.path}: {n} items leave too few to train on with --val-items {config.val_items}"
        )
    train = list(range(n - config.val_items))[: config.max_items]
    return train, list(range(n - config.val_items, n))


def cache_text(cache, items: list[int]) -> torch.Tensor:
    """Mean-pooled caption states [N, text_dim] of cache items, as stored."""
    return torch.stack([mean_pool(*(t.unsqueeze(0) for t in cache.moments(i)[2:]))[0] for i in items])


def cache_images(cache, items: list[int], config: ContrastiveConfig) -> torch.Tensor:
    """Images of cache items from the cache's source, resized as the cache resized them: uint8 [N, 3, s, s]."""
    from nas.data.folders import UnreadableImage, open_source

    made_from = cache.manifest.get("source", {})
    path = made_from.get("path")
    try:
        source = open_source(path)
    except NasError as exc:
        raise NasError(
            f"{cache.path}: the evaluator needs the images the cache was made from: {exc}"
        ) from None
    if source.fingerprint()["listing_sha256"] != made_from.get("listing_sha256"):
        raise NasError(
            f"{path}: the listing changed since the cache {cache.path} was made; rerun `nas precompute`"
        )
    records = cache.records()
    out = []
    try:
        for i in items:
            image = source.load(source.entries[int(records[i]["source_index"])], config.resolution)
            x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
            out.append((fit(x.unsqueeze(0), config)[0] * 255).round().to(torch.uint8))
    except (UnreadableImage, KeyError, IndexError) as exc:
        raise NasError(
            f"{path}: item {i} of {cache.path} cannot be read ({exc}); the source changed"
        ) from None
    finally:
        source.close()
    return torch.stack(out)


def _shifted(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by up to `pixels` in x and y (reflect padding)."""
    if pixels < 1:
        return x
    side = x.shape[-1]
    padded = F.pad(x, (pixels,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + side, dx : dx + side] for i, (dy, dx) in enumerate(offsets)])


def train_contrastive(
    cache, config: ContrastiveConfig, progress: bool = True
) -> tuple[ContrastiveEvaluator, dict]:
    """Train on the cache's training items; metrics on its held-out items (and as many training ones)."""
    from tqdm import tqdm

    start = time.perf_counter()
    manifest = cache.manifest
    config = config.model_copy(update={"resolution": int(manifest["resolution"])})
    train, held = cache_items(cache, config)
    records = cache.records()
    x = cache_images(cache, train, config)
    text = cache_text(cache, train)
    ids = {c: j for j, c in enumerate(dict.fromkeys(records[i]["text"] for i in train))}
    cid = torch.tensor([ids[records[i]["text"]] for i in train])
    torch.manual_seed(config.seed)
    model = ContrastiveModel(config, int(manifest["text_dim"]))
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(config.seed)
    batch = min(config.batch_size, len(train))
    pixels = round(config.shift * x.shape[-1])
    order = torch.randperm(len(train), generator=gen)
    cursor, loss_value = 0, float("nan")
    for step in (bar := tqdm(range(config.steps), desc="evaluator", unit="step", disable=not progress)):
        if cursor + batch > len(order):  # epochs without replacement
            order, cursor = torch.randperm(len(train), generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        images = _shifted(x[idx].float() / 255, pixels, gen) * 2 - 1
        logits = model.logits(images, text[idx])
        same = (cid[idx, None] == cid[None, idx]).float()
        target = same / same.sum(1, keepdim=True)  # equal captions: all positives
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    info = {"identity": manifest["text_encoder"], "text_len": manifest["text_len"],
            "text_dim": manifest["text_dim"], "text_dtype": manifest.get("text_dtype", "float16")}  # fmt: skip
    evaluator = ContrastiveEvaluator(model, config, info)
    probe = train[-len(held) :]  # as many training items as held-out ones: the same K and chance
    metrics = {
        **{f"val_{k}": v for k, v in split_metrics(evaluator, cache, held).items()},
        **{f"train_{k}": v for k, v in split_metrics(evaluator, cache, probe, x[-len(probe) :]).items()},
        "train_items": len(train),
        "distinct_train_captions": len(ids),
        "final_loss": round(loss_value, 4),
        "temperature": round(1 / float(model.logit_scale.exp().clamp(max=100)), 4),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    evaluator.info = metrics
    return evaluator, metrics


def split_metrics(evaluator: ContrastiveEvaluator, cache, items: list[int], images=None) -> dict:
    """Retrieval of cache items' own captions among K (and among all) from their real images."""
    if images is None:
        images = cache_images(cache, items, evaluator.config)
    captions = [cache.records()[i]["text"] for i in items]
    emb = evaluator.image_embeddings(images.float() / 255)
    txt = evaluator.pooled_embeddings(cache_text(cache, items))
    report = retrieval_alignment(emb, txt, captions, DEFAULT_K)
    return {"items": len(items), **report}


# ------------------------------------------------------------------------------------ save and load


def save_evaluator(
    evaluator: ContrastiveEvaluator, out: str | Path, cache_path: str | Path | None = None
) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in evaluator.model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    doc = {"kind": KIND, "resolution": evaluator.config.resolution,
           "config": evaluator.config.model_dump(mode="json"), "text": evaluator.text,
           "cache": None if cache_path is None else str(cache_path), "metrics": evaluator.info}  # fmt: skip
    write_json(out / CONFIG, doc)


def load_evaluator(path: str | Path) -> ContrastiveEvaluator:
    """A contrastive evaluator saved by `nas data train-evaluator --cache` (never unpickles)."""
    from nas.core.config import validate

    path = Path(path)
    doc = read_config(path)
    config = validate(ContrastiveConfig, doc.get("config"), f"{path / CONFIG}: config")
    text = doc.get("text")
    if not isinstance(text, dict) or not isinstance(text.get("text_dim"), int):
        raise NasError(f"{path / CONFIG}: text: missing or without text_dim; retrain the evaluator")
    model = load_weights(ContrastiveModel(config, text["text_dim"]), path)
    return ContrastiveEvaluator(model, config, text, doc.get("metrics"))
