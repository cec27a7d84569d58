"""Proxy fidelity: how far to trust the search's short training.

Takes K architectures from a space, spread over its size range, trains each with the proxy budget
(the space's `proxy.steps`) and with a budget `--factor` times longer, and reports the rank
correlation (Kendall tau, Spearman rho) between the proxy score and the longer-trained score. The
baselines a proxy must beat (ZiCo 2023): #params and MACs, ranked against the same longer score
(negated: bigger is expected to be better), and the zero-cost proxies of nas/search/proxies.py.

    python experiments/studies/proxy_fidelity.py --space search_spaces/quickstart.yaml \
        --cache results/quickstart/precompute/cache --k 10 --factor 6 --out results/proxy_fidelity
    python experiments/studies/proxy_fidelity.py --from-rows   # report and plot again from rows.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr
from tqdm.auto import tqdm

from nas.core.config import dump_yaml
from nas.cost.measure import arch_cost
from nas.data.cache import open_cache
from nas.search.objective import proxy_config
from nas.search.proxies import PROXIES, zero_cost_score
from nas.space import RandomChoices, load_space, sample_arch
from nas.train.loop import proxy_train


def spread_archs(space, k: int, seed: int, pool: int = 400):
    """K distinct architectures at evenly spaced parameter-count quantiles of a random pool."""
    chooser = RandomChoices(seed)
    seen, archs = set(), []
    for i in range(pool):
        arch = sample_arch(space, chooser, name=f"{space.name}-p{i}")
        key = json.dumps(arch.to_data()["levels"]) + json.dumps(arch.to_data()["mid"])
        if key not in seen:
            seen.add(key)
            archs.append((arch_cost(arch)["params"], arch))
    archs.sort(key=lambda pair: pair[0])
    picks = [archs[round(i * (len(archs) - 1) / (k - 1))][1] for i in range(k)]
    return picks


def correlations(xs: list[float], ys: list[float]) -> dict[str, float]:
    tau, tau_p = kendalltau(xs, ys)
    rho, rho_p = spearmanr(xs, ys)
    return {
        "kendall_tau": float(tau),
        "kendall_p": float(tau_p),
        "spearman_rho": float(rho),
        "spearman_p": float(rho_p),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", default="search_spaces/quickstart.yaml")
    parser.add_argument("--cache", help="latent cache (`nas precompute`); required unless --from-rows")
    parser.add_argument("--k", type=int, default=8, help="architectures (>= 8)")
    parser.add_argument("--factor", type=int, default=5, help="long budget = factor x proxy steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/proxy_fidelity")
    parser.add_argument(
        "--from-rows", action="store_true", help="no training: rebuild the report and plot from OUT/rows.json"
    )
    args = parser.parse_args()
    if args.from_rows:
        out = Path(args.out)
        rows = json.loads((out / "rows.json").read_text())
        previous = json.loads((out / "fidelity.json").read_text())
        args.factor = previous["long_steps"] // previous["proxy_steps"]
        args.space, args.cache = previous["space"], previous["cache"]
        report(rows, args, out, previous["proxy_steps"], previous["wall_seconds"], previous["torch_threads"])
        return
    if not args.cache:
        parser.error("--cache is required (unless --from-rows)")

    space = load_space(args.space)
    cache = open_cache(args.cache)
    config = proxy_config(space, args.space)
    steps = space.proxy.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for arch in tqdm(spread_archs(space, args.k, args.seed), desc="architectures"):
        cost = arch_cost(arch)
        row = {"arch": arch.to_data(), "params": cost["params"], "macs": cost["macs"]}
        for name in PROXIES:
            row[f"zero_cost_{name}"] = zero_cost_score(
                name, arch, cache, config, batch_size=8, seed=space.proxy.seed
            )
        t0 = time.perf_counter()
        row["proxy_loss"] = proxy_train(arch, cache, steps, config=config, seed=space.proxy.seed, every=steps)
        row["proxy_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        long_config = config.model_copy(update={"warmup_steps": config.warmup_steps * args.factor})
        row["long_loss"] = proxy_train(
            arch,
            cache,
            steps * args.factor,
            config=long_config,
            seed=space.proxy.seed,
            every=steps * args.factor,
        )
        row["long_seconds"] = time.perf_counter() - t0
        rows.append(row)
        (out / "rows.json").write_text(json.dumps(rows, indent=2))
    report(rows, args, out, steps, time.perf_counter() - started, torch.get_num_threads())


def plot(rows: list[dict], steps: int, long_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = [r["long_loss"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, key, label in zip(
        axes,
        ("proxy_loss", "macs", "zero_cost_synflow"),
        (f"proxy validation loss ({steps} steps)", "MACs per forward", "zero-cost synflow score"),
    ):
        ax.scatter([r[key] for r in rows], long, color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation loss after {long_steps} steps")
        ax.grid(alpha=0.3)
        if key == "macs":
            ax.set_xscale("log")
    fig.suptitle("Does the short score rank architectures as longer training does? (lower loss = better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(rows: list[dict], args, out: Path, steps: int, wall_seconds: float, threads: int) -> None:
    long = [r["long_loss"] for r in rows]
    # Lower loss is better; for size and zero-cost scores, larger is expected to be better.
    result = {
        "space": args.space,
        "cache": args.cache,
        "k": len(rows),
        "proxy_steps": steps,
        "long_steps": steps * args.factor,
        "torch_threads": threads,
        "wall_seconds": wall_seconds,
        "proxy_loss_vs_long": correlations([r["proxy_loss"] for r in rows], long),
        "neg_params_vs_long": correlations([-r["params"] for r in rows], long),
        "neg_macs_vs_long": correlations([-r["macs"] for r in rows], long),
    }
    for name in PROXIES:
        result[f"neg_zero_cost_{name}_vs_long"] = correlations([-r[f"zero_cost_{name}"] for r in rows], long)
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Proxy fidelity",
        "",
        f"{len(rows)} architectures of `{args.space}`, proxy {steps} steps vs {steps * args.factor} steps; "
        f"{result['wall_seconds'] / 60:.1f} min. Rank correlation with the longer-trained validation loss "
        "(1 = same order):",
        "",
        "| score | Kendall tau | Spearman rho |",
        "|---|---:|---:|",
    ]
    for key, label in [("proxy_loss_vs_long", f"proxy loss ({steps} steps)"), ("neg_params_vs_long", "#params (baseline)"),
                       ("neg_macs_vs_long", "MACs (baseline)")] + [
        (f"neg_zero_cost_{n}_vs_long", f"zero-cost {n}") for n in PROXIES
    ]:  # fmt: skip
        c = result[key]
        lines.append(f"| {label} | {c['kendall_tau']:.3f} | {c['spearman_rho']:.3f} |")
    lines += ["", "| params | MACs | proxy loss | long loss |", "|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["long_loss"]):
        lines.append(
            f"| {r['params']:,} | {r['macs'] / 1e6:.1f}M | {r['proxy_loss']:.4f} | {r['long_loss']:.4f} |"
        )
    (out / "README.md").write_text("\n".join(lines) + "\n")
    for i, row in enumerate(rows):
        dump_yaml(row["arch"], out / "archs" / f"arch{i}.yaml")
    plot(rows, steps, steps * args.factor, out / "fidelity.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
