"""Does search beat hand design? (issue #30) Step 2 of 4: the searched fronts against the hand designs.

    # 1. the hand designs: search_spaces/archs/quickstart_bksdm_{base,small,tiny}.yaml (in the space,
    #    enqueued as baselines below) and quickstart_decidiffusion.yaml (outside it: interleaved
    #    attention, half-resolution mid block); teacher: an 8,000-step `nas train tiny` of
    #    archs/quickstart_baseline.yaml (results/inherit_distill_long, README)
    # 2. three GP searches with the inherit + distill proxy from that teacher, latency from the frozen
    #    CPU table of results/search_validity:
    for s in 0 1 2; do nas search results/hand_vs_search/space.yaml --study gp-s$s --sampler gp --seed $s \
        --trials 30 --cache CACHE --teacher TEACHER --results results/hand_vs_search/studies; done
    python experiments/studies/hand_vs_search.py picks --out results/hand_vs_search

`picks` reads the studies and writes OUT/picks.{json,md} and OUT/fronts.png: per study the proxy loss
and table latency of every hand design (its enqueued trial) and, at each hand design's latency, the
searched point with the lowest proxy loss at or under it (the architecture file goes to
OUT/archs/). Steps 3 (identical final training, 3 seeds) and 4 (eval at 10/20/30/50 steps, one
interleaved timing, the answer) take these picks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HAND = ["quickstart_baseline", "quickstart_bksdm_base", "quickstart_bksdm_small", "quickstart_bksdm_tiny"]


def study_rows(results: Path, study: str) -> list[dict]:
    """Completed trials: number, baseline name (if enqueued), proxy loss, latency, params, arch."""
    from optuna.trial import TrialState

    from nas.search.study import load_study

    rows = []
    for t in load_study(study, results=str(results)).get_trials(deepcopy=False):
        a = t.user_attrs
        if t.state != TrialState.COMPLETE or "proxy_loss" not in a:
            continue
        rows.append({"trial": t.number, "baseline": a.get("baseline"), "proxy_loss": a["proxy_loss"],
                     "latency_ms": a["latency_ms_p50"], "params": a["params"], "macs": a["macs"],
                     "arch": a["arch"]})  # fmt: skip
    return rows


def picks(rows: list[dict]) -> list[dict]:
    """Per hand design: its own row, and the best searched (non-baseline) point at or under its latency."""
    searched = [r for r in rows if r["baseline"] is None]
    out = []
    for hand in (r for r in rows if r["baseline"] in HAND):
        under = [r for r in searched if r["latency_ms"] <= hand["latency_ms"]]
        best = min(under, key=lambda r: r["proxy_loss"]) if under else None
        out.append({"hand": hand, "searched": best,
                    "proxy_gain": None if best is None else hand["proxy_loss"] - best["proxy_loss"]})  # fmt: skip
    return out


def plot(studies: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, (name, rows) in enumerate(studies.items()):
        searched = [r for r in rows if r["baseline"] is None]
        ax.scatter([r["latency_ms"] for r in searched], [r["proxy_loss"] for r in searched], s=12,
                   alpha=0.6, color=f"C{i}", label=f"{name}: searched")  # fmt: skip
    markers = dict(zip(HAND, "s^vD", strict=True))
    first = next(iter(studies.values()))
    for hand in (r for r in first if r["baseline"] in HAND):
        ax.scatter([hand["latency_ms"]], [hand["proxy_loss"]], marker=markers[hand["baseline"]], s=70,
                   color="black", label=hand["baseline"].replace("quickstart_", ""))  # fmt: skip
    ax.set_xlabel("latency, ms (CPU table, batch 2)")
    ax.set_ylabel("proxy loss (60 inherit + distill steps)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("hand designs (black) among searched points")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["picks"])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "hand_vs_search")
    parser.add_argument("--studies", nargs="+", default=["gp-s0", "gp-s1", "gp-s2"])
    args = parser.parse_args(argv)
    import yaml

    results = args.out / "studies"
    studies = {s: study_rows(results, s) for s in args.studies}
    table = ["| study | hand design | its latency (ms) | its proxy loss | best searched at <= that latency | its latency | its proxy loss | proxy gain |",
             "|---|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    result = {}
    (args.out / "archs").mkdir(parents=True, exist_ok=True)
    for name, rows in studies.items():
        result[name] = picks(rows)
        for p in result[name]:
            h, s = p["hand"], p["searched"]
            if s is not None:
                (args.out / "archs" / f"{name}-t{s['trial']}.yaml").write_text(
                    yaml.safe_dump(s["arch"], sort_keys=False)
                )
            found = "-" if s is None else f"trial {s['trial']} ({s['params'] / 1e6:.2f}M)"
            table.append(
                f"| {name} | {h['baseline']} | {h['latency_ms']:.2f} | {h['proxy_loss']:.5f} | {found} | "
                + ("- | - | - |" if s is None else f"{s['latency_ms']:.2f} | {s['proxy_loss']:.5f} | {p['proxy_gain']:+.5f} |")
            )  # fmt: skip
    (args.out / "picks.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "picks.md").write_text("\n".join(table) + "\n")
    plot(studies, args.out / "fronts.png")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
