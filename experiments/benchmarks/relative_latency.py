"""Latency that holds on a shared CPU (issue #32): the same architectures timed in several short
studies, each a fresh process beside busy loops, two ways in the same process and the same minutes:

- alone (`latency: {reference: none}`, every search before issue #32): the median of the space's
  timed forwards, whatever the load of the moment;
- beside the baseline (`reference: baseline`, the default now): candidate and the space's first
  baseline alternate forward by forward; latency = median per-round ratio x a reference time, with
  the reference either the space's `reference_ms` (here: the baseline timed alone before any busy
  loop starts) or, without it, the baseline's time in the process's first pair (the study's own).

Each study runs `measure_cost` (what every trial of `nas search` runs) on the baseline, then on
`--count` architectures drawn with a fixed seed: the same ones in every study. While a study runs,
`--loops` busy processes (`python -c 'while True: pass'`) spin, and one more is started and stopped
every `--toggle` seconds, so the load also changes within a study; the script starts and stops them.
Prints, per architecture, the spread across the studies (max/min, coefficient of variation, worst
deviation from the median) of each figure, and writes OUT/relative_latency.json and OUT/README.md.

    .venv/bin/python experiments/benchmarks/relative_latency.py --out results/relative_latency
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Before torch loads OpenMP (the workers inherit it): with spinning OpenMP threads, 2 torch threads
# beside one busy loop on 2 cores did not finish 72 quickstart forwards in 120 s (measured while
# writing this script); with passive ones each took 30-230 ms. `nas data`, `vae` and `precompute` set it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BUSY = "while True: pass"
TOLERANCE = 0.15  # the goal: each study's figure within +-15% of the median over the studies


def spread(values: list[float]) -> dict[str, float]:
    """max/min, coefficient of variation (population stdev / mean) and the largest |x/median - 1|."""
    median = statistics.median(values)
    return {
        "max_over_min": max(values) / min(values),
        "cv": statistics.pstdev(values) / statistics.mean(values),
        "worst_vs_median": max(abs(v / median - 1) for v in values),
    }


# --- worker: one study, in its own process -------------------------------------------------------


def worker(args) -> None:
    from nas.search.objective import measure_cost, resolve_baselines
    from nas.space import RandomChoices, load_arch, load_space, sample_arch

    space = resolve_baselines(load_space(args.space), args.space)
    if args.iters is not None:  # rounds (relative) and timed forwards (alone) instead of the space's
        space = space.model_copy(update={"latency": space.latency.model_copy(update={"iters": args.iters})})
    alone = space.model_copy(update={"latency": space.latency.model_copy(update={"reference": "none"})})
    fixed = space.model_copy(
        update={"latency": space.latency.model_copy(update={"reference_ms": args.reference_ms})}
    )
    chooser = RandomChoices(seed=args.seed)
    archs = [load_arch(space.baselines[0])] + [sample_arch(space, chooser) for _ in range(args.count)]
    rows, first_baseline_ms = [], None
    for i, arch in enumerate(archs):
        order = [("alone", alone), ("relative", fixed)]
        for mode, sp in order if i % 2 == 0 else order[::-1]:  # neither always first
            cost = measure_cost(sp, arch)
            if mode == "alone":
                alone_ms, alone_busy = cost["latency_ms_p50"], cost["other_cores_busy"]
            else:
                rel = cost
        if first_baseline_ms is None:  # the default reference: the baseline's time in the first pair
            first_baseline_ms = rel["latency_baseline_ms_p50"]
        rows.append(
            {
                "arch": arch.name,
                "params": rel["params"],
                "alone_ms": alone_ms,
                "alone_cores_busy": alone_busy,
                "ratio": rel["latency_ratio_rounds"],
                "relative_fixed_ms": rel["latency_ms_p50"],  # ratio x reference_ms (the code path)
                "relative_study_ms": rel["latency_ratio_rounds"] * first_baseline_ms,
                "raw_in_pair_ms": rel["latency_measured_ms_p50"],
                "baseline_in_pair_ms": rel["latency_baseline_ms_p50"],
                "pair_cores_busy": rel["other_cores_busy"],
            }
        )
        print(
            f"  {arch.name[:40]:40s} alone {alone_ms:8.2f} ms  ratio {rel['latency_ratio_rounds']:.3f}  "
            f"busy {rel['other_cores_busy']:.1f}",
            file=sys.stderr,
            flush=True,
        )
    json.dump({"rows": rows, "reference_ms_study": first_baseline_ms}, sys.stdout)


# --- parent: quiet reference, then the studies beside busy loops ---------------------------------


class Loops:
    """`n` busy processes, plus one started and stopped every `toggle` seconds (0: none)."""

    def __init__(self, n: int, toggle: float):
        self.n, self.toggle = n, toggle
        self.procs: list[subprocess.Popen] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._toggle, daemon=True)

    def _spin(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", BUSY])

    def _toggle(self) -> None:
        extra = None
        while not self.stop.wait(self.toggle):
            if extra is None:
                extra = self._spin()
            else:
                extra.kill()
                extra.wait()
                extra = None
        if extra is not None:
            extra.kill()
            extra.wait()

    def __enter__(self) -> Loops:
        self.procs = [self._spin() for _ in range(self.n)]
        if self.toggle > 0:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.toggle > 0:
            self.thread.join()
        for p in self.procs:  # only the processes this script started, by their handles
            p.kill()
            p.wait()


def quiet_reference(space_path: str) -> dict:
    """The baseline timed alone (the space's latency setup, 15 forwards) before any busy loop."""
    import warnings

    from nas.cost.measure import LoadWarning, measure_setup
    from nas.search.objective import resolve_baselines
    from nas.space import build_unet, load_arch, load_space

    space = resolve_baselines(load_space(space_path), space_path)
    arch = load_arch(space.baselines[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)  # recorded below instead
        lat = measure_setup(build_unet(arch), arch, space.latency, iters=15)
    return {"arch": arch.name, "ms": lat.latency_ms_p50, "other_cores_busy": lat.other_cores_busy}


def summarize(studies: list[dict]) -> dict:
    names = [r["arch"] for r in studies[0]["rows"]]
    per_arch = {}
    for i, name in enumerate(names):
        rows = [s["rows"][i] for s in studies]
        assert all(r["arch"] == name for r in rows), "the studies drew different architectures"
        per_arch[name] = {
            key: {"values": [r[key] for r in rows], **spread([r[key] for r in rows])}
            for key in ("alone_ms", "ratio", "relative_fixed_ms", "relative_study_ms")
        }
    overall = {
        key: {
            "median_max_over_min": statistics.median(a[key]["max_over_min"] for a in per_arch.values()),
            "worst_max_over_min": max(a[key]["max_over_min"] for a in per_arch.values()),
            "median_cv": statistics.median(a[key]["cv"] for a in per_arch.values()),
            "worst_vs_median": max(a[key]["worst_vs_median"] for a in per_arch.values()),
            "archs_within_tolerance": sum(a[key]["worst_vs_median"] <= TOLERANCE for a in per_arch.values()),
        }
        for key in ("alone_ms", "ratio", "relative_fixed_ms", "relative_study_ms")
    }
    return {"per_arch": per_arch, "overall": overall}


LABELS = {
    "alone_ms": "alone (reference: none; before)",
    "relative_fixed_ms": "beside the baseline, x reference_ms",
    "relative_study_ms": "beside the baseline, x the study's own reference",
    "ratio": "the ratio to the baseline itself",
}


def table(summary: dict, archs: int) -> list[str]:
    lines = [
        "| latency figure | median max/min | worst max/min | median CV | worst deviation from median | archs within +-15% |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in LABELS.items():
        o = summary["overall"][key]
        lines.append(
            f"| {label} | {o['median_max_over_min']:.2f} | {o['worst_max_over_min']:.2f} | {o['median_cv']:.1%} |"
            f" {o['worst_vs_median']:.1%} | {o['archs_within_tolerance']} of {archs} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="search_spaces/quickstart.yaml")
    p.add_argument("--count", type=int, default=4, help="architectures drawn besides the baseline")
    p.add_argument("--seed", type=int, default=0, help="of the draw: the same architectures in every study")
    p.add_argument(
        "--loops", default="1,2,1,2", help="busy processes kept spinning in each study (one per study)"
    )
    p.add_argument(
        "--toggle", type=float, default=2.0, help="seconds between starting and stopping one more (0: off)"
    )
    p.add_argument(
        "--out", default=None, help="folder for relative_latency.json and README.md (default: print only)"
    )
    p.add_argument(
        "--iters", type=int, default=None, help="latency.iters for the studies (default: the space's)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference-ms", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    loops = [int(n) for n in args.loops.split(",")]
    started = time.time()
    ref = quiet_reference(args.space)
    print(f"baseline {ref['arch']} alone, before any busy loop: {ref['ms']:.2f} ms "
          f"(other processes busy on {ref['other_cores_busy']:.1f} cores)", flush=True)  # fmt: skip
    studies = []
    for i, n in enumerate(loops):
        print(f"study {i + 1}/{len(loops)}: {n} busy loop(s) + 1 toggled every {args.toggle:g} s", flush=True)
        cmd = [sys.executable, __file__, "--worker", "--space", args.space, "--count", str(args.count),
               "--seed", str(args.seed), "--reference-ms", str(ref["ms"])]  # fmt: skip
        if args.iters is not None:
            cmd += ["--iters", str(args.iters)]
        t0 = time.time()
        with Loops(n, args.toggle):
            out = subprocess.run(
                cmd, check=True, capture_output=False, stdout=subprocess.PIPE, text=True
            ).stdout
        studies.append({"loops": n, "seconds": time.time() - t0, **json.loads(out)})
    summary = summarize(studies)
    lines = table(summary, args.count + 1)
    print("\n".join(lines))
    if args.out is None:
        return
    import torch

    from nas.core.runfolder import environment

    env = environment()
    result = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "wall_seconds": time.time() - started,
        "machine": {
            "cpu": env["cpu"],
            "cpu_cores": env["cpu_cores"],
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "settings": vars(args) | {"loops": loops},
        "quiet_reference": ref,
        "studies": studies,
        **summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relative_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "README.md").write_text(readme(result, lines))
    print(f"wrote {out / 'relative_latency.json'} and {out / 'README.md'}")


def readme(result: dict, lines: list[str]) -> str:
    m, s, ref = result["machine"], result["settings"], result["quiet_reference"]
    per_arch = [
        "| architecture | params | alone (ms), per study | ratio, per study | x reference_ms (ms) | x study's reference (ms) |",
        "|---|---:|---|---|---|---|",
    ]
    for i, (name, a) in enumerate(result["per_arch"].items()):

        def fmt(key: str, f: str, a: dict = a) -> str:
            return " / ".join(format(v, f) for v in a[key]["values"])

        params = result["studies"][0]["rows"][i]["params"]
        per_arch.append(
            f"| `{name}` | {params:,} | {fmt('alone_ms', '.1f')} | {fmt('ratio', '.3f')} |"
            f" {fmt('relative_fixed_ms', '.1f')} | {fmt('relative_study_ms', '.1f')} |"
        )
    return "\n".join(
        [
            "# Latency on a shared CPU: alone vs beside the baseline",
            "",
            "Written by `experiments/benchmarks/relative_latency.py` (what it does: its docstring;"
            " the method: [docs/cost.md](../../docs/cost.md#latency-on-a-shared-cpu-relative-to-the-baseline)).",
            "",
            f"Command: `{result['command']}`; {result['date']}, {result['wall_seconds']:.0f} s wall.",
            f"Machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch_threads']} threads,"
            f" OMP_WAIT_POLICY={m['omp_wait_policy']}, {m['platform']}; other engineers' jobs shared the machine too.",
            f"Space `{s['space']}`, latency.iters {s.get('iters') or 'as the space says'};"
            f" busy loops per study {s['loops']}, one more toggled every {s['toggle']:g} s;"
            f" the baseline `{ref['arch']}` alone before any loop: {ref['ms']:.2f} ms"
            f" (other processes busy on {ref['other_cores_busy']:.1f} cores), the `reference_ms` of the"
            " relative figures.",
            "",
            "Spread of the same architecture's latency across the studies (each row: the"
            f" {len(result['per_arch'])} architectures' spreads summarised):",
            "",
            *lines,
            "",
            "Per architecture (one value per study, in study order):",
            "",
            *per_arch,
            "",
            "`relative_latency.json` holds every figure (per study: the rows, the load measured during each"
            " timing, the study's own reference).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
