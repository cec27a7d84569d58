"""Does search beat hand design? (issue #30) Step 4: the answer, from the runs of
`hand_vs_search.py train` and the timing of `hand_vs_search.py speed`.

Writes OUT/final.json, OUT/final.md (the tables) and OUT/answer.png (quality against latency, hand
designs against searched points, min-max over training seeds). The verdict at each hand design's
latency: a searched pick beats it when its worst training seed is better than the hand design's best,
loses when its best is worse than the hand design's worst, and ties otherwise (alignment at
`--metric-steps` sampling steps; the Frechet distance is reported beside it).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from hand_vs_search import ROOT, finalists


def _eval_results(run: Path, steps: list[int]) -> dict[int, dict] | None:
    path = run / ("eval-" + "-".join(map(str, steps))) / "eval.json"
    if not path.exists():
        return None
    return {r["steps"]: r for r in json.loads(path.read_text())["results"]}


def _metrics(run: Path) -> dict:
    """Median step time, teacher share, and validation loss by step, from the run's metrics.csv."""
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows if r.get("step_s")]
    return {
        "step_s": statistics.median(float(r["step_s"]) for r in timed),
        "teacher_s": statistics.median(float(r["teacher_s"] or 0) for r in timed),
        "val_loss": {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")},
    }


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}


def _cross_attention_layers(arch) -> int:
    """Transformer layers over the whole U-Net (each has a cross-attention to the text): with none, the
    image cannot depend on the prompt."""
    data = arch.to_data()
    levels = sum(lv.get("attentions", 0) + lv.get("up_attentions", 0) for lv in data["levels"])
    mid = data.get("mid") or {}
    return levels + (mid.get("attentions", 0) if isinstance(mid, dict) else 0)


def proxy_agreement(data: dict, steps: int) -> dict | None:
    """Spearman rho between the search's proxy loss and the final alignment (mean over training seeds)
    over the finalists that have both: how well the 60-step proxy ranked what final training found."""
    from scipy.stats import spearmanr

    pairs = [(e["proxy_loss"], e["quality"][steps]["alignment"]["mean"]) for e in data["finalists"].values()
             if e.get("proxy_loss") is not None and steps in e["quality"]]  # fmt: skip
    if len(pairs) < 3:
        return None
    rho = float(spearmanr([-x for x, _ in pairs], [y for _, y in pairs])[0])  # lower loss = better
    return {"spearman_rho": rho, "n": len(pairs)}


def collect(args) -> dict:
    """Per finalist: params, MACs, interleaved latency, and per sampling step count the alignment and
    Frechet distance over its training seeds (only seeds whose run and evaluation are complete)."""
    from nas.cost.measure import arch_cost
    from nas.space import load_arch

    speed = json.loads((args.out / "speed.json").read_text()) if (args.out / "speed.json").exists() else None
    table: dict[str, dict] = {}
    for name, f in finalists(args.out).items():
        arch = load_arch(f["arch"])
        cost = arch_cost(arch)
        entry = {**f, "params": cost["params"], "macs": cost["macs"], "seeds": [],
                 "cross_attention_layers": _cross_attention_layers(arch),
                 "latency_ms": speed["median_ms"].get(name) if speed else None}  # fmt: skip
        per_steps: dict[int, dict[str, list[float]]] = {}
        val_at: dict[int, list[float]] = {}
        for seed in args.seeds:
            run = args.out / "runs" / f"{name}-s{seed}"
            results = _eval_results(run, args.sample_steps)
            if results is None:
                continue
            m = _metrics(run)
            entry["seeds"].append({"seed": seed, "step_s": m["step_s"], "teacher_s": m["teacher_s"],
                                   "eval_seconds": sum(r["seconds"] for r in results.values())})  # fmt: skip
            for step, v in m["val_loss"].items():
                val_at.setdefault(step, []).append(v)
            for steps, r in results.items():
                d = per_steps.setdefault(steps, {"alignment": [], "fd": []})
                d["alignment"].append(r["alignment"])
                d["fd"].append(r["frechet_distance"])
        entry["quality"] = {s: {k: _spread(v) for k, v in d.items()} for s, d in sorted(per_steps.items())}
        entry["val_loss"] = {s: statistics.mean(v) for s, v in sorted(val_at.items())}
        table[name] = entry
    teacher = _eval_results(Path(args.teacher), args.sample_steps)
    return {"finalists": table, "speed": speed, "teacher": {
        "latency_ms": speed["median_ms"].get("teacher") if speed else None,
        "quality": {s: {"alignment": r["alignment"], "fd": r["frechet_distance"]} for s, r in (teacher or {}).items()},
    }}  # fmt: skip


