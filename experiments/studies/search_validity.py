"""Is the search worth running? Samplers against random search at an equal trial budget, and what
pruning saves.

    python experiments/studies/search_validity.py search_spaces/quickstart.yaml \
        --cache results/quickstart/precompute/cache [--trials 30] [--jobs 2]
    python experiments/studies/search_validity.py search_spaces/quickstart.yaml \
        --cache results/quickstart/precompute/cache --pruning

Default mode: every sampler (tpe, nsga2, random, gp) x every seed (0 1 2) searches the space for
--trials trials, the space's baselines enqueued first in each, latency predicted from a lookup
table (deterministic and free, so samplers are compared on the loss they find, not on timing
noise). Per sampler, mean and min-max over seeds of: the hypervolume of the (proxy loss, latency)
front vs trial number, the first trial that dominates the baseline, the best proxy loss under the
export rule --pick (the quickstart experiment's: latency <= 0.8 x the baseline's).

--pruning: one objective (proxy loss) under the latency budget of --pick, sampler tpe, the same
seeds, every pruner (none, median, successive_halving, hyperband) and Ray Tune + ASHA (`ray_asha`:
`nas search --backend ray`, one Ray study at a time) at equal trial count: proxy optimizer steps
spent, trial seconds, best proxy loss vs no pruning.

--longer F: does the front hold after longer training? The pick of each sampler's best seed (the
lowest proxy loss under --pick) and the baseline are trained F x the proxy's steps (warm-up scaled
alike) on the same cache, --repeats times with different seeds; writes OUT/longer.{json,md}: proxy
loss next to the longer validation loss, and whether the longer training ranks them alike.

Each study lives in its own SQLite file, OUT/studies/<study>/study.db (`nas report --results
OUT/studies --study tpe-s0 --study random-s0` overlays any of them). Rerunning skips finished
studies and resumes a killed one where it stopped. --jobs N runs N studies at once as `nas search`
processes (torch threads split between them). Writes OUT/compare.{json,md}, hypervolume.png and
fronts.png (OUT/pruning/ and pruning.md for --pruning).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nas.core.errors import NasError  # noqa: E402

SAMPLERS = ["tpe", "nsga2", "random", "gp"]  # nas.search.storage.SAMPLERS
PRUNERS = ["none", "median", "successive_halving", "hyperband"]  # the space's proxy.pruner values
RAY_ASHA = "ray_asha"  # --pruning arm: `nas search --backend ray` (Ray Tune's ASHA stops trials early)
PICK = "latency_ms<=0.8*baseline"  # experiments/quickstart.yaml export.pick


def default_table(space_path: Path) -> Path:
    """results/latency_model/table_<space>.json, as `nas latency-table` writes it for the space."""
    return ROOT / "results" / "latency_model" / f"table_{Path(space_path).stem}.json"


def write_variant(space_path: Path, out: Path, name: str, table: Path | None, **changes) -> Path:
    """The space with absolute baseline and table paths, latency from the table, and `changes`."""
    data = yaml.safe_load(Path(space_path).read_text())
    base = Path(space_path).resolve().parent
    data["baselines"] = [str((base / rel).resolve()) for rel in data.get("baselines", [])]
    latency = dict(data.get("latency") or {})
    if latency.get("source") == "table":
        latency["table"] = str((base / latency["table"]).resolve())
    else:
        if table is None or not table.is_file():
            raise NasError(
                f"{space_path}: latency is measured; pass --latency-table PATH (`nas latency-table`), "
                f"{table} not found"
            )
        latency = {k: v for k, v in latency.items() if k not in ("warmup", "iters")}
        latency.update(source="table", table=str(table.resolve()))
    data["latency"] = latency
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = out / "spaces" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # unchanged: the studies' space digest holds
        path.write_text(text)
    return path


def latency_budget(space_path: Path, pick: str) -> float:
    """The latency budget (ms) of the rule `pick`, a multiple of the baseline's predicted latency
    or a number."""
    from nas.cost.table import prepare_latency, table_cost
    from nas.search.export import parse_conditions
    from nas.space import load_arch, load_space

    for attr, _, value, relative in parse_conditions(pick):
        if attr != "latency_ms_p50":
            continue
        if not relative:
            return value
        space = prepare_latency(load_space(space_path), space_path)
        baseline = load_arch(Path(space_path).parent / space.baselines[0])
        return value * table_cost(space, baseline)["latency_ms_p50"]
    raise NasError(f"--pick {pick!r}: --pruning needs a latency_ms condition for the budget")


def finished_trials(results: Path, study: str) -> int:
    from nas.search.storage import finished
    from nas.search.study import load_study

    if not (results / study / "study.db").is_file():
        return 0
    try:
        return finished(load_study(study, None, str(results)))
    except NasError:  # the file exists but the study was never created in it
        return 0


def run_studies(jobs: list[tuple[str, Path, str, int]], args, results: Path, backend: str = "optuna") -> None:
    """(study, space, sampler, seed) each to --trials; finished ones are skipped. `backend` ray: one
    study at a time (each starts its own local Ray), its trials --jobs at once inside Ray."""
    todo = [j for j in jobs if finished_trials(results, j[0]) < args.trials]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} studies finished; running {len(todo)}")
    if backend == "ray":
        for study, space, sampler, seed in todo:
            cmd = [sys.executable, "-m", "nas", "search", str(space), "--study", study, "--trials", str(args.trials),
                   "--cache", args.cache, "--results", str(results), "--sampler", sampler, "--seed", str(seed),
                   "--backend", "ray", "--workers", str(args.jobs), "--quiet"]  # fmt: skip
            code = subprocess.run(cmd, cwd=ROOT).returncode
            if code:
                raise NasError(f"study {study}: exit {code}; rerun to resume it")
        return
    if args.jobs == 1:
        from nas.search.study import SearchSettings, run_search

        for study, space, sampler, seed in todo:
            settings = SearchSettings(space=str(space), study=study, trials=args.trials, cache=args.cache,
                                      sampler=sampler, seed=seed, results=str(results))  # fmt: skip
            run_search(settings, quiet=args.quiet)
        return
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}

    def one(job: tuple[str, Path, str, int]) -> int:
        study, space, sampler, seed = job
        cmd = [sys.executable, "-m", "nas", "search", str(space), "--study", study, "--trials", str(args.trials),
               "--cache", args.cache, "--results", str(results), "--sampler", sampler, "--seed", str(seed),
               "--quiet"]  # fmt: skip
        code = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        print(f"study {study}: exit {code}")
        return code

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, todo))
    if any(codes):
        raise NasError(f"{sum(c != 0 for c in codes)} studies failed; rerun to resume them")


def load(results: Path, names: list[str]):
    from nas.search.study import load_study

    return [load_study(name, None, str(results)) for name in names]


def sampler_mode(args) -> dict:
    from nas.search.compare import compare

    out, results = Path(args.out), Path(args.out) / "studies"
    space = write_variant(Path(args.space), out, "search", args.latency_table)
    jobs = [(f"{sampler}-s{seed}", space, sampler, seed) for sampler in args.samplers for seed in args.seeds]
    run_studies(jobs, args, results)
    groups = {s: load(results, [f"{s}-s{seed}" for seed in args.seeds]) for s in args.samplers}
    return compare(groups, out, args.pick, args.reference)


def pruning_table(result: dict) -> str:
    """One row per pruner: cost and best proxy loss, relative to no pruning where it ran."""
    rows = {label: g["summary"] for label, g in result["groups"].items()}
    none = rows.get("none")
    lines = [
        "| pruner | proxy steps | vs none | trial seconds | vs none | best proxy loss | vs none | pruned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in rows.items():
        pruned = sum(
            st["states"]["PRUNED"] - st["rejected"] for st in result["groups"][label]["studies"]
        ) / max(1, len(result["groups"][label]["studies"]))
        cells = [label]
        for key, spec in (("proxy_steps", ".0f"), ("trial_seconds", ".0f"), ("best_loss", ".4f")):
            mean = s[key]["mean"]
            cells.append("-" if mean is None else format(mean, spec))
            ref = none[key]["mean"] if none else None
            if mean is None or ref is None:
                cells.append("-")
            elif key == "best_loss":
                cells.append(f"{mean - ref:+.4f}")
            else:
                cells.append(f"{mean / ref:.2f}x" if ref else "-")
        cells.append(f"{pruned:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pruning_mode(args) -> dict:
    from nas.core.runfolder import write_text
    from nas.search.compare import compare

    out, results = Path(args.out) / "pruning", Path(args.out) / "studies"
    base = write_variant(Path(args.space), out, "base", args.latency_table)
    budget = latency_budget(base, args.pick)
    jobs: list[tuple[str, Path, str, int]] = []
    ray_jobs: list[tuple[str, Path, str, int]] = []
    for pruner in args.pruners:
        ray = pruner == RAY_ASHA  # the space's pruner is not used: ASHA stops trials
        space = write_variant(Path(args.space), out, f"prune-{pruner}", args.latency_table,
                              objectives=[{"metric": "proxy_loss", "direction": "minimize"}],
                              budgets={"latency_ms": round(budget, 4)},
                              proxy={"pruner": "none" if ray else pruner})  # fmt: skip
        arm = [(f"prune-{pruner}-s{seed}", space, args.pruning_sampler, seed) for seed in args.seeds]
        (ray_jobs if ray else jobs).extend(arm)
    run_studies(jobs, args, results)
    run_studies(ray_jobs, args, results, backend="ray")
    groups = {p: load(results, [f"prune-{p}-s{seed}" for seed in args.seeds]) for p in args.pruners}
    result = compare(groups, out, args.pick, args.reference)
    table = pruning_table(result)
    head = (
        f"Single objective (proxy loss), latency budget {budget:.4g} ms ({args.pick}), sampler "
        f"{args.pruning_sampler}, {args.trials} trials, mean over seeds {args.seeds}.\n\n"
    )
    write_text(out / "pruning.md", head + table)
    result["pruning_table"] = table
    return result


def longer_mode(args) -> dict:
    """Picks of every sampler's best seed plus the baseline, trained args.longer x the proxy."""
    import json
    import statistics

    from scipy.stats import spearmanr

    from nas.core.runfolder import write_json, write_text
    from nas.data.cache import open_cache
    from nas.search.export import pick_trial
    from nas.search.objective import proxy_config
    from nas.space import load_space
    from nas.space.schema import Arch
    from nas.train.loop import proxy_train

    out, results = Path(args.out), Path(args.out) / "studies"
    space_path = out / "spaces" / "search.yaml"
    if not space_path.is_file():
        raise NasError(f"{space_path}: run the sampler comparison first (no --longer)")
    space = load_space(space_path)
    config = proxy_config(space, str(space_path))
    steps = space.proxy.steps * args.longer
    long_config = config.model_copy(update={"warmup_steps": config.warmup_steps * args.longer})
    cache = open_cache(args.cache)
    picks: dict[str, dict] = {}
    for sampler in args.samplers:
        best = None
        for seed in args.seeds:
            study = load(results, [f"{sampler}-s{seed}"])[0]
            try:
                trial = pick_trial(study, args.pick)
            except NasError:
                continue
            if best is None or trial.user_attrs["proxy_loss"] < best[1].user_attrs["proxy_loss"]:
                best = (seed, trial, study)
        if best is None:
            continue
        seed, trial, study = best
        baseline = next(t for t in study.trials if "baseline" in t.user_attrs)
        picks.setdefault("baseline", {"study": study.study_name, "trial": baseline.number,
                                      "arch": baseline.user_attrs["arch"],
                                      "proxy_loss": baseline.user_attrs["proxy_loss"],
                                      "latency_ms": baseline.user_attrs.get("latency_ms_p50")})  # fmt: skip
        picks[sampler] = {"study": f"{sampler}-s{seed}", "trial": trial.number, "arch": trial.user_attrs["arch"],
                          "proxy_loss": trial.user_attrs["proxy_loss"],
                          "latency_ms": trial.user_attrs.get("latency_ms_p50")}  # fmt: skip
    path = out / "longer.json"
    done = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for label, row in picks.items():
        losses = done.get(label, {}).get("long_losses", [])
        if done.get(label, {}).get("arch") != row["arch"]:
            losses = []  # another pick than the stored one: train again
        arch = Arch.model_validate(row["arch"])
        for r in range(len(losses), args.repeats):
            loss = proxy_train(arch, cache, steps, config=long_config, seed=space.proxy.seed + r, every=steps)
            losses.append(loss)
            print(f"  {label}: {steps} steps, seed {space.proxy.seed + r}: validation loss {loss:.4f}")
            done[label] = {**row, "long_losses": losses}
            write_json(path, {"steps": steps, "factor": args.longer, "rows": done})
        row["long_losses"] = losses
        row["long_loss"] = statistics.fmean(losses)
    labels = list(picks)
    rho = float(
        spearmanr([picks[k]["proxy_loss"] for k in labels], [picks[k]["long_loss"] for k in labels]).statistic
    )
    result = {"steps": steps, "factor": args.longer, "repeats": args.repeats, "pick": args.pick,
              "spearman_proxy_vs_long": rho, "rows": picks}  # fmt: skip
    write_json(path, result)
    base = picks.get("baseline", {}).get("long_loss")
    lines = [f"Picks (`{args.pick}`, each sampler's best seed) and the baseline, trained {steps} steps"
             f" ({args.longer}x the proxy), {args.repeats} training seed(s) each; Spearman(proxy, longer) = {rho:.2f}.", "",
             "| pick | study, trial | latency ms | proxy loss | longer: validation loss (mean [min, max]) | vs baseline |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for label, row in picks.items():
        ls = row["long_losses"]
        lat = row.get("latency_ms")
        vs = "-" if base is None or label == "baseline" else f"{row['long_loss'] - base:+.4f}"
        lines.append(f"| {label} | {row['study']} #{row['trial']} | {'-' if lat is None else f'{lat:.1f}'} |"
                     f" {row['proxy_loss']:.4f} | {row['long_loss']:.4f} [{min(ls):.4f}, {max(ls):.4f}] | {vs} |")  # fmt: skip
    write_text(out / "longer.md", "\n".join(lines) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("space", help="search-space YAML")
    p.add_argument("--cache", required=True, help="latent cache (nas precompute)")
    p.add_argument("--out", default=str(ROOT / "results" / "search_validity"))
    p.add_argument("--samplers", nargs="+", default=SAMPLERS, choices=SAMPLERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=30, help="finished trials per study (default 30)")
    p.add_argument("--jobs", type=int, default=1, help="studies at once (default 1: in this process)")
    p.add_argument("--latency-table", type=Path, help="default results/latency_model/table_<space>.json")
    p.add_argument("--pick", default=PICK, help=f"export rule of the 'best under budget' figure ({PICK})")
    p.add_argument(
        "--reference", default="baseline", choices=["baseline", "worst"], help="hypervolume reference"
    )
    p.add_argument("--pruning", action="store_true", help="single-objective pruner comparison instead")
    p.add_argument("--pruners", nargs="+", default=[*PRUNERS, RAY_ASHA], choices=[*PRUNERS, RAY_ASHA])
    p.add_argument("--pruning-sampler", default="tpe", choices=SAMPLERS)
    p.add_argument("--longer", type=int, default=0, metavar="F", help="train the picks F x the proxy's steps")
    p.add_argument("--repeats", type=int, default=2, help="--longer: training seeds per pick (default 2)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.trials < 1 or args.jobs < 1:
        p.error("--trials and --jobs must be >= 1")
    args.latency_table = args.latency_table or default_table(Path(args.space))
    try:
        if args.longer:
            result = longer_mode(args)
            print((Path(args.out) / "longer.md").read_text())
            return 0
        result = pruning_mode(args) if args.pruning else sampler_mode(args)
    except NasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = Path(args.out) / ("pruning" if args.pruning else "")
    print((folder / ("pruning.md" if args.pruning else "compare.md")).read_text())
    print(f"written: {folder}")
    return 0 if result else 1


if __name__ == "__main__":
    raise SystemExit(main())
