"""Plots and a summary of a study under RESULTS/<study>/: pareto.png (baselines starred),
history.png, importances.png, summary.md. Browse the same storage live with
`optuna-dashboard sqlite:///RESULTS/<study>/study.db`."""

from __future__ import annotations

from pathlib import Path

from nas.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("report",)
    study: str = arg(help="study name", min_length=1)
    storage: str | None = arg(None, "RDB URL (default sqlite:///RESULTS/<study>/study.db)")
    results: str = arg("results", "parent folder of the study folder")
    out: str | None = arg(None, "folder for the plots (default RESULTS/<study>/)")


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.search.report import write_report
    from nas.search.study import load_study

    study = load_study(settings.study, settings.storage, settings.results)
    written = write_report(study, settings.out or Path(settings.results) / settings.study)
    for name, path in written.items():
        print(f"{name:12s} {path}")
    url = settings.storage or f"sqlite:///{Path(settings.results) / settings.study / 'study.db'}"
    print(f"dashboard    optuna-dashboard {url}")
    return 0