def verdicts(data: dict, steps: int) -> list[dict]:
    """At each hand design's latency, each search seed's pick against it, by alignment over training
    seeds. Picks come from picks.json (table latency at or under the hand design's); the DeciDiffusion-
    like design lies outside the space (no table latency, no picks there), so it meets the trained
    searched point with the best proxy loss at or under its interleaved latency."""
    table = data["finalists"]
    out = []
    for hand, h in ((n, e) for n, e in table.items() if e["kind"] == "hand"):
        if steps not in h["quality"]:
            continue
        picks = [
            (p["study"], name) for name, e in table.items() for p in e["picked_for"] if p["hand"] == hand
        ]
        if not picks and h["latency_ms"] is not None:
            under = [n for n, e in table.items() if e["kind"] == "searched" and e["latency_ms"] is not None
                     and e["latency_ms"] <= h["latency_ms"]]  # fmt: skip
            if under:  # what the searches would have picked: the best proxy loss under its latency
                picks = [("best proxy under its latency", min(under, key=lambda n: table[n]["proxy_loss"]))]
        for study, name in sorted(picks):
            s = table[name]
            if steps not in s["quality"]:
                continue
            ha, sa = h["quality"][steps]["alignment"], s["quality"][steps]["alignment"]
            verdict = "beats" if sa["min"] > ha["max"] else "loses to" if sa["max"] < ha["min"] else "ties"
            out.append({"hand": hand, "study": study, "searched": name, "verdict": verdict,
                        "hand_alignment": ha, "searched_alignment": sa,
                        "hand_fd": h["quality"][steps]["fd"], "searched_fd": s["quality"][steps]["fd"],
                        "hand_latency_ms": h["latency_ms"], "searched_latency_ms": s["latency_ms"]})  # fmt: skip
    return out


def compute(args, data: dict) -> dict:
    """Seconds of one core: the three searches' proxy training (Optuna trial attributes) against the
    final training and evaluation of every finalist and seed."""
    from nas.search.study import load_study

    search = 0.0
    for study in args.studies:
        trials = load_study(study, results=str(args.out / "studies")).trials
        search += sum(t.user_attrs.get("proxy_seconds", 0.0) for t in trials)
    runs = [s for e in data["finalists"].values() for s in e["seeds"]]
    train = sum(s["step_s"] * args.steps for s in runs)
    evals = sum(s["eval_seconds"] for s in runs)
    return {"search_proxy_s": search, "final_train_s": train, "final_eval_s": evals, "final_runs": len(runs)}


