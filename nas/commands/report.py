"""Plots and a summary of a study under RESULTS/<study>/: pareto.png (baselines starred),
history.png, importances.png, summary.md. Browse the same storage live with
`optuna-dashboard sqlite:///RESULTS/<study>/study.db`.

Several studies (`--study A --study B ...`, same space): overlaid instead, into OUT (default
RESULTS/overlay/): hypervolume.png (hypervolume of the proxy loss / latency front vs finished
trials), fronts.png (one panel per study), compare.md and compare.json (nas/search/compare.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from nas.core.errors import NasError
from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("report",)
    study: list[str] = arg(help="study name; several: overlay them", min_length=1)
    storage: list[str] | None = arg(
        None, "RDB URL: one for every study, or one per study (default sqlite:///RESULTS/<study>/study.db)"
    )
    results: str = arg("results", "parent folder of the study folders")
    out: str | None = arg(None, "folder for the plots (default RESULTS/<study>/, or RESULTS/overlay/)")
    reference: Literal["baseline", "worst"] = arg(
        "baseline", "overlay: hypervolume reference point, the baseline's or the worst observed (x 1.1)"
    )
    pick: str = arg("latency_ms<=0.8*baseline", "overlay: export rule of the 'best proxy loss under' column")

    @field_validator("study", "storage", mode="before")
    @classmethod
    def _one_or_many(cls, value):  # `nas run` and older callers pass one name or URL
        return [value] if isinstance(value, str) else value


SETTINGS = Settings


def storages(settings: Settings) -> list[str | None]:
    """The storage URL of each study (None: its default SQLite file)."""
    given = settings.storage or []
    if len(given) in (0, 1):
        return [given[0] if given else None] * len(settings.study)
    if len(given) != len(settings.study):
        raise NasError(
            f"--storage: {len(given)} URLs for {len(settings.study)} studies (give one for all, or one per study)"
        )
    return list(given)


def run(settings: Settings) -> int:
    from nas.search.study import load_study

    studies = [
        load_study(name, url, settings.results) for name, url in zip(settings.study, storages(settings))
    ]
    if len(studies) > 1:
        from nas.search.compare import compare

        out = Path(settings.out or Path(settings.results) / "overlay")
        compare({s.study_name: [s] for s in studies}, out, settings.pick, settings.reference)
        for name in ("hypervolume.png", "fronts.png", "compare.md", "compare.json"):
            print(f"{name:16s} {out / name}")
        return 0
    from nas.search.report import write_report

    study, name = studies[0], settings.study[0]
    written = write_report(study, settings.out or Path(settings.results) / name)
    for key, path in written.items():
        print(f"{key:12s} {path}")
    url = storages(settings)[0] or f"sqlite:///{Path(settings.results) / name / 'study.db'}"
    print(f"dashboard    optuna-dashboard {url}")
    print(next_hint(settings))
    return 0


def next_hint(settings: Settings) -> str:
    """'next: nas export ...' for the one study reported, with its --storage and --results (those
    not at their defaults), so it runs as printed."""
    from nas.commands import export
    from nas.commands.hints import next_line

    name, storage = settings.study[0], storages(settings)[0]
    out = str(Path(settings.results) / name / "export")
    return next_line(export.Settings(study=name, storage=storage, results=settings.results, out=out))
