"""Does the contrastive evaluator (any captioned data) rank models as the shapes evaluator does?

On a shapes run, the shapes evaluator reads the prompted attributes from labels it was trained on;
the contrastive evaluator (`nas data train-evaluator --cache`) knows only captions. Train the
contrastive one on the run's own cache, generate the same images once per point (run x weights x
sampling steps, same prompts and seeds: the shapes validation scenes) and score every point with
both, through `nas eval`'s code (nas.evaluate.quality.quality_vs_steps with both scorers). Figures:
Spearman rho and Kendall tau between the two evaluators' alignment and between their Frechet
distances, over all points.

    OMP_NUM_THREADS=1 python experiments/studies/evaluator_agreement.py \\
        --run results/quickstart/train/run --run results/quickstart/train/run@500 \\
        --evaluator results/quickstart/data/evaluator --out results/evaluator_agreement
    python experiments/studies/evaluator_agreement.py --from-json results/evaluator_agreement

RUN@STEP scores the raw weights of a run's checkpoint at STEP (an earlier, weaker model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from scipy.stats import kendalltau, spearmanr

from nas.core.runfolder import environment, portable, write_json, write_text

PAIRS = {  # figure -> (shapes evaluator key, contrastive evaluator key); both: higher/lower alike
    "alignment": ("alignment", "contrastive_alignment"),
    "frechet_distance": ("frechet_distance", "contrastive_frechet_distance"),
}


def checkpoint_run(spec: str, scratch: Path) -> tuple[Path, str]:
    """RUN or RUN@STEP -> (a run folder, its weights choice); a checkpoint becomes a run with raw weights."""
    if "@" not in spec:
        return Path(spec), "ema"
    run, step = spec.rsplit("@", 1)
    ckpt = Path(run) / "checkpoints" / f"step_{int(step):06d}"
    if not (ckpt / "model.safetensors").is_file():
        raise SystemExit(
            f"{ckpt}: no model.safetensors (checkpoints kept: {sorted(p.name for p in (Path(run) / 'checkpoints').glob('step_*'))})"
        )
    out = scratch / f"step_{int(step):06d}"
    (out / "final" / "unet").mkdir(parents=True)
    shutil.copy(Path(run) / "config.yaml", out / "config.yaml")
    shutil.copy(ckpt / "config.json", out / "final" / "unet" / "config.json")
    shutil.copy(ckpt / "model.safetensors", out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    return out, "raw"


def measure(args) -> dict:
    import torch

    from nas.data.cache import open_cache
    from nas.evaluate import contrastive_evaluator as ce
    from nas.evaluate import scorers
    from nas.evaluate.quality import quality_vs_steps, shapes_eval_set
    from nas.evaluate.shapes_evaluator import load_evaluator
    from nas.sample import SampleSettings, load_run
    from nas.sample.components import read_run_config
    from nas.sample.generate import build_pipeline

    shapes_ev = load_evaluator(args.evaluator)
    first = Path(args.run[0].split("@")[0])
    cache = open_cache(read_run_config(first).cache)
    start = time.perf_counter()
    config = ce.ContrastiveConfig(steps=args.evaluator_steps, val_items=read_run_config(first).val_items)
    contrastive, trained = ce.train_contrastive(cache, config)
    train_seconds = time.perf_counter() - start
    points = []
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.run:
            run, weights = checkpoint_run(spec, Path(scratch))
            for w in [weights] if "@" in spec else args.weights:
                comp = load_run(run, weights=w)
                eval_set = shapes_eval_set(comp, args.n, seed=0)
                settings = SampleSettings(steps=max(args.steps), guidance=args.guidance, batch_size=25)
                pipe = build_pipeline(comp, "ddim", "trailing", "eager", "fp32")
                both = [scorers.ShapesScorer(shapes_ev),
                        scorers.RetrievalScorer(scorers.ContrastiveWithText(contrastive, comp.text_encoder),
                                                "contrastive", args.k, prefix="contrastive_")]  # fmt: skip
                report = quality_vs_steps(comp, pipe, args.steps, eval_set, settings, scorers=both)
                for row in report["results"]:
                    label = f"{portable(spec)} {w}, {row['steps']} steps"
                    points.append({"label": label, "run": portable(spec), "weights": w, **row})
                    print(label, {k: round(row[k], 3) for pair in PAIRS.values() for k in pair})
                reference = report["reference"]
    return {"points": points, "reference": reference, "contrastive_training": trained,
            "contrastive_config": config.model_dump(mode="json"), "contrastive_train_seconds": round(train_seconds, 1),
            "shapes_evaluator": portable(args.evaluator), "runs": [portable(r) for r in args.run],
            "n": args.n, "steps": args.steps, "guidance": args.guidance, "k": args.k,
            "environment": environment(seed=0, device="cpu", threads=torch.get_num_threads())}  # fmt: skip


def agreement(points: list[dict]) -> dict:
    """Spearman and Kendall between the evaluators per figure, over all points; `within_runs`: the
    Spearman over one model's sampling step counts, per model (where it has 3 points or more)."""
    out = {}
    for name, (a, b) in PAIRS.items():
        x, y = [p[a] for p in points], [p[b] for p in points]
        out[name] = {"spearman": float(spearmanr(x, y).statistic), "kendall": float(kendalltau(x, y).statistic),
                     "points": len(points), "within_runs": {}}  # fmt: skip
        for run in dict.fromkeys(p["run"] for p in points if "run" in p):
            mine = [p for p in points if p.get("run") == run]
            if len(mine) >= 3:
                rho = spearmanr([p[a] for p in mine], [p[b] for p in mine]).statistic
                out[name]["within_runs"][run] = float(rho)
    return out


