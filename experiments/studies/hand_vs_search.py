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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inherit_distill.py: _train, _eval

HAND = ["quickstart_baseline", "quickstart_bksdm_base", "quickstart_bksdm_small", "quickstart_bksdm_tiny"]
# step 3: the hand designs trained and compared (the teacher's own layout is the teacher, not a design)
FINAL_HAND = [*HAND[1:], "quickstart_decidiffusion"]


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


# ---- steps 3-4: identical final training, eval, one interleaved timing, the answer ---------------


def finalists(out: Path) -> dict[str, dict]:
    """name -> {arch file, kind, picked_for}: the trained hand designs, then every searched pick of
    picks.json for one of them, deduplicated by architecture (the same layout found by several seeds
    is trained once, named by its first file)."""
    found: dict[str, dict] = {}
    for hand in FINAL_HAND:
        found[hand] = {"arch": str(ROOT / "search_spaces" / "archs" / f"{hand}.yaml"), "kind": "hand",
                       "picked_for": []}  # fmt: skip
    by_layout: dict[str, str] = {}
    for study, entries in json.loads((out / "picks.json").read_text()).items():
        for p in entries:
            s, hand = p["searched"], p["hand"]["baseline"]
            if s is None or hand not in FINAL_HAND:
                continue
            layout = json.dumps({k: v for k, v in s["arch"].items() if k != "name"}, sort_keys=True)
            name = by_layout.setdefault(layout, f"{study}-t{s['trial']}")
            entry = found.setdefault(name, {"arch": str(out / "archs" / f"{name}.yaml"), "kind": "searched",
                                            "picked_for": []})  # fmt: skip
            entry["picked_for"].append({"study": study, "hand": hand, "trial": s["trial"]})
            entry.update(proxy_loss=s["proxy_loss"], table_ms=s["latency_ms"])
            hand_entry = found[hand]
            hand_entry.setdefault("proxy_losses", []).append(p["hand"]["proxy_loss"])
            hand_entry["table_ms"] = p["hand"]["latency_ms"]
    for entry in found.values():  # a hand design's proxy: the mean over the studies that enqueued it
        losses = entry.pop("proxy_losses", None)
        if losses:
            entry["proxy_loss"] = sum(losses) / len(losses)
    return found


def units(out: Path, seeds: list[int]) -> list[tuple[str, int]]:
    """(finalist, seed), seed-major: after each seed every design has a run (a partial sweep compares)."""
    names = list(finalists(out))
    return [(name, seed) for seed in seeds for name in names]


def train_and_eval(args) -> None:
    """This worker's share of the units: `nas train` (inherit + BK-SDM distill from the teacher, the
    same steps, warm-up and seed for all), then `nas eval` at every sampling step count. A unit whose
    folders are complete is skipped; an interrupted training resumes (inherit_distill._train)."""
    from inherit_distill import _eval, _train

    found = finalists(args.out)
    mine = units(args.out, args.seeds)[args.worker :: args.workers]
    for i, (name, seed) in enumerate(mine):
        run = args.out / args.runs / f"{name}-s{seed}"
        unit = argparse.Namespace(arch=found[name]["arch"], cache=args.cache, teacher=args.teacher,
                                  evaluator=args.evaluator, n=args.n)  # fmt: skip
        _train(unit, run, args.steps, distill=True, seed=seed)
        if args.no_eval:
            continue
        result = _eval(unit, run, args.sample_steps)["results"]
        at = {r["steps"]: r["alignment"] for r in result}
        print(f"worker {args.worker}: {i + 1}/{len(mine)} {name} seed {seed}: alignment {at}", flush=True)
    if (
        args.worker == 0 and not args.no_eval
    ):  # the teacher, as a reference point (8,000 steps: not the same training)
        _eval(argparse.Namespace(evaluator=args.evaluator, n=args.n), Path(args.teacher), args.sample_steps)


def speed(args) -> None:
    """U-Net forward of every finalist and the teacher, batch 2, one thread, interleaved rounds (drift
    on a shared host hits all alike): the latency of the answer (the table's was the search's)."""
    import torch

    from nas.cost.measure import measure_latency
    from nas.space import build_unet, load_arch
    from nas.teacher.arch import load_teacher

    torch.set_num_threads(1)
    nets = {"teacher": load_teacher(args.teacher)}
    for name, f in finalists(args.out).items():
        arch = load_arch(f["arch"])
        nets[name] = (build_unet(arch).eval(), arch)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for r in range(args.rounds):
        for name, (net, arch) in nets.items():
            times[name].append(measure_latency(net, arch, batch=2, warmup=2, iters=10).latency_ms_p50)
        print(f"speed: round {r + 1}/{args.rounds}", flush=True)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    speed_file = {"batch": 2, "threads": 1, "rounds": args.rounds, "median_ms": median, "all_ms": times}
    (args.out / "speed.json").write_text(json.dumps(speed_file, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["picks", "train", "speed", "gap", "report"])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "hand_vs_search")
    parser.add_argument("--studies", nargs="+", default=["gp-s0", "gp-s1", "gp-s2"])
    parser.add_argument("--cache", default="results/quickstart/precompute/cache")
    parser.add_argument("--teacher", default="results/few_step/runs/teacher", help="`nas train` run folder")
    parser.add_argument("--evaluator", default="results/quickstart/data/evaluator")
    parser.add_argument("--steps", type=int, default=1000, help="train: optimizer steps, the same for all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train: training seeds")
    parser.add_argument("--worker", type=int, default=0, help="train: this worker's index")
    parser.add_argument("--workers", type=int, default=1, help="train: workers sharing the units")
    parser.add_argument("--n", type=int, default=100, help="train: images per evaluation")
    parser.add_argument("--sample-steps", type=int, nargs="+", default=[10, 20, 30, 50])
    parser.add_argument("--rounds", type=int, default=7, help="speed: interleaved rounds")
    parser.add_argument("--runs", default="runs", help="train, gap: the runs' folder under --out")
    parser.add_argument(
        "--no-eval", action="store_true", help="train: no `nas eval` (proxy-length runs for gap)"
    )
    args = parser.parse_args(argv)
    if args.mode == "train":
        train_and_eval(args)
        return 0
    if args.mode == "speed":
        speed(args)
        return 0
    if args.mode in ("gap", "report"):
        from hand_vs_search_report import report, text_gap

        (text_gap if args.mode == "gap" else report)(args)
        return 0
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
