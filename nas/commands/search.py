"""Search a space: every trial samples an architecture, measures its cost, rejects it if over a
budget, trains it briefly on the latent cache and records the objectives. Rerun the same command
to resume a killed search."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from nas.core.settings import arg
from nas.search.settings import SearchSettings

if TYPE_CHECKING:
    from nas.search.interrupt import Interrupted

Backend = Literal["optuna", "ray"]


class Settings(SearchSettings):
    """Search a space with Optuna or Ray Tune."""

    backend: Backend = arg("optuna", "engine: local Optuna processes or Ray Tune trials")
    quiet: bool = arg(False, "no progress bar or per-trial lines")
    ray_address: str | None = arg(
        None, "ray backend: existing cluster (e.g. ray://head:10001); default: local Ray"
    )
    cpus_per_trial: float = arg(1.0, "ray backend: CPUs per trial", gt=0, le=1024)
    gpus_per_trial: float = arg(
        0.0, "ray backend: GPUs per trial; fractional values share a GPU", ge=0, le=64
    )
    latency_accelerator: str | None = arg(
        None, "ray backend: measure latency on a node of this accelerator type (e.g. A10G)"
    )


SETTINGS = Settings


def dry_run(settings: Settings) -> dict:
    """The space checked as a search checks it before its first trial (its proxy recipe, and with
    proxy distillation the teacher's config against the space; no weights loaded, no cache read)."""
    from nas.search.objective import proxy_config
    from nas.search.teacher import prepare_distill
    from nas.space import load_space

    space = prepare_distill(load_space(settings.space), settings.space, settings.teacher)
    proxy_config(space, settings.space)
    distill = space.proxy.distill
    return {"proxy_distill": distill.model_dump(mode="json") if distill is not None else None}


def locked_paths(engine: SearchSettings) -> list[Path]:
    """What one search writes alone (docs/reliability.md): with SQLite storage (the default), the
    results folder and, when it lies elsewhere, the database file; the extra local workers of
    `--workers N` share their parent's (they take none). With a server storage (PostgreSQL),
    nothing: many commands on one study are the design, and the results folder only holds
    metadata every worker writes alike, atomically (space.yaml, search.json, trials.csv)."""
    from nas.search.study import worker_rank

    url = engine.storage_url()
    if not url.startswith("sqlite") or worker_rank() > 0:
        return []
    from sqlalchemy.engine import make_url

    paths = [engine.folder]
    database = make_url(url).database
    if database and database != ":memory:":
        db = Path(database).resolve()
        if engine.folder.resolve() not in db.parents:
            paths.insert(0, db)  # the shared one first: a refusal then takes nothing else
    return paths


def run(settings: Settings) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured);
    # a search's proxy steps and latency timing share the host with everything else.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    engine = SearchSettings.model_validate(settings.model_dump(include=set(SearchSettings.model_fields)))
    from nas.core.lock import exclusive

    with ExitStack() as locks:
        for path in locked_paths(engine):
            locks.enter_context(exclusive(path))
        return _run(settings, engine)


def _run(settings: Settings, engine: SearchSettings) -> int:
    if settings.backend == "ray":
        from nas.search.ray_backend import RaySettings, run_ray_search

        run_ray_search(
            engine,
            RaySettings(
                address=settings.ray_address,
                cpus_per_trial=settings.cpus_per_trial,
                gpus_per_trial=settings.gpus_per_trial,
                latency_accelerator=settings.latency_accelerator,
            ),
            quiet=settings.quiet,
        )
        if not settings.quiet:
            print(next_hint(engine))
        return 0
    from nas.search.interrupt import Interrupted
    from nas.search.retry import EXIT_TEMPFAIL, StorageUnavailable, worker_id
    from nas.search.storage import finished
    from nas.search.study import run_search, worker_rank

    try:
        study = run_search(engine, quiet=settings.quiet)
    except StorageUnavailable as gone:  # one line per worker; a later `nas search` resumes
        print(f"nas search: worker {worker_id()}: {gone}; rerun the same command to resume"
              f" when the server is back (its running trials are retried)", file=sys.stderr)  # fmt: skip
        return EXIT_TEMPFAIL
    except Interrupted as stop:
        if worker_rank() > 0:  # an extra local worker: the search that started it speaks for it
            return stop.exit_code
        stop.hint = resume_hint(settings, stop)
        raise  # the CLI prints the hint and exits 130 (SIGINT) or 143 (SIGTERM)
    if not settings.quiet:
        print(f"study {engine.study}: {finished(study)} trials finished; storage {engine.storage_url()}")
        print(next_hint(engine))
    return 0


def next_hint(engine: SearchSettings) -> str:
    """'next: nas export ...; nas report ...' for this study, with the --storage and --results the
    search was given (those not at their defaults), so both commands run as printed."""
    from nas.commands import export, report
    from nas.commands.hints import next_line

    study, storage, results = engine.study, engine.storage, engine.results
    return next_line(
        export.Settings(study=study, storage=storage, results=results, out=str(engine.folder / "export")),
        report.Settings(study=[study], storage=[storage] if storage else None, results=results),
    )


def resume_hint(settings: Settings, stop: Interrupted) -> str:
    """One line: what the interrupt did and the command (the same flags) that resumes the study."""
    import shlex

    from nas.core.settings import to_argv

    trials = ("trial " if len(stop.retried) == 1 else "trials ") + ", ".join(map(str, stop.retried))
    retried = f"{trials} failed and re-enqueued to run first; " if stop.retried else ""
    command = shlex.join(["nas", *to_argv(settings)])
    return f"interrupted by {stop.signal_name}; {retried}resume with: {command}"
