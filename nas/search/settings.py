"""`SearchSettings`: what one search is (space, study, trials, sampler, ...), shared by `nas search`,
the Optuna and Ray engines and `nas run`. Kept apart from study.py so that reading the settings
does not import torch."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from nas.core.settings import CommandSettings, arg

SamplerName = Literal["tpe", "nsga2", "random", "gp"]  # keys of nas.search.storage.SAMPLERS
MAX_TRIALS = 100_000  # a study of more trials is a typo, not a plan (each trial trains a model)
MAX_WORKERS = 1024  # parallel trials: local processes or Ray trials
# seconds a lost storage server is retried: a restart (pg_ctl restart: 1-3 s here) takes seconds, a
# managed server's failover tens (AWS documents 60-120 s for Multi-AZ RDS: raise it there); longer,
# a scheduler rerunning the command (exit 75) wastes less than workers that hang on
STORAGE_RETRY_S = 60.0


class SearchSettings(CommandSettings):
    """Search a space (the engine's settings; `nas search` adds the backend's)."""

    command: ClassVar[tuple[str, ...]] = ("search",)

    space: str = arg(help="search-space YAML", positional=True, input="space")
    study: str = arg(help="study name (results go to RESULTS/<study>/)", min_length=1)
    # 30: on the quickstart space TPE first beats the SD-layout baseline at trial 14-17 and leads
    # random search only after about 20 trials (results/search_validity/, README)
    trials: int = arg(30, "finished trials to reach (complete + pruned + failed)", ge=1, le=MAX_TRIALS)
    storage: str | None = arg(None, "RDB URL (default sqlite:///RESULTS/<study>/study.db)")
    cache: str | None = arg(None, "latent cache folder from `nas precompute`", input="folder")
    # gp: measured best on the quickstart space (hypervolume 0.075 vs tpe 0.065 and random 0.055 at
    # 30 trials, every seed; results/search_validity/, README "Is the search worth running?")
    sampler: SamplerName = arg("gp", "Optuna sampler")
    seed: int = arg(0, "sampler seed", ge=0)
    workers: int = arg(
        1, "parallel trials (processes sharing the storage, or Ray trials)", ge=1, le=MAX_WORKERS
    )
    results: str = arg("results", "parent folder of the study folder")
    storage_retry_s: float = arg(
        STORAGE_RETRY_S,
        "server storage (PostgreSQL): seconds a lost server is retried, with backoff, before the"
        " worker stops with exit code 75 (rerun to resume); 0: no retries",
        ge=0,
        le=86_400,
    )
    teacher: str | None = arg(
        None,
        "trained U-Net folder every trial inherits from and distils from (sets the space's"
        " proxy.distill.teacher; without proxy.distill: its defaults)",
        input="folder",
    )

    @property
    def folder(self) -> Path:
        return Path(self.results) / self.study

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / 'study.db').resolve()}"
