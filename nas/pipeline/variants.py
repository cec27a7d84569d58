"""The `variants` stage of `nas run`: more runs trained and evaluated beside the main one, side by
side on the same cache, evaluator, prompts and seeds, and the comparison the seed's claims need.

A variant trains an architecture (`searched`: the exported one; or a YAML file) with a recipe, or
re-evaluates an already trained run (`reuse: main` or another variant) with other sampling settings
(e.g. leading timesteps, raw instead of EMA weights). `compare` names a baseline and a candidate and
reports: per-step U-Net latency ratio (measured here, both models interleaved, nothing else
running), the fewest steps at which the candidate matches the baseline's quality at `match_steps`,
their product (the combined speedup), and an ablation table (variants marked `ablates: ELEMENT`
against the candidate at `ablation_steps`).

Variants run as `nas` subprocesses, `workers` at a time, each with cores / workers torch threads;
every finished command is recorded in `variants/state.json`, so a killed stage resumes (a training
from its last checkpoint) without redoing finished work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from nas.core import limits as L
from nas.core.config import Strict
from nas.core.errors import NasError
from nas.core.runfolder import CHECKPOINTS, MAIN, RunFolder, eval_folder, run_folder

SEARCHED = "searched"  # the exported architecture


class VariantEval(Strict):
    # default: the evaluate stage's step counts; bounds in nas/core/limits.py
    steps: list[Annotated[int, Field(ge=1, le=L.MAX_SAMPLE_STEPS)]] | None = Field(None, max_length=100)
    n: int | None = Field(None, ge=2, le=L.MAX_IMAGES)  # default: the evaluate stage's n
    spacing: Literal["trailing", "leading", "linspace"] | None = None  # default: nas eval's (trailing)
    weights: Literal["auto", "ema", "raw"] = "auto"  # raw: the EMA ablation


class Variant(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    label: str = ""  # for tables and plots; default: the name
    arch: str | None = None  # "searched" or an architecture YAML (relative to the experiment file)
    config: str | None = None  # train preset or config YAML; default: the train stage's
    max_steps: int | None = Field(None, ge=1, le=L.MAX_STEPS)  # default: the train stage's
    set: list[str] = []  # `nas train --set` overrides, e.g. ["diffusion.min_snr_gamma=null"]
    reuse: str | None = None  # evaluate this trained run instead of training: "main" or a variant
    eval: VariantEval = VariantEval()
    ablates: str | None = None  # recipe element this variant switches off (ablation table)

    @model_validator(mode="after")
    def _train_or_reuse(self) -> Variant:
        if self.name == MAIN:
            raise ValueError(f"name {MAIN!r} is the main run's")
        if (self.reuse is None) == (self.arch is None):
            raise ValueError(
                f"variant {self.name}: give exactly one of arch (train) or reuse (evaluate a run)"
            )
        if self.reuse is not None and (self.config or self.set or self.max_steps):
            raise ValueError(
                f"variant {self.name}: reuse evaluates a trained run; config/set/max_steps not allowed"
            )
        return self


class Compare(Strict):
    baseline: str  # a variant name (or "main")
    candidate: str = MAIN
    # the baseline's step count the candidate must match
    match_steps: int = Field(50, ge=1, le=L.MAX_SAMPLE_STEPS)
    # step count of the ablation table (the seed's 30)
    ablation_steps: int = Field(30, ge=1, le=L.MAX_SAMPLE_STEPS)


class VariantsStage(Strict):
    skip: bool = False  # true: keep the section but run none of it (no comparison)
    workers: int = Field(1, ge=1, le=L.MAX_WORKERS)  # variants trained / evaluated at once
    runs: list[Variant] = Field(min_length=1)
    compare: Compare | None = None

    @model_validator(mode="after")
    def _names(self) -> VariantsStage:
        names = [v.name for v in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variant names: {', '.join(dup)}")
        known = {MAIN, *names}
        trained = {MAIN} | {v.name for v in self.runs if v.reuse is None}
        for v in self.runs:
            if v.reuse is not None and v.reuse not in trained:
                raise ValueError(
                    f"variant {v.name}: reuse {v.reuse!r} is not a trained run ({', '.join(sorted(trained))})"
                )
        if self.compare is not None:
            for role in ("baseline", "candidate"):
                if getattr(self.compare, role) not in known:
                    raise ValueError(
                        f"compare.{role}: unknown run {getattr(self.compare, role)!r} ({', '.join(sorted(known))})"
                    )
        return self


def check_compare_steps(stage: VariantsStage, main_steps: list[int]) -> None:
    """The step counts `compare` reads must be evaluated: say so now, not after hours of training."""
    c = stage.compare
    if c is None:
        return
    steps = {MAIN: main_steps} | {v.name: v.eval.steps or main_steps for v in stage.runs}
    needs = [(c.baseline, c.match_steps, "compare.match_steps")]
    if any(v.ablates for v in stage.runs):
        needs.append((c.candidate, c.ablation_steps, "compare.ablation_steps"))
        needs += [(v.name, c.ablation_steps, "compare.ablation_steps") for v in stage.runs if v.ablates]
    for name, count, key in needs:
        if count not in steps[name]:
            raise NasError(
                f"variants: {key} {count} is not among the step counts evaluated for {name} "
                f"({', '.join(map(str, steps[name]))})"
            )


def plan_variants(stage: VariantsStage, exp, resolve, root: Path, cache: Path, evaluator: Path | None, make):
    """{variant: [train settings?, eval settings]}; `resolve[key]` reads an arch or config value
    relative to the experiment file, `make` builds
    a command's settings (nas.pipeline.plan._Builder: errors name the experiment key)."""
    from nas.commands import eval, train

    check_compare_steps(stage, exp.evaluate.steps)
    jobs: dict[str, list] = {}
    searched = root / "export" / "arch.yaml"
    for i, v in enumerate(stage.runs):
        where = f"variants.runs.{i}"
        cmds = []
        if v.reuse is None:
            arch = searched if v.arch == SEARCHED else resolve["arch"](v.arch)
            sets = [*exp.train.set, *v.set] if v.config is None else list(v.set)
            values = {"config": resolve["config"](v.config or exp.train.config), "arch": str(arch), "cache": str(cache),
                      "out": str(run_folder(root, v.name)), "quiet": True, "max_steps": v.max_steps or exp.train.max_steps,
                      "overrides": sets}  # fmt: skip
            keys = {"overrides": f"{where}.set"} if v.config is not None else {"overrides": "train.set"}
            if v.config is None:
                keys["config"] = "train.config"
            cmds.append(make(train.Settings, values, where, keys=keys))
        e = v.eval
        values = {"run": str(run_folder(root, v.reuse or v.name)), "steps": e.steps or exp.evaluate.steps,
                  "n": e.n or exp.evaluate.n, "out": str(eval_folder(root, v.name)), "weights": e.weights,
                  "quiet": True, "evaluator": evaluator and str(evaluator)}  # fmt: skip
        if e.spacing:
            values["spacing"] = e.spacing
        cmds.append(make(eval.Settings, values, f"{where}.eval", keys={"evaluator": "evaluate.evaluator"},
                         user=exp.evaluate.args, user_where="evaluate.args"))  # fmt: skip
        jobs[v.name] = cmds
    return jobs


