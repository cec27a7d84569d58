"""What `nas eval` measures at each step count, one scorer per measuring instrument.

A scorer has `reference(eval_set, recon)`: the figures of the real images (and of the real images
through the run's VAE, `recon`), measured once, and `score(images, eval_set)`: one row's figures for
generated images. The first scorer of an evaluation writes the unprefixed keys the comparison and
the run summary read (`alignment`, `chance_alignment`, `frechet_distance`; nas/pipeline/); the others
add theirs beside them (`clip_*`, `fid`).

- `ShapesScorer`: the shapes evaluator (share of prompted attributes read; chance = each image
  against the next image's prompt);
- `RetrievalScorer`: the contrastive evaluator or a local CLIP: how often an image ranks its own
  prompt first among K (chance 1/K), and a Frechet distance in the image-feature space;
- `FidScorer`: Inception FID from local weights.
"""

from __future__ import annotations

import torch

from nas.evaluate.contrastive_evaluator import DEFAULT_K, retrieval_alignment
from nas.evaluate.shapes_evaluator import frechet_distance


class ShapesScorer:
    kind = "shapes"

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.ref_features: torch.Tensor | None = None

    def reference(self, eval_set, recon: torch.Tensor) -> dict:
        ev = self.evaluator
        self.ref_features = ev.features(eval_set.reference)
        out = {
            "real_alignment": ev.alignment(eval_set.reference, eval_set.records),
            "vae_alignment": ev.alignment(recon, eval_set.records),
            "fd_vae": frechet_distance(ev.features(recon), self.ref_features),
        }
        if eval_set.floor is not None and len(eval_set.floor) >= 2:
            out["fd_real_floor"] = frechet_distance(ev.features(eval_set.floor), self.ref_features)
        return out

    def score(self, images: torch.Tensor, eval_set) -> dict:
        report = self.evaluator.report(images, eval_set.records)
        # Each image against the next image's prompt: what an image that ignores its prompt scores.
        chance = self.evaluator.report(images, eval_set.records[1:] + eval_set.records[:1])
        return {
            "alignment": report.pop("alignment"),
            "alignment_by_attribute": report,
            "chance_alignment": chance.pop("alignment"),
            "chance_by_attribute": chance,
            "frechet_distance": frechet_distance(self.evaluator.features(images), self._reference()),
        }

    def _reference(self) -> torch.Tensor:
        assert self.ref_features is not None, "reference() first"
        return self.ref_features


class ContrastiveWithText:
    """The contrastive evaluator with the run's text encoder: what RetrievalScorer needs."""

    def __init__(self, evaluator, text_encoder):
        self.evaluator, self.text_encoder = evaluator, text_encoder

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.features(images)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.image_embeddings(images)

    def prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        return self.evaluator.prompt_embeddings(self.text_encoder, prompts)


class RetrievalScorer:
    """Alignment by retrieval among K prompts, Frechet distance on image features; CLIP score for CLIP."""

    def __init__(self, model, kind: str, k: int = DEFAULT_K, prefix: str = "", clip_score: bool = False):
        self.model, self.kind, self.k, self.prefix, self.clip_score = model, kind, k, prefix, clip_score
        self.text: torch.Tensor | None = None
        self.ref_features: torch.Tensor | None = None

    def _keys(self, values: dict) -> dict:
        return {(k if k.startswith("clip_score") else self.prefix + k): v for k, v in values.items()}

    def _align(self, images: torch.Tensor, eval_set) -> tuple[dict, torch.Tensor]:
        assert self.text is not None, "reference() first"
        emb = self.model.image_embeddings(images)
        out = retrieval_alignment(emb, self.text, eval_set.prompts, self.k)
        if self.clip_score:  # Hessel et al. 2021 as torchmetrics: 100 * max(cos(image, own prompt), 0)
            out["clip_score"] = float((100 * (emb * self.text).sum(-1).clamp(min=0)).mean())
        return out, emb

    def reference(self, eval_set, recon: torch.Tensor) -> dict:
        self.text = self.model.prompt_embeddings(eval_set.prompts)
        real, _ = self._align(eval_set.reference, eval_set)
        vae, _ = self._align(recon, eval_set)
        self.ref_features = self.model.features(eval_set.reference)
        out = {"real_alignment": real["alignment"], "real_top1_all": real["top1_all"],
               "vae_alignment": vae["alignment"],
               "fd_vae": frechet_distance(self.model.features(recon), self.ref_features)}  # fmt: skip
        if self.clip_score:
            out.update(clip_score_real=real["clip_score"], clip_score_vae=vae["clip_score"])
        if eval_set.floor is not None and len(eval_set.floor) >= 2:
            out["fd_real_floor"] = frechet_distance(self.model.features(eval_set.floor), self.ref_features)
        out["retrieval"] = {"k": real["alignment_k"], "chance": real["chance_alignment"],
                            "distinct_prompts": real["distinct_prompts"]}  # fmt: skip
        return self._keys(out)

    def score(self, images: torch.Tensor, eval_set) -> dict:
        out, _ = self._align(images, eval_set)
        assert self.ref_features is not None, "reference() first"
        out["frechet_distance"] = frechet_distance(self.model.features(images), self.ref_features)
        out.pop("distinct_prompts")
        return self._keys(out)


class FidScorer:
    kind = "fid"

    def __init__(self, fid):
        self.fid = fid  # nas.evaluate.local_models.InceptionFid

    def reference(self, eval_set, recon: torch.Tensor) -> dict:
        self.fid.set_real(eval_set.reference)
        return {"fid_vae": self.fid(recon)}

    def score(self, images: torch.Tensor, eval_set) -> dict:
        return {"fid": self.fid(images)}
