"""Run the planned stages: skip what is finished with the same inputs, resume what was
interrupted, redo what changed; write stage.json, the resolved config, and the summary.

A stage that must be redone (its inputs changed, or `--from`) has its old folder moved aside to
<stage>.superseded-<time>/ (gitignored like the stage folders), never deleted: the earlier figures
stay there to compare with, and can be removed by hand. An interrupted stage that cannot resume is
started afresh (its partial folder removed).

results/<experiment>/ also receives what makes it self-contained: experiment.yaml (the resolved
experiment, defaults filled in), run.json (the environment of the summarizing session, the seeds of
every stage, each stage's fingerprint and commands), and copies of the small results (KEEP) whose
paths are relative to results/<experiment>/ (or to the repository root) rather than absolute."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from nas.core.config import load
from nas.core.errors import NasError
from nas.core.lock import exclusive
from nas.core.runfolder import (
    CHECKPOINTS,
    CONFIG,
    STAGE,
    SUMMARY,
    RunFolder,
    environment,
    portable,
    read_json,
    relative_paths,
    write_json,
)
from nas.core.settings import execute, to_argv
from nas.pipeline.experiment import STAGES, Experiment
from nas.pipeline.plan import RESUMABLE, Stage, fingerprint, plan

EXPERIMENT = "experiment.yaml"  # results/<experiment>/: the resolved experiment
RUN = "run.json"  # results/<experiment>/: environment, seeds, stage fingerprints and commands

# Small results copied to results/<experiment>/ (committed); stage folders hold the rest.
KEEP = {
    "pareto.png": ("report", "pareto.png"),
    "summary.md": ("report", "summary.md"),
    "arch.yaml": ("export", "arch.yaml"),
    "card.md": ("export", "card.md"),
    "grid.png": ("sample", "images/grid.png"),
    "quality_vs_steps.png": ("evaluate", "eval/quality_vs_steps.png"),
    "eval.json": ("evaluate", "eval/eval.json"),
    "comparison.md": ("variants", "comparison.md"),
    "comparison.png": ("variants", "comparison.png"),
    "comparison_grids.png": ("variants", "comparison_grids.png"),
    "comparison.json": ("variants", "comparison.json"),
    "few_step.md": ("few_step", "comparison.md"),
    "few_step.json": ("few_step", "comparison.json"),
    "few_step_eval.json": ("few_step", "eval/eval.json"),
    "few_step_quality_vs_steps.png": ("few_step", "eval/quality_vs_steps.png"),
    # the VAE the stage trained (absent with vae.path: a user's VAE): is it good enough? (its verdict
    # is in summary.json)
    "vae_reconstructions.png": ("vae", "model/reconstructions.png"),
    "vae_psnr.png": ("vae", "model/psnr.png"),
}


def read_state(folder: Path) -> dict[str, Any]:
    return RunFolder(folder).read_json(STAGE, {})


def status(stage: Stage, folder: Path) -> str:
    """done (same inputs, finished) | resume (same inputs, interrupted) | stale (inputs changed) | new."""
    state = read_state(folder)
    if not state:
        return "new"
    if state.get("fingerprint") != stage.fingerprint:
        return "stale"
    return "done" if state.get("done") else "resume"


def _write_state(folder: Path, stage: Stage, done: bool, seconds: float, previous: float = 0.0) -> None:
    state = {
        "stage": stage.name,
        "fingerprint": stage.fingerprint,
        "done": done,
        "seconds": round(previous + seconds, 2),  # all attempts at this fingerprint
        "commands": [shlex.join(["nas", *to_argv(s)]) for s in stage.commands],  # for humans
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    RunFolder(folder).write_json(STAGE, state)


def _execute(stage: Stage, folder: Path, exp_path: Path, resume: bool, exp: Experiment) -> None:
    if stage.name == "variants":
        from nas.pipeline import variants
        from nas.pipeline.comparison import compare, write_comparison

        assert exp.variants is not None  # plan() adds the variants stage only with variants
        variants.execute(exp.variants, stage.jobs, folder)
        print("variants: measuring U-Net latencies and comparing", flush=True)
        write_comparison(compare(exp.variants, folder.parent), folder)
        print((folder / "comparison.md").read_text(), flush=True)
        return
    from nas.commands.eval import Settings as EvalSettings
    from nas.commands.train import Settings as TrainSettings

    if stage.name == "few_step":  # the student's architecture: the exported one, with a guidance embedding
        from nas.pipeline.few_step import write_student_arch

        write_student_arch(exp, folder.parent, folder)
    for settings in stage.commands:
        out = settings.out if isinstance(settings, TrainSettings) else None
        if resume and out and (Path(out) / CHECKPOINTS).is_dir():
            settings = settings.model_copy(update={"resume": True})
        if resume and isinstance(settings, EvalSettings) and settings.out and Path(settings.out).exists():
            # an evaluation that did not finish starts over (nas eval wants a new --out)
            shutil.rmtree(settings.out)
        code = execute(settings)
        if code:
            raise NasError(
                f"{exp_path}: stage {stage.name}: `{shlex.join(['nas', *to_argv(settings)])}` exited with {code}"
            )


def load_experiment(path: str | Path) -> Experiment:
    return load(Experiment, path)


def run_experiment(
    path: str | Path, results: str | Path = "results", start: str | None = None, dry_run: bool = False
) -> dict:
    """Run (or resume) an experiment file; returns the summary. One `nas run` per experiment
    folder: results/<experiment>/ is locked for the run (docs/reliability.md); --dry-run reads."""
    name = load_experiment(path).name
    with exclusive(None if dry_run else Path(results) / name):
        return _run_experiment(path, results, start, dry_run)


def _run_experiment(path: str | Path, results: str | Path, start: str | None, dry_run: bool) -> dict:
    exp_path = Path(path)
    exp = load_experiment(exp_path)
    if start is not None and start not in STAGES:
        raise NasError(f"--from {start}: unknown stage (allowed: {', '.join(STAGES)})")
    results = Path(results)
    stages = plan(exp, exp_path, results)
    fingerprint(stages, exp)
    root = results / exp.name
    redo_from = STAGES.index(start) if start else len(STAGES)
    statuses = {}
    for stage in stages:  # a changed stage invalidates every later stage that depends on it
        st = status(stage, root / stage.name)
        if STAGES.index(stage.name) >= redo_from:
            st = "redo"
        statuses[stage.name] = "skip" if stage.skip else st
    if dry_run:
        for stage in stages:
            if stage.skip:
                print(f"{stage.name:10s} {'skip':7s} {'-':16s}  not run ({stage.skip})")
                continue
            print(f"{stage.name:10s} {statuses[stage.name]:7s} {stage.fingerprint}  {root / stage.name}")
            for settings in stage.commands:
                print(f"{'':10s} {shlex.join(['nas', *to_argv(settings)])}")
        return {}

    started = time.perf_counter()
    timings: dict[str, float] = {}
    for i, stage in enumerate(stages, 1):
        folder = root / stage.name
        st = statuses[stage.name]
        prefix = f"[{i}/{len(stages)}] {stage.name}"
        if st == "skip":
            _leave_out(stage, root, prefix)
            continue
        if st == "done":
            timings[stage.name] = read_state(folder).get("seconds", 0.0)
            print(
                f"{prefix}: done, inputs unchanged ({timings[stage.name]:.1f} s before); skipped", flush=True
            )
            continue
        resume = st == "resume" and stage.name in RESUMABLE
        if st == "resume" and not resume:
            shutil.rmtree(folder)  # interrupted, same inputs, cannot resume: a partial output only
        elif not resume:  # inputs changed or --from: the earlier results are kept aside
            aside = RunFolder(folder).set_aside()
            if aside is not None:
                print(f"{prefix}: earlier folder moved to {aside}", flush=True)
        print(f"{prefix}: {'resuming' if resume else 'running'}", flush=True)
        previous = read_state(folder).get("seconds", 0.0) if resume else 0.0
        RunFolder(folder).mkdir().write_yaml(
            CONFIG, getattr(exp, stage.name) if hasattr(exp, stage.name) else {"stage": stage.name}
        )
        _write_state(folder, stage, False, 0.0, previous)
        t0 = time.perf_counter()
        try:
            _execute(stage, folder, exp_path, resume, exp)
        except BaseException:
            _write_state(folder, stage, False, time.perf_counter() - t0, previous)
            raise
        seconds = time.perf_counter() - t0
        _write_state(folder, stage, True, seconds, previous)
        timings[stage.name] = previous + seconds
        print(f"{prefix}: done in {seconds:.1f} s", flush=True)
    # skipped, or not in this plan (a section removed): their folders from earlier runs are not read
    planned = {stage.name for stage in stages if not stage.skip}
    skipped = set(STAGES) - planned
    summary = write_summary(exp, root, timings, time.perf_counter() - started, exp_path, skipped)
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"summary: {root / 'summary.json'}")
    return summary


def _leave_out(stage: Stage, root: Path, prefix: str) -> None:
    """A skipped stage: its folder from an earlier run stays (unskipped with the same inputs, it is
    done), but its copies in results/<experiment>/ go: the summary reports only this plan's figures."""
    for name, (source, _) in KEEP.items():
        if source == stage.name:
            (root / name).unlink(missing_ok=True)
    print(f"{prefix}: not run ({stage.skip})", flush=True)


