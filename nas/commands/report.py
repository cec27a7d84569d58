"""Plots and a summary of a study under RESULTS/<study>/: pareto.png (baselines starred),
history.png, importances.png, summary.md. Browse the same storage live with
`optuna-dashboard sqlite:///RESULTS/<study>/study.db`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None, help="RDB URL (default sqlite:///RESULTS/<study>/study.db)")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default=None, help="folder for the plots (default RESULTS/<study>/)")


def run(args) -> int:
    from nas.search.report import write_report
    from nas.search.study import load_study

    study = load_study(args.study, args.storage, args.results)
    written = write_report(study, args.out or Path(args.results) / args.study)
    for name, path in written.items():
        print(f"{name:12s} {path}")
    url = args.storage or f"sqlite:///{Path(args.results) / args.study / 'study.db'}"
    print(f"dashboard    optuna-dashboard {url}")
    return 0
