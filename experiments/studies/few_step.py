"""Few-step students, measured: consistency distillation (LCM) of the teacher and of the searched
student against the teacher at 50 CFG steps and the searched student at 30 (issue #27's table).

Rows (each `train` row once per training seed):
  baseline       the SD-layout teacher (`nas train tiny`, 8,000 steps, as results/inherit_distill_long)
  searched       the quickstart's searched student, inherited from the teacher + BK-SDM distillation
  teacher_lcm    the teacher's own layout + a guidance embedding (time_cond_proj_dim 256),
                 consistency-distilled from the teacher (classic LCM)
  searched_lcm   the searched layout + a guidance embedding, consistency-distilled from the
                 distilled searched student of the same seed (architecture, then steps)

Subcommands:
  train    every training run above (`--jobs` at once; a finished run is skipped, a killed one resumes)
  eval     `nas eval` of every row at its step counts (CFG rows at 10/20/30/50, LCM rows at 1/2/4/8)
  speed    U-Net ms per call and end-to-end images/s with the text encoder / U-Net / VAE split, every
           row in one process, interleaved rounds (nas.evaluate.e2e)
  grid     one image grid: baseline@50, searched@30, searched+LCM@1/2/4/8, same prompts and seeds
  report   README table, factors and plot from OUT/rows.json

    python experiments/studies/few_step.py train --cache results/quickstart/precompute/cache --out results/few_step
    python experiments/studies/few_step.py eval --evaluator results/quickstart/data/evaluator --out results/few_step
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported as a module too (tests)
from inherit_distill import load_rows, save_rows  # the study scripts' rows.json

ROOT = Path(__file__).resolve().parents[2]
NAS = [sys.executable, "-m", "nas"]
TEACHER_ARCH = ROOT / "search_spaces/archs/quickstart_baseline.yaml"
SEARCHED_ARCH = ROOT / "results/quickstart/arch.yaml"
EXTRA: list[str] = []  # --set overrides for every run


def with_guidance(arch: Path, out: Path) -> Path:
    """OUT/archs/NAME-lcm.yaml: `arch` with a guidance embedding, as `nas run`'s few_step stage makes
    its student (nas.pipeline.few_step.guidance_student)."""
    from nas.core.runfolder import write_yaml
    from nas.pipeline.few_step import guidance_student
    from nas.space import load_arch

    student = guidance_student(load_arch(arch))
    path = out / "archs" / f"{student.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(path, student)
    return path


def train_run(run: Path, arch: Path, cache: str, steps: int, sets: list[str], log: Path) -> float:
    """One `nas train tiny` run (skipped when finished, resumed when checkpointed); seconds taken."""
    if (run / "final").exists():
        return 0.0
    cmd = [*NAS, "train", "tiny", "--arch", str(arch), "--cache", cache, "--out", str(run),
           "--max-steps", str(steps), "--quiet"]  # fmt: skip
    if (run / "checkpoints").exists():
        cmd.append("--resume")
    t0 = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run([*cmd, "--set", *sets, *EXTRA], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def consistency_sets(args, teacher: Path, seed: int, steps: int) -> list[str]:
    return [
        f"seed={seed}", f"lr={args.lcm_lr}", "cfg_drop=0.0", "ema=null", "warmup_steps=20",
        f"checkpoint_every={steps // 2}", f"val_every={max(steps // 20, 1)}",
        f"distill={{kind: consistency, teacher: {teacher.resolve()}, init: inherit, "
        f"w_min: {args.w_min}, w_max: {args.w_max}}}",
    ]  # fmt: skip


def train(args) -> None:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    rows = load_rows(out)
    timing = rows.setdefault("train_seconds", {})
    teacher = out / "runs" / "teacher"
    sets = [f"checkpoint_every={args.teacher_steps // 16}"]
    timing.setdefault("teacher", train_run(teacher, TEACHER_ARCH, args.cache, args.teacher_steps, sets, log))
    save_rows(out, rows)
    teacher_lcm_arch = with_guidance(TEACHER_ARCH, out)
    searched_lcm_arch = with_guidance(SEARCHED_ARCH, out)

    def searched_then_lcm(seed: int) -> None:
        run = out / "runs" / f"searched-s{seed}"
        sets = ["warmup_steps=20", f"checkpoint_every={args.distill_steps}", f"seed={seed}",
                f"distill={{teacher: {teacher.resolve()}, init: inherit}}"]  # fmt: skip
        timing.setdefault(run.name, train_run(run, SEARCHED_ARCH, args.cache, args.distill_steps, sets, log))
        lcm = out / "runs" / f"searched_lcm-s{seed}"
        sets = consistency_sets(args, run, seed, args.lcm_steps)
        timing.setdefault(lcm.name, train_run(lcm, searched_lcm_arch, args.cache, args.lcm_steps, sets, log))

    def teacher_lcm(seed: int) -> None:
        run = out / "runs" / f"teacher_lcm-s{seed}"
        steps = args.teacher_lcm_steps or args.lcm_steps
        sets = consistency_sets(args, teacher, seed, steps)
        timing.setdefault(run.name, train_run(run, teacher_lcm_arch, args.cache, steps, sets, log))

    jobs = [] if args.skip_teacher_lcm else [(teacher_lcm, s) for s in (args.teacher_lcm_seeds or args.seeds)]
    jobs += [(searched_then_lcm, s) for s in args.seeds]  # after the longest (teacher-sized) runs
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(fn, seed) for fn, seed in jobs]:
            future.result()
    save_rows(out, rows)
    print(json.dumps(timing, indent=1))


# ---- eval ----------------------------------------------------------------------------------------

CFG_STEPS = [10, 20, 30, 50]
LCM_STEPS = [1, 2, 4, 8]
DEFAULT_GUIDANCE = 7.5  # nas eval's default; rows at another guidance are labelled name@gG


def row_runs(out: Path) -> dict[str, list[Path]]:
    """Row name -> its run folders (one per training seed), as `train` made them."""
    runs = out / "runs"
    found: dict[str, list[Path]] = {"baseline": [runs / "teacher"]}
    for name in ("searched", "teacher_lcm", "searched_lcm"):
        found[name] = sorted(p for p in runs.glob(f"{name}-s*") if (p / "final").is_dir())
    return {name: paths for name, paths in found.items() if paths and (paths[0] / "final").is_dir()}


def run_eval(args, run: Path, lcm: bool) -> dict:
    steps = LCM_STEPS if lcm else CFG_STEPS
    out = run / ("eval-lcm" if lcm else "eval-cfg") / f"g{args.guidance:g}"
    if not (out / "eval.json").exists():
        cmd = [*NAS, "eval", str(run), "--n", str(args.n), "--evaluator", args.evaluator, "--out", str(out),
               "--guidance", str(args.guidance), "--steps", *map(str, steps), "--quiet"]  # fmt: skip
        if lcm:
            cmd += ["--scheduler", "lcm"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "eval.json").read_text())


def evaluate(args) -> None:
    out = Path(args.out)
    rows = load_rows(out)
    quality = rows.setdefault("quality", {})
    for name, runs in row_runs(out).items():
        if args.rows and name not in args.rows:
            continue
        for run in runs:
            key = f"{name}/{run.name}" + ("" if args.guidance == DEFAULT_GUIDANCE else f"@g{args.guidance:g}")
            if key in quality:
                continue
            report = run_eval(args, run, lcm=name.endswith("_lcm"))
            quality[key] = {"row": name, "run": str(run.relative_to(out)), "guidance": args.guidance,
                            "scheduler": report["scheduler"], "images": report["images"],
                            "results": {r["steps"]: {"alignment": r["alignment"], "fd": r["frechet_distance"]}
                                        for r in report["results"]}}  # fmt: skip
            save_rows(out, rows)
            print(key, {k: round(v["alignment"], 3) for k, v in quality[key]["results"].items()}, flush=True)


# ---- speed ---------------------------------------------------------------------------------------


def speed(args) -> None:
    """End-to-end images/s and the split of every row, one process, interleaved rounds at batch 1."""
    import statistics

    import torch

    from nas.sample.components import held_out_captions, load_run
    from nas.sample.generate import SampleSettings, build_pipeline, generate
    from nas.sample.timing import StageClock

    out = Path(args.out)
    runs = row_runs(out)
    torch.set_num_threads(args.threads)
    prompts = held_out_captions(runs["baseline"][0], args.prompts)
    jobs = [(p, 0) for p in prompts]
    configs = [("baseline", 50, "ddim"), ("searched", 30, "ddim"), ("searched", 4, "ddim")]
    configs += [(name, steps, "lcm") for name in ("teacher_lcm", "searched_lcm") for steps in LCM_STEPS]
    configs = [c for c in configs if c[0] in runs]
    loaded = {}
    for name, _, scheduler in configs:
        if (name, scheduler) not in loaded:
            components = load_run(runs[name][0])
            loaded[name, scheduler] = (components, build_pipeline(components, scheduler))
    reports: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # interleaved: drift on a shared host hits every row alike
        for name, steps, scheduler in configs:
            components, pipe = loaded[name, scheduler]
            clock = StageClock()
            settings = SampleSettings(steps=steps, guidance=args.guidance, scheduler=scheduler, batch_size=1)
            generate(components, pipe, jobs, settings, progress=False, clock=clock)
            reports.setdefault(f"{name}@{steps}", []).append(clock.report())
    result = {}
    for key, reps in reports.items():
        med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        med["rounds_images_per_s"] = [r["images_per_s"] for r in reps]
        result[key] = med
    rows = load_rows(out)
    rows["speed"] = {"threads": args.threads, "rounds": args.rounds, "prompts": len(prompts), "batch": 1,
                     "guidance": args.guidance, "rows": result}  # fmt: skip
    save_rows(out, rows)
    for key, med in result.items():
        print(f"{key:>16}: {med['images_per_s']:.2f} images/s, U-Net {med['unet_ms_per_forward']:.2f} ms/call x "
              f"{med['unet_evals_per_image']:g}, shares te {med['text_encoder_share']:.2f} unet "
              f"{med['unet_share']:.2f} vae {med['vae_decode_share']:.2f}")  # fmt: skip


# ---- grid ----------------------------------------------------------------------------------------


def grid(args) -> None:
    """baseline@50, searched@30, searched+LCM@1/2/4/8 (seed 0 runs) on the same prompts and seeds."""
    import numpy as np
    from PIL import Image

    from nas.core.grid import labelled_grid
    from nas.sample.components import held_out_captions, load_run
    from nas.sample.generate import SampleSettings, build_pipeline, generate, to_uint8

    out = Path(args.out)
    runs = row_runs(out)
    prompts = held_out_captions(runs["baseline"][0], args.prompts)
    entries = [("baseline", 50, "ddim"), ("searched", 30, "ddim")]
    entries += [("searched_lcm", s, "lcm") for s in LCM_STEPS]
    pictures, labels = [], []
    for name, steps, scheduler in entries:
        components = load_run(runs[name][0])
        pipe = build_pipeline(components, scheduler)
        settings = SampleSettings(steps=steps, guidance=args.guidance, scheduler=scheduler)
        pictures.append(
            to_uint8(generate(components, pipe, [(p, 0) for p in prompts], settings, progress=False))
        )
        labels.append(f"{name} {steps} steps ({steps * (2 if scheduler == 'ddim' else 1)} calls)")
    picture, _ = labelled_grid(np.concatenate(pictures), len(prompts), row_labels=labels,
                               title=f"guidance {args.guidance:g}, seed 0, held-out captions")  # fmt: skip
    Image.fromarray(picture).save(out / "grid.png")


# ---- report --------------------------------------------------------------------------------------


def _macs(run: Path) -> int:
    from nas.cost.measure import arch_cost
    from nas.space import load_arch

    return int(arch_cost(load_arch(run / "arch.yaml"))["macs"])


def _stat(values: list[float]) -> str:
    import statistics

    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}-{max(values):.3f}]"


def report(args) -> None:
    """README tables from rows.json: quality by row and steps (means over seeds, min-max), U-Net MACs
    and evaluations per image, images/s and the split; the factors and the goal check."""
    import statistics

    out = Path(args.out)
    rows = load_rows(out)
    runs = row_runs(out)
    quality, speed_rows = rows.get("quality", {}), rows.get("speed", {}).get("rows", {})
    macs = {name: _macs(paths[0]) for name, paths in runs.items()}
    table: dict[tuple[str, int], dict] = {}
    for q in quality.values():
        for steps, m in q["results"].items():
            row = q["row"] if q["guidance"] == DEFAULT_GUIDANCE else f"{q['row']}@g{q['guidance']:g}"
            entry = table.setdefault((row, int(steps)), {"alignment": [], "fd": []})
            entry["alignment"].append(m["alignment"])
            entry["fd"].append(m["fd"])
    lines = ["| row | steps | seeds | alignment | Frechet distance | U-Net evals/image | U-Net MACs/image | "
             "images/s | text enc. / U-Net / VAE / other |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    summary: dict[str, dict] = {}
    order = lambda kv: (list(runs).index(kv[0][0].split("@")[0]), kv[0][0], kv[0][1])  # noqa: E731
    for (name, steps), entry in sorted(table.items(), key=order):
        base = name.split("@")[0]  # the row's runs (name@gG: the same runs at guidance G)
        evals = steps * (1 if base.endswith("_lcm") else 2)
        sp = speed_rows.get(f"{name}@{steps}")
        ips = f"{sp['images_per_s']:.2f}" if sp else "-"
        split = (" / ".join(f"{100 * sp[f'{k}_share']:.0f}%" for k in ("text_encoder", "unet", "vae_decode", "other"))
                 if sp else "-")  # fmt: skip
        lines.append(f"| {name} | {steps} | {len(entry['alignment'])} | {_stat(entry['alignment'])} | "
                     f"{_stat(entry['fd'])} | {evals} | {evals * macs[base] / 1e6:,.0f}M | {ips} | {split} |")  # fmt: skip
        summary[f"{name}@{steps}"] = {"alignment": statistics.mean(entry["alignment"]),
                                      "fd": statistics.mean(entry["fd"]), "macs": evals * macs[base],
                                      "images_per_s": sp and sp["images_per_s"]}  # fmt: skip
    rows["summary"] = summary
    save_rows(out, rows)
    text = "\n".join(lines)
    goal = _goal(summary, speed_rows, macs)
    (out / "table.md").write_text(text + "\n\n" + goal + "\n")
    print(text + "\n\n" + goal)


def _goal(summary: dict, speed_rows: dict, macs: dict) -> str:
    """The issue's goal at 4 steps, the fewest matching steps, and the factors of the speed-up."""
    base = summary.get("baseline@50")
    if base is None:
        return "no baseline@50 row yet"
    out = []
    for name in ("searched_lcm", "teacher_lcm"):
        for steps in LCM_STEPS:
            r = summary.get(f"{name}@{steps}")
            if r is None:
                continue
            ok_a = r["alignment"] >= base["alignment"] - 0.02
            ok_fd = r["fd"] <= 1.1 * base["fd"]
            out.append(f"- {name}@{steps}: alignment {r['alignment']:.3f} vs {base['alignment']:.3f} "
                       f"({'within' if ok_a else 'outside'} 0.02), Frechet distance {r['fd']:.0f} vs {base['fd']:.0f} "
                       f"({'within' if ok_fd else 'outside'} 10%), U-Net MACs {base['macs'] / r['macs']:.1f}x fewer"
                       + (f", images/s {r['images_per_s'] / base['images_per_s']:.1f}x"
                          if r.get("images_per_s") and base.get("images_per_s") else ""))  # fmt: skip
    b, s30, s4, l4 = (
        speed_rows.get(k) for k in ("baseline@50", "searched@30", "searched@4", "searched_lcm@4")
    )
    if b and s30 and s4 and l4:
        arch = b["unet_ms_per_forward"] / s30["unet_ms_per_forward"]  # both CFG calls at batch 2
        steps = 50 / 4
        folding = s4["unet_ms_per_forward"] / l4["unet_ms_per_forward"]  # a CFG step vs an embedded step
        product = arch * steps * folding
        unet_time = (b["unet_s"] / b["images"]) / (l4["unet_s"] / l4["images"])
        e2e = l4["images_per_s"] / b["images_per_s"]
        out.append(f"\nFactors (U-Net time per image, measured): architecture {arch:.2f}x (teacher vs searched "
                   f"U-Net call at batch 2), steps {steps:.1f}x (50 -> 4), guidance folding {folding:.2f}x (a CFG "
                   f"call at batch 2 vs an embedded call at batch 1, searched U-Net), runtime 1.00x (eager fp32 "
                   f"both); product {product:.1f}x against {unet_time:.1f}x measured U-Net time per image. "
                   f"End to end {e2e:.1f}x images/s: the text encoder and VAE decode take "
                   f"{100 * (l4['text_encoder_share'] + l4['vae_decode_share']):.0f}% of a 4-step image "
                   f"({100 * (b['text_encoder_share'] + b['vae_decode_share']):.0f}% at 50 CFG steps).")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", default="results/few_step")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-steps", type=int, default=8000)  # as results/inherit_distill_long
    p.add_argument("--distill-steps", type=int, default=1000)  # BK-SDM distill: where quality flattened there
    p.add_argument("--lcm-steps", type=int, default=2000)
    p.add_argument("--lcm-lr", type=float, default=2e-4)  # fine-tuning an inherited net: 5x below tiny's 1e-3
    p.add_argument("--w-min", type=float, default=5.0)
    p.add_argument("--w-max", type=float, default=15.0)
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--skip-teacher-lcm", action="store_true")
    p.add_argument("--teacher-lcm-steps", type=int, help="default: --lcm-steps")
    p.add_argument(
        "--teacher-lcm-seeds", type=int, nargs="+", help="default: --seeds (it costs ~4x a searched run)"
    )
    p.add_argument("--set", nargs="+", default=[], help="config overrides for every run (key=value)")
    p = sub.add_parser("eval")
    p.add_argument("--evaluator", required=True)
    p.add_argument("--out", default="results/few_step")
    p.add_argument("--n", type=int, default=100)  # images per step count (nas eval's default)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)  # LCM rows embed w = 6.5
    p.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    p = sub.add_parser("speed")
    p.add_argument("--out", default="results/few_step")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)  # as the other speed studies: stable on a shared host
    p.add_argument("--guidance", type=float, default=7.5)
    p = sub.add_parser("grid")
    p.add_argument("--out", default="results/few_step")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--guidance", type=float, default=7.5)
    p = sub.add_parser("report")
    p.add_argument("--out", default="results/few_step")
    args = parser.parse_args()
    EXTRA.extend(getattr(args, "set", []))
    commands = {"train": train, "eval": evaluate, "speed": speed, "grid": grid, "report": report}
    commands[args.command](args)


if __name__ == "__main__":
    main()
