"""Run an experiment end to end: data -> VAE -> precompute -> search -> export -> train ->
sample -> evaluate -> report, each stage in RESULTS/<experiment>/<stage>/. A rerun skips stages
whose inputs are unchanged and resumes an interrupted one; --from STAGE redoes from there."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment YAML (e.g. experiments/quickstart.yaml)")
    p.add_argument("--from", dest="start", default=None, help="redo from this stage on")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    p.add_argument("--results", default="results", help="parent of the experiment folder")


def run(args) -> int:
    from nas.pipeline import run_experiment

    run_experiment(args.experiment, args.results, start=args.start, dry_run=args.dry_run)
    return 0
