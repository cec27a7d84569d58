"""Does the deployed runtime change which U-Net is faster? Latency of many architectures behind each
runtime (nas/deploy/runtimes.py), all measured in one process, and the rank correlation with eager.

Two uses:
  * a space: --count random architectures (seeded) of SPACE; per runtime x precision, Spearman rho
    and Kendall tau of its latency ranking against eager fp32's. If they differ, a search must
    measure (or tabulate) the runtime it deploys on, not eager PyTorch.
  * named architectures (--archs A.yaml B.yaml ...): each one's latency per runtime and its ratio to
    the first one's (e.g. the SD-layout baseline first, then the searched U-Net: does the searched
    U-Net's lead survive optimization?).

Per architecture, every arm (runtime x precision) wraps its own copy of the same weights; after a
warm-up the arms take turns in --rounds rounds of --iters timed forwards (round-robin, so drifting
load on a shared host hits all alike); an arm's figure is the median of its forwards. Batch 2: one
image with classifier-free guidance. One torch thread (ONNX Runtime and OpenVINO are given one too).

    python experiments/benchmarks/runtime_ranking.py --space search_spaces/quickstart.yaml --count 20 \\
        --out results/inference/ranking_quickstart.json
    python experiments/benchmarks/runtime_ranking.py --archs search_spaces/archs/sd15_small.yaml \\
        results/decidiffusion_small/arch.yaml --out results/inference/pair_decidiffusion_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Hashable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: spinning OpenMP threads cost 10x
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from bench_runtimes import (  # experiments/benchmarks/ is sys.path[0]
    time_arms,
    time_models,
    with_guidance,
    wrap_arms,
)
from scipy.stats import kendalltau, spearmanr
from tqdm.auto import tqdm

from nas.cost.measure import arch_cost, example_inputs
from nas.space import RandomChoices, load_arch, load_space, sample_arch

# (runtime, precision) arms; eager fp32 first: the reference. bf16 is left out on CPUs without
# native bf16 matmuls, where it measures emulation. `--compile` adds torch.compile (inductor; its
# first call compiles for about a minute per U-Net, in the untimed warm-up).
ARMS = [("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32")]
COMPILE = ("compile", "fp32")


def measure(arch, arms, rounds: int, iters: int, warmup: int) -> dict[str, float]:
    """Median forward milliseconds per arm for one architecture (batch 2, CPU)."""
    times = time_arms(arch, arms, "cpu", 2, warmup, rounds, iters)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", help="search-space YAML: rank --count random architectures")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archs", nargs="+", help="architecture YAMLs (the first is the reference)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (fp32) to the arms")
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args()
    all_arms = ARMS[:1] + [COMPILE] * args.compile + ARMS[1:]
    if bool(args.space) == bool(args.archs):
        parser.error("give --space or --archs")
    torch.set_num_threads(1)
    if args.space:
        space = load_space(args.space)
        chooser = RandomChoices(args.seed)
        archs = [sample_arch(space, chooser, name=f"{space.name}-r{i}") for i in range(args.count)]
    else:
        archs = [load_arch(a) for a in args.archs]
    rows = []
    started = time.perf_counter()
    if args.space:
        for arch in tqdm(archs, desc="architectures"):
            ms = measure(arch, all_arms, args.rounds, args.iters, args.warmup)
            cost = arch_cost(arch)
            rows.append({"arch": arch.name, "params": cost["params"], "macs": cost["macs"], "median_ms": ms})
    else:  # a few named architectures: all of them x all arms in one round-robin, so their ratio is fair
        entries: dict[Hashable, tuple] = {}
        for i, arch in enumerate(archs):
            inputs = example_inputs(arch, 2)
            for arm, model in with_guidance(wrap_arms(arch, all_arms), arch, 2).items():
                entries[i, arm] = (model, inputs)
        times = time_models(entries, "cpu", args.warmup, args.rounds, args.iters)
        for i, arch in enumerate(archs):
            cost = arch_cost(arch)
            ms = {
                str(key[1]): statistics.median(t)
                for key, t in times.items()
                if isinstance(key, tuple) and key[0] == i
            }
            rows.append({"arch": arch.name, "params": cost["params"], "macs": cost["macs"], "median_ms": ms})
    arms = [f"{r} {p}" for r, p in all_arms if all(f"{r} {p}" in row["median_ms"] for row in rows)]
    summary: dict = {"torch": torch.__version__, "threads": 1, "batch": 2, "rounds": args.rounds,
                     "interleaved": "architectures and arms" if args.archs else "arms, per architecture",
                     "iters": args.iters, "seconds": time.perf_counter() - started, "rows": rows}  # fmt: skip
    eager = [row["median_ms"]["eager fp32"] for row in rows]
    lines = []
    if args.space:
        summary.update(space=args.space, count=args.count, seed=args.seed, vs_eager={})
        lines.append(f"{args.count} architectures of {args.space}: latency ranking vs eager fp32")
        lines.append("| runtime | Spearman rho | Kendall tau | median speed-up over eager |")
        lines.append("|---|---:|---:|---:|")
        for arm in arms[1:]:
            other = [row["median_ms"][arm] for row in rows]
            rho, tau = float(spearmanr(eager, other)[0]), float(kendalltau(eager, other)[0])
            speedup = statistics.median(e / o for e, o in zip(eager, other))
            summary["vs_eager"][arm] = {"spearman_rho": rho, "kendall_tau": tau, "median_speedup": speedup}
            lines.append(f"| {arm} | {rho:.3f} | {tau:.3f} | {speedup:.2f}x |")
        macs = [-row["macs"] for row in rows]
        summary["macs_vs_eager_rho"] = float(spearmanr([-m for m in macs], eager)[0])
        lines.append(f"(MACs vs eager latency: Spearman rho {summary['macs_vs_eager_rho']:.3f})")
    else:
        lines.append("| architecture | " + " | ".join(arms) + " |")
        lines.append("|---|" + "---:|" * len(arms))
        ref = rows[0]["median_ms"]
        for row in rows:
            cells = [f"{row['median_ms'][a]:.1f} ms ({ref[a] / row['median_ms'][a]:.2f}x)" for a in arms]
            lines.append(f"| {row['arch']} | " + " | ".join(cells) + " |")
        lines.append("(x: the first architecture's latency over this one's, same runtime)")
        best = {row["arch"]: min(row["median_ms"][a] for a in arms) for row in rows}
        summary["best_runtime_speedup_over_eager"] = {
            row["arch"]: row["median_ms"]["eager fp32"] / best[row["arch"]] for row in rows
        }
    summary["table"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