def seeds(exp: Experiment, root: Path) -> dict[str, int | None]:
    """The seed of every stage that draws random numbers, as the stages recorded them where they did."""
    train_env = read_json(root / "train" / "run" / "env.json", {})
    report = {} if exp.skipped("evaluate") else read_json(root / "evaluate" / "eval" / "eval.json", {})
    few_step = {}  # only with the stage: the run.json of other experiments stays as it was
    if exp.few_step is not None and not exp.skipped("few_step"):
        few_step = {"few_step": read_json(root / "few_step" / "run" / "env.json", {}).get("seed")}
    return {
        "data": exp.data.shapes.seed if exp.data.shapes else None,  # the shapes generator's
        "search": exp.search.seed,  # the sampler's (worker k uses seed + k)
        "train": train_env.get("seed"),  # the training config's: init, data order, noise
        "sample": None if exp.skipped("sample") else exp.sample.seed,
        "evaluate": report.get("seed"),  # prompts and starting noise of the quality figures
        **few_step,  # the few-step student's training (its evaluation: the evaluate seed)
    }


def write_summary(
    exp: Experiment,
    root: Path,
    timings: dict[str, float],
    session_seconds: float,
    exp_path: Path | None = None,
    skipped: set[str] | frozenset[str] = frozenset(),
) -> dict:
    """summary.json, run.json and the copies of the small results; a skipped stage's folder (left
    from an earlier run) is not read."""
    card = read_json(root / "export" / "card.json")
    summary: dict[str, Any] = {
        "experiment": exp.name,
        "best_params": card["params"],
        "best_macs": card["macs"],
        "best_latency_ms": card["latency_ms_p50"],
        "best_proxy_loss": card["proxy_loss"],
        "best_trial": card["trial"],
        "wall_seconds": round(sum(timings.values()), 1),  # every stage's own time, finished or resumed
        "session_seconds": round(session_seconds, 1),  # this invocation (skipped stages cost ~0)
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    vae = read_json(root / "vae" / "model" / "vae_train.json") if exp.vae.path is None else None
    if vae is not None:  # trained by this experiment: its verdict next to the U-Net's figures
        summary["vae_val_psnr_db"] = vae["val_psnr_db"]
        if "verdict" in vae:
            summary["vae_usable"] = vae["verdict"]["usable"]
            summary["vae_verdict"] = vae["verdict"]["line"]
    report = None if "evaluate" in skipped else read_json(root / "evaluate" / "eval" / "eval.json")
    if report is not None:
        for row in report["results"]:
            steps = row["steps"]
            if "alignment" in row:
                summary[f"alignment_accuracy_{steps}_steps"] = row["alignment"]
                if "chance_alignment" in row:
                    summary[f"chance_alignment_{steps}_steps"] = row["chance_alignment"]
                summary[f"domain_fid_{steps}_steps"] = row["frechet_distance"]
            if "fid" in row:
                summary[f"fid_{steps}_steps"] = row["fid"]
        summary["real_image_alignment"] = report.get("reference", {}).get("real_alignment")
    student = None if "few_step" in skipped else read_json(root / "few_step" / "eval" / "eval.json")
    if student is not None:  # the few-step rows beside the evaluate stage's (few_step/comparison.*)
        from nas.pipeline.comparison import few_step_rows, write_few_step

        rows = few_step_rows(report, student)
        write_few_step(rows, root / "few_step")
        summary["few_step_comparison"] = rows
        for row in rows:
            if row["run"] == "few_step" and "alignment" in row:
                summary[f"few_step_alignment_{row['steps']}_steps"] = row["alignment"]
                summary[f"few_step_domain_fid_{row['steps']}_steps"] = row["frechet_distance"]
    comparison = None if "variants" in skipped else read_json(root / "variants" / "comparison.json")
    if comparison is not None:
        summary.update(comparison.get("compare", {}))
    keep_results(root, skipped)
    folder = RunFolder(root)
    folder.write_yaml(EXPERIMENT, exp)
    stages = {}
    for name in STAGES:  # in order; the folders moved aside (<stage>.superseded-*) hold earlier runs
        state = {} if name in skipped else read_state(root / name)
        if state:
            commands = [shlex.join(relative_paths(shlex.split(c), root)) for c in state["commands"]]
            stages[name] = {"fingerprint": state["fingerprint"], "commands": commands}
    run = {
        "experiment": exp.name,
        "experiment_file": portable(exp_path),
        "environment": environment(),
        "seeds": seeds(exp, root),
        "stages": stages,
    }
    folder.write_json(RUN, relative_paths(run, root))
    folder.write_json(SUMMARY, summary)
    return summary


def keep_results(root: Path, skipped: set[str] | frozenset[str] = frozenset()) -> None:
    """Copy the small results (KEEP) from the stage folders to results/<experiment>/; JSON files with
    their absolute paths made relative (to results/<experiment>/, else to the repository root)."""
    for name, (stage, file) in KEEP.items():
        source = root / stage / file
        if stage in skipped:  # as _leave_out: the summary reports only this plan's figures
            (root / name).unlink(missing_ok=True)
        if stage in skipped or not source.is_file():
            continue
        if source.suffix == ".json":
            write_json(root / name, relative_paths(read_json(source), root))
        else:
            shutil.copyfile(source, root / name)


__all__ = ["STAGES", "load_experiment", "run_experiment"]
