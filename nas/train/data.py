"""What the training loop reads: batches that depend only on (seed, step), and a fixed validation set.

Nothing here keeps state across steps. The samples of step s are positions
[s * global_batch, (s + 1) * global_batch) of an endless stream that visits the training items once
per epoch in a permutation seeded by (seed, epoch); the latent draw from the stored VAE moments, the
noise, the timestep and the caption drop of each sample are seeded by (seed, its position in that
stream). A run resumed at step s therefore sees exactly the batches an uninterrupted run sees,
without saving any sampler state; each process of a multi-process run takes its own slice of every
global batch, and N processes at batch b draw exactly the samples one process at batch N * b draws
(tests/train/test_distributed.py compares the trained weights).

The cache is duck-typed (`nas.data.cache.LatentCache`): `len(cache)`, `cache.manifest`,
`cache.dataset(sample, generator)` returning dicts with "latents" [C,h,w] and "text" [T,D], and
`cache.empty_text()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nas.core.errors import NasError

# Stream tags, so the generators of one step never coincide.
_ORDER, _LATENT, _NOISE = 0, 1, 2


def stream_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence mixes them; no collisions in practice)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*keys))


def check_compatible(model_config: dict, manifest: dict, model_source: str, cache_source: str) -> None:
    """The U-Net must read the cache's latents and text: channels and text width equal (NasError)."""
    pairs = (
        ("in_channels", "latent_channels", "latent channels"),
        ("cross_attention_dim", "text_dim", "text width (cross_attention_dim)"),
        ("sample_size", "latent_size", "latent size"),
    )
    for model_key, cache_key, what in pairs:
        have, need = model_config.get(model_key), manifest.get(cache_key)
        if have is not None and need is not None and int(have) != int(need):
            raise NasError(
                f"{model_source}: {what} {have} does not match the cache {cache_source} ({cache_key}: {need});"
                " use an architecture made for this cache, or a cache made for this architecture"
            )


def split(count: int, val_items: int, source: str) -> tuple[int, list[int]]:
    """(number of training items, held-out indices): the last `val_items` items are held out."""
    if count <= val_items:
        raise NasError(
            f"{source}: {count} items leave none to train on with val_items={val_items}; lower val_items"
        )
    return count - val_items, list(range(count - val_items, count))


class Batches:
    """Training micro-batches as a pure function of (step, micro-step) for one process."""

    def __init__(self, cache, config, num_timesteps: int, rank: int = 0, processes: int = 1):
        self.config = config
        self.seed = config.seed
        self.num_timesteps = num_timesteps
        self.rank, self.processes = rank, processes
        self.train_count, _ = split(len(cache), config.val_items, str(getattr(cache, "path", "cache")))
        self.latent_generator = torch.Generator()
        self.dataset = cache.dataset(sample=True, generator=self.latent_generator)
        self.empty_text = cache.empty_text()[0].float()
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {
                epoch: torch.randperm(self.train_count, generator=generator(self.seed, _ORDER, epoch))
            }
        return self._orders[epoch]

    def positions(self, step: int, micro: int) -> range:
        """This process's positions in the stream: its slice of the micro-step's global batch."""
        batch = self.config.batch_size
        start = (step * self.config.grad_accum + micro) * batch * self.processes + self.rank * batch
        return range(start, start + batch)

    def indices(self, step: int, micro: int) -> list[int]:
        out = []
        for position in self.positions(step, micro):
            epoch, offset = divmod(position, self.train_count)
            out.append(int(self._order(epoch)[offset]))
        return out

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """{"latents", "text", "noise", "timesteps"} on the CPU for this process. Every random draw
        of a sample is seeded by its stream position alone, not by the process that draws it."""
        latents, texts, noise, timesteps, drop = [], [], [], [], []
        for position, index in zip(self.positions(step, micro), self.indices(step, micro)):
            self.latent_generator.manual_seed(stream_seed(self.seed, _LATENT, position))
            item = self.dataset[index]
            latents.append(item["latents"])
            texts.append(item["text"])
            g = generator(self.seed, _NOISE, position)
            noise.append(torch.randn(item["latents"].shape, generator=g))
            timesteps.append(torch.randint(0, self.num_timesteps, (), generator=g))
            drop.append(torch.rand((), generator=g) < self.config.cfg_drop)
        text = torch.stack(texts).float()
        dropped = torch.stack(drop)
        text = torch.where(dropped[:, None, None], self.empty_text.expand_as(text), text)
        return {
            "latents": torch.stack(latents).float(),
            "text": text,
            "noise": torch.stack(noise),
            "timesteps": torch.stack(timesteps),
        }