# ---- execution ---------------------------------------------------------------------------------


def _key(argv: list[str]) -> str:
    return " ".join(argv)


STATE = "state.json"  # variants/state.json: every finished command and its seconds


def _load_state(folder: Path) -> dict:
    return RunFolder(folder).read_json(STATE, {"done": {}})


def _save_state(folder: Path, state: dict) -> None:
    RunFolder(folder).write_json(STATE, state)


def _prepare(argv: list[str]) -> list[str]:
    """Resume a training that left checkpoints; clear an evaluation that did not finish."""
    argv = list(argv)
    out = Path(argv[argv.index("--out") + 1])
    if argv[0] == "train" and (out / CHECKPOINTS).is_dir():
        argv.append("--resume")
    elif argv[0] == "eval" and out.exists():
        shutil.rmtree(out)
    return argv


def execute(stage: VariantsStage, jobs: dict[str, list], folder: Path) -> None:
    """Run every job's commands in order, `workers` jobs at a time; reused runs wait for their training."""
    from nas.core.settings import to_argv

    jobs = {name: [to_argv(s) for s in cmds] for name, cmds in jobs.items()}  # `nas` subprocesses
    folder.mkdir(parents=True, exist_ok=True)
    state = _load_state(folder)
    threads = max(1, (os.cpu_count() or 1) // stage.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    waits = {v.name: v.reuse for v in stage.runs}
    pending = {name: [c for c in cmds if _key(c) not in state["done"]] for name, cmds in jobs.items()}
    finished = {name for name, cmds in pending.items() if not cmds}
    running: dict[str, tuple[subprocess.Popen, list[str], float]] = {}
    total = sum(len(c) for c in jobs.values())
    print(f"variants: {len(jobs)} runs, {total - sum(map(len, pending.values()))}/{total} commands done before; "
          f"{stage.workers} at a time, {threads} threads each; logs in {folder}/<name>/log.txt", flush=True)  # fmt: skip
    try:
        while len(finished) < len(jobs):
            for name, cmds in pending.items():
                if len(running) >= stage.workers:
                    break
                source = waits.get(name)
                ready = source in (None, MAIN) or source in finished
                if name in running or name in finished or not ready:
                    continue
                argv = _prepare(cmds[0])
                (folder / name).mkdir(parents=True, exist_ok=True)
                with open(folder / name / "log.txt", "a") as log:
                    log.write(f"$ nas {_key(argv)}\n")
                    log.flush()
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "nas", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                running[name] = (proc, cmds[0], time.perf_counter())
            if not running:
                blocked = sorted(set(jobs) - finished)
                raise NasError(f"variants: cannot start {', '.join(blocked)} (their reused run failed?)")
            time.sleep(0.5)
            for name, (proc, argv, t0) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                seconds = time.perf_counter() - t0
                if code:
                    tail = (folder / name / "log.txt").read_text().strip().splitlines()[-1:]
                    raise NasError(f"variant {name}: `nas {argv[0]}` exited with {code}: {' '.join(tail)} "
                                   f"(log: {folder / name / 'log.txt'})")  # fmt: skip
                state["done"][_key(argv)] = round(seconds, 1)
                _save_state(folder, state)
                pending[name].pop(0)
                print(f"variant {name}: {argv[0]} done in {seconds:.0f} s", flush=True)
                if not pending[name]:
                    finished.add(name)
    finally:
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