def gap_lines(args) -> list[str]:
    """The text gap (`gap` mode) at the proxy's length and after final training, per design."""
    files = {"60 steps (proxy length, seed 0)": args.out / "text_gap_proxy_runs.json",
             f"{args.steps} steps (mean of the training seeds)": args.out / "text_gap.json"}  # fmt: skip
    found = {k: json.loads(f.read_text()) for k, f in files.items() if f.exists()}
    if not found:
        return []
    names = list(finalists(args.out))
    lines = ["", "Text gap: validation loss with the empty caption minus with each item's caption (0: the "
             "U-Net ignores the text):", "", "| design | " + " | ".join(found) + " |",
             "|---|" + "---:|" * len(found)]  # fmt: skip
    for name in names:
        cells = []
        for gaps in found.values():
            vals = [v["gap"] for k, v in gaps.items() if k.rsplit("-s", 1)[0] == name]
            cells.append(f"{statistics.mean(vals):.5f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt(a: dict, f: str = ".3f") -> str:
    return f"{a['mean']:{f}} [{a['min']:{f}}-{a['max']:{f}}]"


def plot(data: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, metric, label in ((axes[0], "alignment", "alignment (higher is better)"),
                              (axes[1], "fd", "Frechet distance (lower is better)")):  # fmt: skip
        for name, e in data["finalists"].items():
            if steps not in e["quality"] or e["latency_ms"] is None:
                continue
            q = e["quality"][steps][metric]
            hand = e["kind"] == "hand"
            ax.errorbar([e["latency_ms"]], [q["mean"]], yerr=[[q["mean"] - q["min"]], [q["max"] - q["mean"]]],
                        fmt="s" if hand else "o", color="black" if hand else "C0", capsize=3,
                        markersize=7 if hand else 5)  # fmt: skip
            label = name.replace("quickstart_", "")
            if e["cross_attention_layers"] <= 1:  # the text-blind and nearly text-blind picks
                label += f" ({e['cross_attention_layers']} transformer layer{'s' if e['cross_attention_layers'] != 1 else ''})"
            ax.annotate(label, (e["latency_ms"], q["mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        t = data["teacher"]
        if steps in t["quality"] and t["latency_ms"] is not None:
            ax.scatter([t["latency_ms"]], [t["quality"][steps][metric]], marker="*", s=120, color="C3",
                       label="teacher (8,000 steps, not the same training)")  # fmt: skip
        ax.errorbar([], [], fmt="s", color="black", label="hand design (min-max over 3 training seeds)")
        ax.errorbar([], [], fmt="o", color="C0", label="searched pick")
        ax.set_xlabel("U-Net latency, ms (batch 2, 1 CPU thread, interleaved)")
        ax.set_ylabel(f"{label}, {steps} sampling steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("hand designs against searched architectures, identical final training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(args) -> None:
    steps = 30 if 30 in args.sample_steps else args.sample_steps[-1]
    data = collect(args)
    data["verdicts"] = verdicts(data, steps)
    data["compute"] = compute(args, data)
    lines = [f"Identical final training: inherit + BK-SDM distillation from the teacher, {args.steps} steps, "
             f"training seeds {', '.join(map(str, args.seeds))}; `nas eval` ({args.n} images) at "
             f"{'/'.join(map(str, args.sample_steps))} sampling steps; latency: batch 2, 1 thread, "
             f"{(data['speed'] or {}).get('rounds', '?')} interleaved rounds of all networks.", "",
             "| design | kind | params | MMACs | cross-attn layers | proxy loss | table ms | latency (ms) | "
             + " | ".join(f"alignment @{s}" for s in args.sample_steps)
             + f" | FD @{steps} | val loss @{args.steps // 2} / @{args.steps} |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.sample_steps) + "---:|---:|"]  # fmt: skip
    for name, e in sorted(data["finalists"].items(), key=lambda kv: -(kv[1]["latency_ms"] or 0)):
        q = e["quality"]
        cells = [_fmt(q[s]["alignment"]) if s in q else "-" for s in args.sample_steps]
        fd = _fmt(q[steps]["fd"], ".0f") if steps in q else "-"
        half, full = e["val_loss"].get(args.steps // 2), e["val_loss"].get(args.steps)
        val = "-" if half is None or full is None else f"{half:.4f} / {full:.4f}"
        lat = "-" if e["latency_ms"] is None else f"{e['latency_ms']:.2f}"
        proxy = "-" if e.get("proxy_loss") is None else f"{e['proxy_loss']:.4f}"
        table_ms = "-" if e.get("table_ms") is None else f"{e['table_ms']:.1f}"
        lines.append(f"| {name} | {e['kind']} | {e['params'] / 1e6:.2f}M | {e['macs'] / 1e6:.1f} | "
                     f"{e['cross_attention_layers']} | {proxy} | {table_ms} | {lat} | "
                     + " | ".join(cells) + f" | {fd} | {val} |")  # fmt: skip
    t = data["teacher"]
    if t["quality"]:
        lines.append(f"| teacher (reference) | 8,000 steps scratch | - | - | - | - | - | {t['latency_ms'] or 0:.2f} | "
                     + " | ".join(f"{t['quality'][s]['alignment']:.3f}" if s in t["quality"] else "-"
                                  for s in args.sample_steps)
                     + f" | {t['quality'].get(steps, {}).get('fd', float('nan')):.0f} | - |")  # fmt: skip
    lines += ["", f"Verdicts (alignment at {steps} steps, min-max over training seeds):", "",
              "| hand design | its latency | its alignment | search seed | searched pick | its latency | its alignment | verdict | FD hand / searched |",
              "|---|---:|---:|---|---|---:|---:|---|---|"]  # fmt: skip
    for v in data["verdicts"]:
        lines.append(f"| {v['hand']} | {_ms(v['hand_latency_ms'])} | {_fmt(v['hand_alignment'])} | {v['study']} | "
                     f"{v['searched']} | {_ms(v['searched_latency_ms'])} | {_fmt(v['searched_alignment'])} | "
                     f"{v['verdict']} | {v['hand_fd']['mean']:.0f} / {v['searched_fd']['mean']:.0f} |")  # fmt: skip
    agreement = data["proxy_agreement"] = proxy_agreement(data, steps)
    if agreement is not None:
        lines += ["", f"The search's proxy (60 inherit + distill steps, validation loss) against the final alignment "
                  f"at {steps} steps over the {agreement['n']} finalists with both: Spearman rho "
                  f"{agreement['spearman_rho']:.3f}."]  # fmt: skip
    lines += gap_lines(args)
    c = data["compute"]
    lines += ["", f"Compute (seconds of one core): the three searches' proxy training {c['search_proxy_s']:.0f} s; "
              f"the final training of {c['final_runs']} runs {c['final_train_s']:.0f} s "
              f"(+ {c['final_eval_s']:.0f} s of evaluation); search / final training = "
              f"{c['search_proxy_s'] / max(c['final_train_s'], 1e-9):.2f}.", "", "![answer](answer.png)", ""]  # fmt: skip
    plot(data, steps, args.out / "answer.png")
    text = json.dumps(data, indent=2, default=str).replace(f"{ROOT}/", "")  # paths relative to the checkout
    (args.out / "final.json").write_text(text + "\n")
    (args.out / "final.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {(args.out / 'final.md').relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


def text_gap(args) -> None:
    """Does the U-Net use the text? Per finished run: the validation loss (the run's own held-out
    triples, nas.train.data.ValidationSet) with each item's caption and with the empty caption. A
    text-blind U-Net has a gap of 0; a denoising-loss proxy cannot tell it from one that follows the
    prompt. Writes OUT/text_gap.json."""
    import torch

    from nas.data.cache import open_cache
    from nas.diffusion import diffusion_loss, noise_scheduler
    from nas.models.load import find_unet, load_unet
    from nas.sample.components import read_run_config
    from nas.train.data import ValidationSet

    torch.set_num_threads(1)
    cache = open_cache(args.cache)
    empty = cache.empty_text()[0]
    path = args.out / ("text_gap.json" if args.runs == "runs" else f"text_gap_{args.runs}.json")
    gaps = json.loads(path.read_text()) if path.exists() else {}
    for name in finalists(args.out):
        for seed in args.seeds:
            run = args.out / args.runs / f"{name}-s{seed}"
            key = f"{name}-s{seed}"
            if key in gaps or not (run / "final").is_dir():
                continue
            config = read_run_config(run)
            scheduler = noise_scheduler(config.diffusion)
            val = ValidationSet.build(cache, config, scheduler.config.num_train_timesteps)
            unet = load_unet(find_unet(run).folder)
            sums = {"caption": 0.0, "empty": 0.0}
            with torch.no_grad():
                for b in val.shard(0, 1, 64):
                    for kind, text in (("caption", b["text"]), ("empty", empty.expand_as(b["text"]))):
                        loss = diffusion_loss(unet, scheduler, b["latents"], text, b["noise"], b["timesteps"],
                                              config.diffusion.min_snr_gamma)  # fmt: skip
                        sums[kind] += float(loss.sum())
            gaps[key] = {k: v / len(val) for k, v in sums.items()}
            gaps[key]["gap"] = gaps[key]["empty"] - gaps[key]["caption"]
            print(
                f"text gap {key}: {gaps[key]['gap']:.5f} ({gaps[key]['caption']:.5f} with the caption)",
                flush=True,
            )
            path.write_text(json.dumps(gaps, indent=2) + "\n")
