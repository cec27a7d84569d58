"""End-to-end images/s and image quality behind each deploy-time runtime (nas/deploy/runtimes.py), for a
searched U-Net and an SD-layout baseline trained on the same VAE, text encoder and latent cache.

Every runtime x precision arm wraps its own copy of each run's U-Net in the same diffusers
StableDiffusionPipeline (nas/sample/generate.py). Three parts, in one process:

* speed: the whole sampling loop per image (text encoding, U-Net x steps with classifier-free
  guidance at batch 2, scheduler, VAE decode; `nas.sample.generate`, one image per call). After one
  warm-up image per arm (torch.compile compiles there), the arms of both runs take turns in
  --rounds rounds (round-robin, so drifting load on a shared host hits all alike), each generating
  the same --images (prompt, seed) pairs, new ones every round; an arm's images/s is --images over
  the median of its rounds. The first of these images also give the largest pixel difference
  (0-255) of each arm against eager fp32 of the same run.
* quality: alignment and Frechet distance at --quality-steps on the first --prompts validation
  prompts, through `nas eval`'s own code (nas.evaluate.quality.quality_vs_steps) with each arm's
  pipeline. The noise they are judged against: eager fp32 with --noise-seeds other sampling seeds
  (the largest change from the eager figure); an arm that moves further is flagged.
* the combined figure: the searched U-Net on its best unflagged runtime (most images/s at
  --quality-steps) at --match-steps, against the baseline at --match-target steps in eager fp32;
  matching as in `nas run`'s comparison (nas.pipeline.comparison.steps_to_match: fewest evaluated
  steps at least as good, no tolerance), on alignment and separately on Frechet distance.

    OMP_NUM_THREADS=1 python experiments/benchmarks/runtime_quality.py \\
        --baseline results/inherit_distill/teacher --searched results/inherit_distill/runs/distill-1000 \\
        --evaluator results/quickstart/data/evaluator [--prompts 100] [--rounds 3] [--out results/inference]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # as a script only: importing it (tests) leaves the environment alone
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: spinning OpenMP threads cost 10x
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from nas.core.errors import NasError
from nas.evaluate.quality import is_shapes, quality_vs_steps, shapes_eval_set
from nas.evaluate.shapes_evaluator import load_evaluator
from nas.pipeline.comparison import _fmt, steps_to_match
from nas.sample.components import load_run
from nas.sample.generate import SampleSettings, build_pipeline, generate, to_uint8

ARMS = "eager:fp32,compile:fp32,onnxruntime:fp32,onnxruntime:int8,openvino:fp32"
EAGER = "eager fp32"
METRICS = ("alignment", "frechet_distance")  # higher / lower is better (steps_to_match knows which)


def ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def build_arms(components, arms: list[tuple[str, str]]) -> tuple[dict, dict]:
    """name -> (components with their own U-Net copy, pipeline); name -> reason for the skipped."""
    built, skipped = {}, {}
    for runtime, precision in arms:
        name = f"{runtime} {precision}"
        comp = replace(components, unet=copy.deepcopy(components.unet))
        try:
            built[name] = (comp, build_pipeline(comp, runtime=runtime, precision=precision))
        except NasError as exc:
            skipped[name] = str(exc)
    return built, skipped


def images_per_s(
    pipes: dict, steps_of: dict, jobs: list, images: int, rounds: int
) -> tuple[dict, dict, dict]:
    """{run: {arm: {steps: images/s}}}, {run: {arm: {steps: uint8 images of all rounds}}} and
    {(run, arm): reason} for an arm whose warm-up failed (e.g. compile without a C++ compiler). See
    the module docstring: interleaved rounds, one image per pipeline call, new (prompt, seed) each round."""
    seconds: dict = {
        run: {arm: {s: [] for s in steps_of[run]} for arm in arms} for run, arms in pipes.items()
    }
    pixels: dict = {run: {arm: {s: [] for s in steps_of[run]} for arm in arms} for run, arms in pipes.items()}
    failed = {}
    for run, arms in pipes.items():
        for arm, (comp, pipe) in list(arms.items()):
            t0 = time.perf_counter()
            try:
                generate(comp, pipe, jobs[:1], SampleSettings(steps=2, batch_size=1), progress=False)
            except Exception as exc:  # any runtime failure skips the arm, with its reason
                failed[run, arm] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del arms[arm], seconds[run][arm], pixels[run][arm]
                continue
            print(f"warm-up {run} {arm}: {time.perf_counter() - t0:.1f} s", flush=True)
    start = time.perf_counter()
    for r in range(rounds):
        batch = [jobs[(r * images + i) % len(jobs)] for i in range(images)]
        for steps in sorted({s for v in steps_of.values() for s in v}):
            for run, arms in pipes.items():
                if steps not in steps_of[run]:
                    continue
                for arm, (comp, pipe) in arms.items():
                    t0 = time.perf_counter()
                    out = generate(
                        comp, pipe, batch, SampleSettings(steps=steps, batch_size=1), progress=False
                    )
                    seconds[run][arm][steps].append(time.perf_counter() - t0)
                    pixels[run][arm][steps].append(to_uint8(out))
        print(f"speed round {r + 1}/{rounds} done, {time.perf_counter() - start:.0f} s", flush=True)
    ips = {run: {arm: {s: images / statistics.median(v) for s, v in by.items()} for arm, by in arms.items()}
           for run, arms in seconds.items()}  # fmt: skip
    imgs = {run: {arm: {s: np.concatenate(v) for s, v in by.items()} for arm, by in arms.items()}
            for run, arms in pixels.items()}  # fmt: skip
    return ips, imgs, failed


def quality(comp, pipe, steps: list[int], eval_set, evaluator, label: str) -> dict[int, dict]:
    """{steps: {alignment, frechet_distance}} through `nas eval`'s quality_vs_steps."""
    t0 = time.perf_counter()
    settings = SampleSettings(steps=max(steps), batch_size=8)
    report = quality_vs_steps(comp, pipe, steps, eval_set, settings, evaluator, progress=False)
    rows = {row["steps"]: {m: row[m] for m in METRICS} for row in report["results"]}
    shown = ", ".join(
        f"{s}: align {q['alignment']:.3f} FD {q['frechet_distance']:.0f}" for s, q in rows.items()
    )
    print(
        f"quality {label} ({len(eval_set.prompts)} prompts): {shown} [{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )
    return rows


def flag(quality_row: dict, eager_row: dict, noise: dict) -> list[str]:
    """Metrics on which an arm moved further from eager fp32 than eager's own seed-to-seed noise."""
    return [m for m in METRICS if abs(quality_row[m] - eager_row[m]) > noise[m]]


def best_arm(ips: dict, steps: int, flagged: dict) -> str:
    """The arm with the most images/s at `steps` among those whose quality is not flagged."""
    return max((a for a in ips if not flagged.get(a)), key=lambda a: ips[a][steps])


def combined(cand_quality: dict, base_quality: dict, target: int, cand_ips: dict, base_ips: float) -> dict:
    """Steps for the candidate to match the baseline at `target` steps, and images/s ratio there."""
    cand, base = {"quality": cand_quality}, {"quality": base_quality}
    out: dict = {"match_steps": target, "fewest_steps_evaluated": min(cand_quality)}
    for metric, suffix in (("alignment", ""), ("frechet_distance", "_fd")):
        steps = steps_to_match(cand, base, target, metric)
        out[f"steps_to_match_baseline_{target}{suffix}"] = steps
        out[f"combined_speedup{suffix}"] = cand_ips[steps] / base_ips if steps else None
    lower = min(base_quality)  # the baseline's gain from its fewest evaluated steps to the target
    out["baseline_alignment_gain"] = base_quality[target]["alignment"] - base_quality[lower]["alignment"]
    out["baseline_fd_gain"] = (
        base_quality[lower]["frechet_distance"] - base_quality[target]["frechet_distance"]
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="results/inherit_distill/teacher", help="run folder (SD layout)")
    p.add_argument("--searched", default="results/inherit_distill/runs/distill-1000", help="run folder")
    p.add_argument("--evaluator", default="results/quickstart/data/evaluator", help="shapes evaluator folder")
    p.add_argument("--arms", default=ARMS, help="runtime:precision list, eager:fp32 first")
    p.add_argument("--steps", default="30,50", help="step counts timed for both runs")
    p.add_argument(
        "--quality-steps", type=int, default=30, help="steps at which every arm's quality is measured"
    )
    p.add_argument(
        "--match-steps", default="5,10,20,30", help="searched run's step counts (timed and scored)"
    )
    p.add_argument("--match-target", type=int, default=50, help="baseline's step count to match (eager fp32)")
    p.add_argument(
        "--prompts", type=int, default=100, help="validation prompts per quality figure (1 seed each)"
    )
    p.add_argument("--noise-seeds", type=int, default=2, help="extra eager sampling seeds for the noise")
    p.add_argument("--images", type=int, default=2, help="images per arm and round in the speed part")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/inference")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    arms = [tuple(x.split(":")) for x in a.arms.split(",")]
    if arms[0] != ("eager", "fp32"):
        p.error("--arms must start with eager:fp32, the reference")
    if not {a.quality_steps, a.match_target} <= set(ints(a.steps)):
        p.error("--steps must include --quality-steps and --match-target (their images/s are needed)")
    started = time.perf_counter()
    runs = {"baseline": a.baseline, "searched": a.searched}
    comps = {k: load_run(v) for k, v in runs.items()}
    if not all(is_shapes(c.cache) for c in comps.values()):
        raise NasError(
            "both runs must be trained on shapes (alignment and Frechet distance need its evaluator)"
        )
    evaluator = load_evaluator(a.evaluator)
    eval_set = shapes_eval_set(comps["baseline"], a.prompts, a.seed)  # same cache: same prompts for both
    jobs = list(zip(eval_set.prompts, eval_set.seeds))
    pipes, skipped = {}, {}
    for run, comp in comps.items():
        pipes[run], skipped[run] = build_arms(comp, arms)
        for arm, why in skipped[run].items():
            print(f"{run} {arm}: skipped ({why})", flush=True)
    steps_of = {"baseline": ints(a.steps), "searched": sorted(set(ints(a.steps)) | set(ints(a.match_steps)))}
    ips, imgs, failed = images_per_s(pipes, steps_of, jobs, a.images, a.rounds)
    for (run, arm), why in failed.items():
        skipped[run][arm] = why
        print(f"{run} {arm}: skipped ({why})", flush=True)

    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "settings": vars(a), "runs": {}}  # fmt: skip
    q = a.quality_steps
    for run, comp in comps.items():
        arm_q = {
            arm: quality(c, pl, [q], eval_set, evaluator, f"{run} {arm}")[q]
            for arm, (c, pl) in pipes[run].items()
        }
        eager_c, eager_pipe = pipes[run][EAGER]
        noise_q = []
        for k in range(1, a.noise_seeds + 1):
            other = replace(eval_set, seeds=[s + k * a.prompts for s in eval_set.seeds])  # unused seeds
            noise_q.append(
                quality(eager_c, eager_pipe, [q], other, evaluator, f"{run} eager, seeds +{k * a.prompts}")[q]
            )
        noise = {m: max(abs(r[m] - arm_q[EAGER][m]) for r in noise_q) for m in METRICS}
        flagged = {arm: flag(row, arm_q[EAGER], noise) for arm, row in arm_q.items()}
        per_arm = {}
        for arm in pipes[run]:
            diff = {
                s: np.abs(imgs[run][arm][s].astype(int) - imgs[run][EAGER][s].astype(int))
                for s in ips[run][arm]
            }
            per_arm[arm] = {"images_per_s": ips[run][arm], "vs_eager": {s: v / ips[run][EAGER][s] for s, v in ips[run][arm].items()},
                            "max_pixel_diff": {s: int(d.max()) for s, d in diff.items()},
                            "mean_pixel_diff": {s: float(d.mean()) for s, d in diff.items()},
                            "quality": arm_q[arm], "flagged": flagged[arm]}  # fmt: skip
        params = sum(x.numel() for x in comp.unet.parameters())
        result["runs"][run] = {"run": runs[run], "params": params, "arms": per_arm, "skipped": skipped[run],
                               "eager_other_seeds": noise_q, "noise": noise, "best_runtime": best_arm(ips[run], q, flagged)}  # fmt: skip

    best = result["runs"]["searched"]["best_runtime"]
    c, pl = pipes["searched"][best]
    extra = [s for s in ints(a.match_steps) if s != q]
    cand_q = {q: result["runs"]["searched"]["arms"][best]["quality"]} | (
        quality(c, pl, extra, eval_set, evaluator, f"searched {best}") if extra else {}
    )
    c, pl = pipes["baseline"][EAGER]
    base_q = {q: result["runs"]["baseline"]["arms"][EAGER]["quality"]}
    base_q[a.match_target] = quality(c, pl, [a.match_target], eval_set, evaluator, "baseline eager fp32")[
        a.match_target
    ]
    result["combined"] = {"candidate_runtime": best, "candidate_quality": cand_q, "baseline_quality": base_q,
                          **combined(cand_q, base_q, a.match_target, ips["searched"][best], ips["baseline"][EAGER][a.match_target])}  # fmt: skip
    bb = result["runs"]["baseline"]["best_runtime"]
    result["per_step_lead"] = {
        s: {"eager": ips["searched"][EAGER][s] / ips["baseline"][EAGER][s],
            "best_runtimes": ips["searched"][best][s] / ips["baseline"][bb][s],
            "same_runtime": {arm: ips["searched"][arm][s] / ips["baseline"][arm][s] for arm in ips["baseline"] if arm in ips["searched"]}}
        for s in ints(a.steps)
    }  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    (out / "quality.md").write_text("\n".join(report(result, a)) + "\n")
    print("\n".join(report(result, a)))
    print(f"wrote {out / 'quality.json'} and {out / 'quality.md'} ({result['seconds']} s)")


