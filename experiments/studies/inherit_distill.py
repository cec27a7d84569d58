"""What starting from a trained teacher buys: weight inheritance + distillation, measured.

Four measurements on one latent cache and one trained teacher (a `nas train` run folder):

  fidelity  K architectures of a space, spread over its size range, each scored by (a) the scratch
            proxy (the space's proxy steps from random weights) and (b) inherit+distill for the same
            steps; then each trained `--factor` times longer with inherit+distill (the method one
            would ship). Kendall tau / Spearman rho of (a), (b), MACs and params against that.
  quality   one student (the searched architecture) trained with `nas train` from scratch and with
            inherit+distill for several step counts; `nas eval` at 30 sampling steps (alignment,
            domain Frechet distance) per run; compute counted in student-step equivalents with the
            teacher's forward time included (its measured share of each distilled step).
  speed     U-Net forward latency of the student and the teacher, interleaved in one process.
  grid      teacher, distilled student and scratch student on the same prompts and seeds.

Each finished unit is recorded in OUT/rows.json and skipped on a rerun (a killed run resumes).

    python experiments/studies/inherit_distill.py all --teacher results/inherit_distill/teacher \\
        --cache results/quickstart/precompute/cache --arch results/quickstart/export/arch.yaml \\
        --evaluator results/quickstart/data/evaluator --out results/inherit_distill
    python experiments/studies/inherit_distill.py report --out results/inherit_distill

`quality --seeds 0 1 2` trains every run once per training seed and reports means with min-max;
`--teacher-steps` lists the teacher's sampling steps to evaluate (2 to 50 by default).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import kendalltau, spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # experiments/studies/proxy_fidelity.py: spread_archs

NAS = [sys.executable, "-m", "nas"]


def load_rows(out: Path) -> dict:
    path = out / "rows.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_rows(out: Path, rows: dict) -> None:
    tmp = out / "rows.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, out / "rows.json")


def correlations(xs: list[float], ys: list[float]) -> dict[str, float]:
    return {"kendall_tau": float(kendalltau(xs, ys)[0]), "spearman_rho": float(spearmanr(xs, ys)[0])}


# ---- fidelity ------------------------------------------------------------------------------------


def fidelity(args, rows: dict, out: Path) -> None:
    from proxy_fidelity import spread_archs

    from nas.core.config import validate
    from nas.cost.measure import arch_cost
    from nas.data.cache import open_cache
    from nas.search.objective import proxy_config
    from nas.space import load_space
    from nas.teacher.arch import load_teacher
    from nas.train.config import TrainConfig
    from nas.train.loop import proxy_train

    space = load_space(args.space)
    cache = open_cache(args.cache)
    config = proxy_config(space, args.space)
    distill = {"teacher": str(Path(args.teacher).resolve()), "init": "inherit"}
    distilled = validate(TrainConfig, {**config.model_dump(), "distill": distill}, "distill proxy")
    teacher = load_teacher(args.teacher)  # once for every run below
    steps, seed = space.proxy.steps, space.proxy.seed
    long_steps = steps * args.factor
    done = {json.dumps(r["arch"], sort_keys=True): r for r in rows.get("fidelity", [])}
    table = rows.setdefault("fidelity", [])
    for i, arch in enumerate(spread_archs(space, args.k, args.seed)):
        key = json.dumps(arch.to_data(), sort_keys=True)
        if key in done:
            continue
        cost = arch_cost(arch)
        row = {"arch": arch.to_data(), "params": cost["params"], "macs": cost["macs"]}
        for name, cfg, n, tch in (
            ("scratch_proxy", config, steps, None),
            ("distill_proxy", distilled, steps, teacher),
            ("distill_long", distilled.model_copy(update={"warmup_steps": distilled.warmup_steps * args.factor}),
             long_steps, teacher),
        ):  # fmt: skip
            t0 = time.perf_counter()
            row[name] = proxy_train(arch, cache, n, config=cfg, seed=seed, every=n, teacher=tch)
            row[f"{name}_seconds"] = time.perf_counter() - t0
        table.append(row)
        save_rows(out, rows)
        print(f"fidelity {i + 1}/{args.k}: {row['params']:,} params, scratch {row['scratch_proxy']:.4f},"
              f" distill {row['distill_proxy']:.4f}, long {row['distill_long']:.4f}", flush=True)  # fmt: skip
    rows["fidelity_setup"] = {"space": args.space, "proxy_steps": steps, "long_steps": long_steps,
                              "teacher": args.teacher, "k": args.k, "seed": args.seed}  # fmt: skip
    save_rows(out, rows)


# ---- quality -------------------------------------------------------------------------------------


def _train(args, run: Path, steps: int, distill: bool, seed: int = 0) -> None:
    if (run / "final").exists():
        return
    cmd = [*NAS, "train", "tiny", "--arch", args.arch, "--cache", args.cache, "--out", str(run),
           "--max-steps", str(steps), "--quiet"]  # fmt: skip
    # warm-up: the recipe's 20 steps, or 10% of a short run
    sets = [f"warmup_steps={min(20, steps // 10)}", f"checkpoint_every={steps}", f"seed={seed}"]
    if distill:
        sets.append(f"distill={{teacher: {Path(args.teacher).resolve()}, init: inherit}}")
    if (run / "checkpoints").exists():
        cmd.append("--resume")
    subprocess.run([*cmd, "--set", *sets], check=True)


def _eval(args, run: Path, steps: list[int]) -> dict:
    out = run / ("eval30" if steps == [30] else "eval-" + "-".join(map(str, steps)))
    if not (out / "eval.json").exists():
        cmd = [*NAS, "eval", str(run), "--n", str(args.n), "--evaluator", args.evaluator, "--out", str(out),
               "--steps", *map(str, steps), "--quiet"]  # fmt: skip
        subprocess.run(cmd, check=True)
    return json.loads((out / "eval.json").read_text())


def _step_seconds(run: Path) -> dict[str, float]:
    """Median seconds per optimizer step and the teacher's part of it, from metrics.csv."""
    import statistics

    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step_s")]
    if not rows:
        return {}
    return {
        "step_s": statistics.median(float(r["step_s"]) for r in rows),
        "teacher_s": statistics.median(float(r.get("teacher_s") or 0) for r in rows),
    }


