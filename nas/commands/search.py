"""Search a space: every trial samples an architecture, measures its cost, rejects it if over a
budget, trains it briefly on the latent cache and records the objectives. Rerun the same command
to resume a killed search."""

from __future__ import annotations

import argparse

from nas.errors import NasError

BACKENDS = ("optuna", "ray")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="search-space YAML")
    p.add_argument("--study", required=True, help="study name (results go to RESULTS/<study>/)")
    p.add_argument("--trials", type=int, default=20, help="finished trials to reach (default 20)")
    p.add_argument("--storage", default=None, help="RDB URL (default sqlite:///RESULTS/<study>/study.db)")
    p.add_argument("--cache", default=None, help="latent cache folder from `nas precompute`")
    p.add_argument("--sampler", default="tpe", help="tpe | nsga2 | random")
    p.add_argument("--backend", default="optuna", help="optuna | ray")
    p.add_argument("--workers", type=int, default=1, help="parallel trials (processes or Ray trials)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--results", default="results", help="parent folder of the study folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    ray = p.add_argument_group("ray backend")
    ray.add_argument(
        "--ray-address", default=None, help="existing cluster (e.g. ray://head:10001); default: local Ray"
    )
    ray.add_argument("--cpus-per-trial", type=float, default=1.0)
    ray.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractional values share a GPU")
    ray.add_argument(
        "--latency-accelerator",
        default=None,
        help="measure latency on a node of this accelerator type (e.g. A10G)",
    )


def run(args) -> int:
    if args.backend not in BACKENDS:
        raise NasError(f"--backend {args.backend}: unknown (allowed: {', '.join(BACKENDS)})")
    from nas.search.study import SAMPLERS, SearchSettings

    if args.sampler not in SAMPLERS:
        raise NasError(f"--sampler {args.sampler}: unknown (allowed: {', '.join(SAMPLERS)})")
    settings = SearchSettings(
        space=args.space,
        study=args.study,
        trials=args.trials,
        storage=args.storage,
        cache=args.cache,
        sampler=args.sampler,
        seed=args.seed,
        workers=args.workers,
        results=args.results,
    )
    if args.backend == "ray":
        from nas.search.ray_backend import RaySettings, run_ray_search

        run_ray_search(
            settings,
            RaySettings(
                address=args.ray_address,
                cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
                latency_accelerator=args.latency_accelerator,
            ),
            quiet=args.quiet,
        )
        return 0
    from nas.search.study import run_search

    study = run_search(settings, quiet=args.quiet)
    if not args.quiet:
        from nas.search.study import finished

        print(f"study {settings.study}: {finished(study)} trials finished; storage {settings.storage_url()}")
        print(
            f"next: nas export --study {settings.study} --out results/{settings.study}/export; nas report --study {settings.study}"
        )
    return 0