def write(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result["agreement"] = agreement(result["points"])
    write_json(out / "agreement.json", result)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=100)
    models = list(dict.fromkeys(f"{p['run']} ({p['weights']})" for p in result["points"]))
    for ax, (name, (a, b)) in zip(axes, PAIRS.items()):
        for i, model in enumerate(models):
            mine = [p for p in result["points"] if f"{p['run']} ({p['weights']})" == model]
            ax.plot([p[a] for p in mine], [p[b] for p in mine], "o-", color=f"C{i}", label=model)
            for p in mine:
                ax.annotate(
                    str(p["steps"]), (p[a], p[b]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        if name == "alignment":
            ax.axhline(
                1 / result["k"], color="gray", ls=":", label=f"contrastive chance 1/K = {1 / result['k']:.3f}"
            )
            ax.legend(fontsize=7)
        g = result["agreement"][name]
        ax.set_title(f"{name}: Spearman {g['spearman']:.2f}, Kendall {g['kendall']:.2f}", fontsize=9)
        ax.set_xlabel(f"shapes evaluator {name}")
        ax.set_ylabel(f"contrastive evaluator {name}")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"one line per model, one point per sampling step count (label); same {result['n']} prompts and seeds"
    )
    fig.tight_layout()
    fig.savefig(out / "agreement.png")
    plt.close(fig)
    write_text(out / "README.md", readme(result))


def readme(r: dict) -> str:
    env, t, g = r["environment"], r["contrastive_training"], r["agreement"]
    rows = "\n".join(
        f"| {p['label']} | {p['alignment']:.3f} | {p['contrastive_alignment']:.3f} | "
        f"{p['frechet_distance']:.0f} | {p['contrastive_frechet_distance']:.1f} |"
        for p in r["points"]
    )
    k = r["reference"]["contrastive_retrieval"]["k"]
    prepared = "".join(f"{c}\n" for c in r.get("prepared", []))
    within = "; ".join(
        f"{name}: " + ", ".join(f"{run} {rho:.2f}" for run, rho in g[name]["within_runs"].items())
        for name in PAIRS
    )
    return f"""# Evaluator agreement: contrastive (any captioned data) vs shapes

Made by `experiments/studies/evaluator_agreement.py` on {env.get("cpu", "CPU")} ({env.get("cpu_cores")} cores,
shared with other jobs), torch {env.get("torch")}, {env.get("threads", "?")} thread(s), no GPU, {r.get("date", "")}:

```
{prepared}{r.get("command", "")}
```

{r.get("note", "")}

The contrastive evaluator was trained on the run's cache ({t["train_items"]} training items,
{r["contrastive_config"]["steps"]} steps, {r["contrastive_train_seconds"]:.0f} s): held-out retrieval
{t["val_alignment"]:.3f} (own caption first among K={t["val_alignment_k"]}, chance {t["val_chance_alignment"]:.3f};
among all {t["val_distinct_prompts"]} distinct held-out captions {t["val_top1_all"]:.3f}), training items
{t["train_alignment"]:.3f}. Every point below is one model at one sampling step count: the same
{r["n"]} shapes validation scenes and seeds, DDIM, guidance {r["guidance"]}, generated once and scored
by both evaluators (shapes: share of prompted attributes; contrastive: own prompt first among
K={k}, chance {1 / k:.3f}; Frechet distances in each evaluator's own feature space).

| rank agreement over {g["alignment"]["points"]} points | Spearman rho | Kendall tau |
|---|---:|---:|
| alignment | **{g["alignment"]["spearman"]:.3f}** | {g["alignment"]["kendall"]:.3f} |
| Frechet distance | **{g["frechet_distance"]["spearman"]:.3f}** | {g["frechet_distance"]["kendall"]:.3f} |

Within one model, over its sampling step counts (Spearman): {within}.

| point | shapes alignment | contrastive alignment | shapes FD | contrastive FD |
|---|---:|---:|---:|---:|
{rows}

References (real validation images): shapes alignment {r["reference"]["real_alignment"]:.3f}, contrastive
{r["reference"]["contrastive_real_alignment"]:.3f}; through the run's VAE {r["reference"]["vae_alignment"]:.3f} and
{r["reference"]["contrastive_vae_alignment"]:.3f}.

![agreement](agreement.png)

Files: `agreement.json` (every point's figures, the evaluators' training figures, the environment),
`agreement.png`. Regenerate this page and the plot: `python experiments/studies/evaluator_agreement.py
--from-json results/evaluator_agreement`.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", help="run folder, or RUN@STEP for a checkpoint (repeat)")
    p.add_argument("--evaluator", help="the shapes evaluator folder")
    p.add_argument("--steps", default="2,5,10,30", help="sampling step counts")
    p.add_argument("--weights", default="ema,raw", help="weights of each whole run")
    p.add_argument("--n", type=int, default=100, help="prompts (shapes validation scenes), one seed each")
    p.add_argument("--k", type=int, default=8, help="prompts each image is ranked among (chance 1/K)")
    p.add_argument("--guidance", type=float, default=4.0, help="as experiments/quickstart.yaml samples")
    p.add_argument("--evaluator-steps", type=int, default=1000, help="contrastive evaluator training steps")
    p.add_argument("--out", default="results/evaluator_agreement")
    p.add_argument("--from-json", help="rewrite README and plot from this folder's agreement.json")
    p.add_argument("--prepared", action="append", help="a command that made an input (for the README)")
    p.add_argument("--note", help="a sentence on where it ran (for the README)")
    args = p.parse_args()
    if args.from_json:
        out = Path(args.from_json)
        write(json.loads((out / "agreement.json").read_text()), out)
        return
    if not args.run or not args.evaluator:
        p.error("--run and --evaluator are required (or --from-json)")
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    args.weights = args.weights.split(",")
    import sys

    result = measure(args)
    result["command"] = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(str(portable(a)) for a in sys.argv)
    result["prepared"], result["note"] = args.prepared or [], args.note or ""
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(result, out)
    print(json.dumps(result["agreement"], indent=2))


if __name__ == "__main__":
    main()