def report(r: dict, a) -> list[str]:
    """The markdown tables of quality.md."""
    steps, q, m = ints(a.steps), a.quality_steps, a.match_target
    lines = [f"CPU, {r['threads']} torch thread(s) (OMP_NUM_THREADS={r['omp_num_threads']}), torch {r['torch']}; "
             f"speed: {a.rounds} interleaved rounds x {a.images} images per arm; quality: {a.prompts} prompts at {q} steps, "
             f"noise = largest change of eager fp32 over {a.noise_seeds} other sampling seed(s).", "",
             "| run | runtime | " + " | ".join(f"img/s @{s}" for s in steps) + " | " + " | ".join(f"vs eager @{s}" for s in steps)
             + " | " + " | ".join(f"max px diff @{s}" for s in steps) + f" | align @{q} | FD @{q} | flag |",
             "|---|---|" + "---:|" * (3 * len(steps) + 2) + "---|"]  # fmt: skip
    for run, info in r["runs"].items():
        for arm, v in info["arms"].items():
            cells = [f"{v['images_per_s'][s]:.2f}" for s in steps] + [
                f"{v['vs_eager'][s]:.2f}x" for s in steps
            ]
            cells += [str(v["max_pixel_diff"][s]) for s in steps]
            cells += [f"{v['quality']['alignment']:.3f}", f"{v['quality']['frechet_distance']:.0f}",
                      "**beyond noise: " + ", ".join(v["flagged"]) + "**" if v["flagged"] else "ok"]  # fmt: skip
            lines.append(f"| {run} | {arm} | " + " | ".join(cells) + " |")
        for arm, why in info["skipped"].items():
            lines.append(f"| {run} | {arm} | skipped: {why} |")
    lines.append("")
    for run, info in r["runs"].items():
        n = info["noise"]
        lines.append(f"- {run} ({info['run']}, {info['params'] / 1e6:.2f}M params): eager seed-to-seed noise "
                     f"alignment {n['alignment']:.3f}, FD {n['frechet_distance']:.0f}; best runtime {info['best_runtime']}")  # fmt: skip
    for s, v in r["per_step_lead"].items():
        lines.append(f"- searched / baseline images/s at {s} steps: eager {v['eager']:.2f}x, best runtimes {v['best_runtimes']:.2f}x ("
                     + ", ".join(f"{k} {x:.2f}x" for k, x in v["same_runtime"].items()) + ")")  # fmt: skip
    c = r["combined"]
    lines += ["", f"Combined: searched on {c['candidate_runtime']} vs baseline at {m} steps in eager fp32 "
              f"(baseline alignment {c['baseline_quality'][m]['alignment']:.3f}, FD {c['baseline_quality'][m]['frechet_distance']:.0f}):", "",
              "| searched steps | " + " | ".join(str(s) for s in sorted(c["candidate_quality"])) + " |",
              "|---|" + "---:|" * len(c["candidate_quality"]),
              "| alignment | " + " | ".join(f"{c['candidate_quality'][s]['alignment']:.3f}" for s in sorted(c["candidate_quality"])) + " |",
              "| FD | " + " | ".join(f"{c['candidate_quality'][s]['frechet_distance']:.0f}" for s in sorted(c["candidate_quality"])) + " |", "",
              f"- matched on alignment at **{_fmt(c[f'steps_to_match_baseline_{m}'], 'd')}** steps: **{_fmt(c['combined_speedup'], '.2f')}x** images/s at equal alignment",
              f"- matched on Frechet distance at {_fmt(c[f'steps_to_match_baseline_{m}_fd'], 'd')} steps: {_fmt(c['combined_speedup_fd'], '.2f')}x"]  # fmt: skip
    if c["fewest_steps_evaluated"] in (
        c[f"steps_to_match_baseline_{m}"],
        c[f"steps_to_match_baseline_{m}_fd"],
    ):
        lines.append(f"- a match at {c['fewest_steps_evaluated']} steps, the fewest evaluated, bounds the steps "
                     "from above (and the ratio from below)")  # fmt: skip
    lower = min(c["baseline_quality"])
    lines.append(f"- the baseline's own gain from {lower} to {m} steps: alignment {c['baseline_alignment_gain']:+.3f}, "
                 f"Frechet distance {-c['baseline_fd_gain']:+.0f} (no gain: a match says the searched U-Net is better "
                 "overall, not that it needs fewer steps)")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