def quality(args, rows: dict, out: Path) -> None:
    runs = rows.setdefault("quality", {})
    plan = [("scratch", s) for s in args.scratch_steps] + [("distill", s) for s in args.distill_steps]
    for seed in args.seeds:
        for method, steps in plan:
            key = f"{method}-{steps}" + (f"-s{seed}" if seed else "")  # seed 0: the first layout's keys
            if key in runs:
                continue
            run = out / "runs" / key
            if method == "scratch" and steps == args.reuse_steps and args.reuse_scratch and seed == 0:
                # the same architecture, recipe, cache and seed, trained already
                run = Path(args.reuse_scratch)
            t0 = time.perf_counter()
            _train(args, run, steps, distill=method == "distill", seed=seed)
            seconds = time.perf_counter() - t0
            result = _eval(args, run, [30])["results"][0]
            runs[key] = {"method": method, "steps": steps, "seed": seed, "run": str(run), "train_seconds": seconds,
                         "alignment": result["alignment"], "fd": result.get("frechet_distance"),
                         **_step_seconds(run)}  # fmt: skip
            save_rows(out, rows)
            print(f"quality {key}: alignment {result['alignment']:.3f}", flush=True)
    done = [r["steps"] for r in rows.get("teacher_eval", [])]
    if done != sorted(args.teacher_steps):
        rows["teacher_eval"] = _eval(args, Path(args.teacher), sorted(args.teacher_steps))["results"]
        save_rows(out, rows)


# ---- speed and grid ------------------------------------------------------------------------------


def speed(args, rows: dict, out: Path) -> None:
    import torch

    from nas.cost.measure import measure_latency
    from nas.space import build_unet, load_arch
    from nas.teacher.arch import load_teacher

    teacher, teacher_arch = load_teacher(args.teacher)
    student_arch = load_arch(args.arch)
    student = build_unet(student_arch)
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"student": [], "teacher": []}
    for _ in range(args.rounds):  # interleaved rounds: drift on a shared host hits both alike
        for name, net, arch in (("student", student, student_arch), ("teacher", teacher, teacher_arch)):
            times[name].append(measure_latency(net, arch, batch=2, warmup=2, iters=5).latency_ms_p50)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    rows["speed"] = {"batch": 2, "threads": 1, "rounds": args.rounds, "median_ms": med,
                     "teacher_over_student": med["teacher"] / med["student"]}  # fmt: skip
    save_rows(out, rows)


def grid(args, rows: dict, out: Path) -> None:
    """Teacher, distilled and scratch students on the same prompts and seeds, one row each."""
    import numpy as np
    from PIL import Image

    from nas.sample.components import load_run
    from nas.sample.generate import SampleSettings, build_pipeline, generate, image_grid, to_uint8

    quality_runs = rows.get("quality", {})
    pick = {m: max((r for r in quality_runs.values() if r["method"] == m), key=lambda r: r["steps"])
            for m in ("distill", "scratch")}  # fmt: skip
    entries = [("teacher", args.teacher), *((f"{m} {r['steps']} steps", r["run"]) for m, r in pick.items())]
    prompts = args.prompts
    rows_img = []
    for _, run in entries:
        components = load_run(run)
        pipe = build_pipeline(components)
        settings = SampleSettings(steps=30, guidance=4.0)
        images = generate(components, pipe, [(p, 0) for p in prompts], settings, progress=False)
        rows_img.append(to_uint8(images))
    picture = image_grid(np.concatenate(rows_img), columns=len(prompts))
    Image.fromarray(picture).save(out / "grid.png")
    rows["grid"] = {"rows": [name for name, _ in entries], "prompts": prompts, "seed": 0, "steps": 30}
    save_rows(out, rows)