class StepBatches(torch.utils.data.Dataset):
    """Item i = micro-batch i of steps [start, stop), so a DataLoader's workers can prepare them ahead
    (`num_workers`) in order; each one is still a pure function of its (step, micro-step)."""

    def __init__(self, batches: Batches, start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batches.config.grad_accum

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step, micro = divmod(i, self.batches.config.grad_accum)
        return self.batches.get(self.start + step, micro)


def batch_loader(batches: Batches, start: int, stop: int, workers: int, pin_memory: bool):
    """Micro-batches of steps [start, stop) in order, prepared by `workers` background processes."""
    return torch.utils.data.DataLoader(
        StepBatches(batches, start, stop),
        batch_size=None,  # items are whole micro-batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
    )


@dataclass
class ValidationSet:
    """Fixed (item, timestep, noise) triples: one latent draw per held-out item, timesteps spread
    evenly over [0, T), draws and noise from `val_seed`. Same cache and config, same triples,
    whatever the U-Net. A draw rather than the posterior mean, so validation sees latents distributed
    like training's (they differ when a VAE's posterior is wide, e.g. an untrained one)."""

    item_latents: torch.Tensor  # [V, C, h, w]: one fixed draw per held-out item
    item_text: torch.Tensor  # [V, T, D]
    owner: torch.Tensor  # [N]: the item of each triple
    noise: torch.Tensor  # [N, C, h, w]
    timesteps: torch.Tensor  # [N]

    @classmethod
    def build(cls, cache, config, num_timesteps: int) -> ValidationSet:
        _, held_out = split(len(cache), config.val_items, str(getattr(cache, "path", "cache")))
        g = generator(config.val_seed)
        dataset = cache.dataset(sample=True, generator=g)
        items = [dataset[i] for i in held_out]
        count = len(items) * config.val_timesteps
        # Timestep i of N sits at the middle of its 1/N-th of [0, T); items are dealt to the
        # timesteps in a seeded order, so each item meets several noise levels.
        timesteps = ((torch.arange(count) + 0.5) * num_timesteps / count).long()
        owner = torch.randperm(count, generator=g) % len(items)
        item_latents = torch.stack([item["latents"] for item in items]).float()
        item_text = torch.stack([item["text"] for item in items]).float()
        noise = torch.randn((count, *item_latents.shape[1:]), generator=g)
        return cls(item_latents, item_text, owner, noise, timesteps)

    def __len__(self) -> int:
        return len(self.timesteps)

    def shard(self, rank: int, processes: int, batch_size: int):
        """This process's triples in batches of `batch_size`, as dicts of CPU tensors."""
        mine = torch.arange(rank, len(self), processes)
        for chunk in mine.split(batch_size):
            items = self.owner[chunk]
            yield {
                "latents": self.item_latents[items],
                "text": self.item_text[items],
                "noise": self.noise[chunk],
                "timesteps": self.timesteps[chunk],
            }


def record_values(record: dict, key: str) -> list[str]:
    """The values at dotted `key` in a cache record, as text; a list of mappings on the way is
    searched item by item (`objects.shape` of a shapes record: each object's shape)."""
    nodes: list = [record]
    for part in key.split("."):
        found = []
        for node in nodes:
            for item in node if isinstance(node, list) else [node]:
                if isinstance(item, dict) and part in item:
                    found.append(item[part])
        nodes = found
    return [str(v) for node in nodes for v in (node if isinstance(node, list) else [node])]


class CacheSubset:
    """The items of a cache at `indices` (in cache order), with the cache's interface
    (`len`, `manifest`, `dataset`, `empty_text`, `captions`, `records`, `path`)."""

    def __init__(self, cache, indices: list[int]):
        self.cache, self.indices = cache, indices
        self.manifest, self.path = cache.manifest, getattr(cache, "path", "cache")

    def __len__(self) -> int:
        return len(self.indices)

    def dataset(self, sample: bool = True, generator: torch.Generator | None = None):
        return torch.utils.data.Subset(self.cache.dataset(sample=sample, generator=generator), self.indices)

    def empty_text(self):
        return self.cache.empty_text()

    def records(self) -> list[dict]:
        records = self.cache.records()
        return [records[i] for i in self.indices]

    def captions(self) -> list[str]:
        captions = self.cache.captions()
        return [captions[i] for i in self.indices]


def select_items(cache, where: dict[str, str] | None, source: str = "cache_filter"):
    """`cache` itself without a filter, else a CacheSubset of the items whose record has every
    `key: value` of `where` (train config `cache_filter`); NasError naming the key when none match."""
    if not where:
        return cache
    records = cache.records()
    keep = [i for i, r in enumerate(records) if all(str(v) in record_values(r, k) for k, v in where.items())]
    if not keep:
        for key, value in where.items():
            seen = sorted({v for r in records for v in record_values(r, key)})
            if str(value) not in seen:
                allowed = ", ".join(seen[:20]) or "none: no record has this field"
                raise NasError(f"{source}: {key}: no item of {getattr(cache, 'path', 'the cache')} has {value!r} "
                               f"(values found: {allowed})")  # fmt: skip
        raise NasError(f"{source}: no item of {getattr(cache, 'path', 'the cache')} matches all of {where}")
    return CacheSubset(cache, keep)