# ---- report --------------------------------------------------------------------------------------


def _equivalents(r: dict) -> float:
    """Training compute in student-step equivalents: a distilled step costs step_s / (step_s - teacher_s)
    student steps (its teacher forward measured in the same run); a scratch step costs 1."""
    student_s = r.get("step_s", 0) - r.get("teacher_s", 0)
    factor = r["step_s"] / student_s if r["method"] == "distill" and student_s > 0 else 1.0
    return r["steps"] * factor


def quality_report(q: dict, out: Path) -> list[str]:
    """Per (method, steps): mean and spread over training seeds; per metric, the fewest distilled steps
    whose mean reaches the longest scratch run's mean (and its best seed); quality.png (both metrics vs
    compute)."""
    import statistics

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in q.values():
        r["student_step_equivalents"] = _equivalents(r)
        groups.setdefault((r["method"], r["steps"]), []).append(r)
    agg = {}
    for key, rs in sorted(groups.items()):
        agg[key] = {
            m: statistics.mean(r[m] for r in rs) for m in ("alignment", "fd", "student_step_equivalents")
        }
        agg[key].update(n=len(rs), **{f"{m}_range": (min(r[m] for r in rs), max(r[m] for r in rs))
                                     for m in ("alignment", "fd")})  # fmt: skip
        agg[key]["step_s"] = statistics.median(r.get("step_s", float("nan")) for r in rs)
        agg[key]["teacher_s"] = statistics.median(r.get("teacher_s", 0) for r in rs)
    lines = ["## Quality per training compute (30 sampling steps)", "",
             "Means over training seeds (min-max in brackets); compute in student-step equivalents, the "
             "teacher's forward counted.", "",
             "| method | steps | seeds | alignment | Frechet distance | s/step | teacher s/step | student-step equiv. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (method, steps), a in agg.items():
        al, fd = a["alignment_range"], a["fd_range"]
        step_s = "-" if math.isnan(a["step_s"]) else f"{a['step_s']:.3f}"  # NaN: the run logged no step time
        lines.append(f"| {method} | {steps} | {a['n']} | {a['alignment']:.3f} [{al[0]:.3f}-{al[1]:.3f}] | "
                     f"{a['fd']:.0f} [{fd[0]:.0f}-{fd[1]:.0f}] | {step_s} | {a['teacher_s']:.3f} | "
                     f"{a['student_step_equivalents']:.0f} |")  # fmt: skip
    lines.append("")
    scratch = [k for k in agg if k[0] == "scratch"]
    distill = sorted(k for k in agg if k[0] == "distill")
    if scratch and distill:
        final_key = max(scratch, key=lambda k: k[1])
        final, final_steps = agg[final_key], final_key[1]
        for metric, better in (("alignment", max), ("fd", min)):
            name = "alignment" if metric == "alignment" else "Frechet distance"
            fmt = ".3f" if metric == "alignment" else ".0f"
            # the scratch seeds' mean, and (with several seeds) the best scratch seed: the cautious target
            targets = [("", final[metric])]
            if final["n"] > 1:
                targets.append((" (best seed)", better(final[f"{metric}_range"])))
            for label, target in targets:
                hit = next((k for k in distill if better(agg[k][metric], target) == agg[k][metric]), None)
                if hit is None:
                    lines.append(f"- {name}: no distilled run reaches scratch {final_steps} steps{label} "
                                 f"({target:{fmt}})")  # fmt: skip
                    continue
                ratio_steps = final_steps / hit[1]
                ratio_compute = final["student_step_equivalents"] / agg[hit]["student_step_equivalents"]
                lines.append(f"- {name}: scratch {final_steps} steps{label} {target:{fmt}} reached by distill "
                             f"{hit[1]} steps ({agg[hit][metric]:{fmt}}): {ratio_steps:.1f}x fewer steps, "
                             f"{ratio_compute:.1f}x less compute")  # fmt: skip
        lines.append("")
    _quality_plot(agg, out / "quality.png")
    lines += ["![quality vs compute](quality.png)", ""]
    return lines


def _quality_plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(
        axes,
        ("alignment", "fd"),
        ("alignment (higher is better)", "domain Frechet distance (lower is better)"),
    ):
        for method, style in (("scratch", "o--"), ("distill", "s-")):
            keys = sorted(k for k in agg if k[0] == method)
            if not keys:
                continue
            xs = [agg[k]["student_step_equivalents"] for k in keys]
            ys = [agg[k][metric] for k in keys]
            lo = [agg[k][metric] - agg[k][f"{metric}_range"][0] for k in keys]
            hi = [agg[k][f"{metric}_range"][1] - agg[k][metric] for k in keys]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3,
                        label="inherit+distill" if method == "distill" else "scratch")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("compute (student-step equivalents, teacher counted)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: dict, out: Path) -> None:
    lines = ["# Inheritance + distillation, measured", ""]
    fid = rows.get("fidelity", [])
    if len(fid) >= 3:
        setup = rows["fidelity_setup"]
        long = [r["distill_long"] for r in fid]
        lines += [f"## Proxy fidelity ({len(fid)} architectures of `{setup['space']}`)", "",
                  f"Reference: validation loss after {setup['long_steps']} steps of inherit+distill "
                  f"from the teacher `{setup['teacher']}`. Proxies: {setup['proxy_steps']} steps.", "",
                  "| score | Kendall tau | Spearman rho |", "|---|---:|---:|"]  # fmt: skip
        scores = {
            f"scratch proxy ({setup['proxy_steps']} steps)": [r["scratch_proxy"] for r in fid],
            f"inherit+distill proxy ({setup['proxy_steps']} steps)": [r["distill_proxy"] for r in fid],
            "MACs (baseline)": [-r["macs"] for r in fid],
            "#params (baseline)": [-r["params"] for r in fid],
        }
        rows["fidelity_correlations"] = {}
        for name, xs in scores.items():
            c = correlations(xs, long)
            rows["fidelity_correlations"][name] = c
            lines.append(f"| {name} | {c['kendall_tau']:.3f} | {c['spearman_rho']:.3f} |")
        secs = {k: sum(r[f"{k}_seconds"] for r in fid) for k in ("scratch_proxy", "distill_proxy")}
        lines += ["", f"Proxy wall time, all architectures: scratch {secs['scratch_proxy']:.0f} s, "
                  f"inherit+distill {secs['distill_proxy']:.0f} s.", ""]  # fmt: skip
    q = rows.get("quality", {})
    if q:
        lines += quality_report(q, out)
    if "teacher_eval" in rows:
        lines += ["Teacher, alignment by sampling steps: " + ", ".join(
            f"{r['steps']}: {r['alignment']:.3f}" for r in rows["teacher_eval"]), ""]  # fmt: skip
    if "speed" in rows:
        s = rows["speed"]
        lines += [f"U-Net forward, batch 2, 1 thread, {s['rounds']} interleaved rounds: student "
                  f"{s['median_ms']['student']:.1f} ms, teacher {s['median_ms']['teacher']:.1f} ms "
                  f"({s['teacher_over_student']:.2f}x).", ""]  # fmt: skip
    (out / "README.md").write_text("\n".join(lines))
    save_rows(out, rows)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fidelity", "quality", "speed", "grid", "report", "all"])
    p.add_argument("--teacher", default="results/inherit_distill/teacher", help="`nas train` run folder")
    p.add_argument("--cache", default="results/quickstart/precompute/cache")
    p.add_argument("--space", default="search_spaces/quickstart.yaml")
    p.add_argument("--arch", default="results/quickstart/export/arch.yaml", help="student for quality/speed")
    p.add_argument("--evaluator", default="results/quickstart/data/evaluator")
    p.add_argument("--k", type=int, default=12, help="fidelity: architectures")
    p.add_argument("--factor", type=int, default=6, help="fidelity: long budget = factor x proxy steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch-steps", type=int, nargs="+", default=[250, 500, 1000, 2000])
    p.add_argument("--distill-steps", type=int, nargs="+", default=[100, 200, 400, 1000])
    p.add_argument("--reuse-scratch", help="an existing scratch run of --arch to use for --reuse-steps")
    p.add_argument("--reuse-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="quality: training seeds per run")
    p.add_argument(
        "--teacher-steps",
        type=int,
        nargs="+",
        default=[2, 5, 10, 20, 30, 50],
        help="quality: the teacher's sampling steps to evaluate",
    )
    p.add_argument("--n", type=int, default=100, help="quality: images per evaluation")
    p.add_argument("--rounds", type=int, default=7, help="speed: interleaved rounds")
    p.add_argument("--prompts", nargs="+", default=[
        "a small red circle in the top left on a white background",
        "a large blue square in the center on a black background",
        "a green triangle in the bottom right on a white background",
        "a yellow circle and a purple square on a gray background"])  # fmt: skip
    p.add_argument("--out", default="results/inherit_distill")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    steps = {"fidelity": fidelity, "quality": quality, "speed": speed, "grid": grid}
    for name, fn in steps.items():
        if args.what in (name, "all"):
            fn(args, rows, out)
    report(rows, out)


if __name__ == "__main__":
    main()
