"""GPU check: one run on a CUDA machine (under 8 minutes) that measures what this project has not yet
measured on a GPU, and writes OUT/<device name slug>/results.json and README.md.

Sections, each with its own time budget (seconds; what a section finished is kept when it fails or
runs out of time, and the next section runs):
- latency: per-call U-Net latency at 64x64 latents, batch 2 (one image with CFG), 77x768 text, of
  SD 1.5, DeciDiffusion 1.0's layout and BK-SDM Base/Small/Tiny (search_spaces/archs/), behind fp16
  eager, torch.compile, CUDA graphs and ONNX Runtime's CUDA provider (nas/deploy/runtimes.py, timed
  by nas.cost.measure.measure_latency); a pairing that cannot run here is recorded with the reason;
- train: SD-size distillation through `nas train`'s loop (nas.train.loop.train; BK-SDM losses, SD 1.5
  teacher -> BK-SDM-Small student inherited from it, random weights, bf16 autocast, gradient
  checkpointing) on an in-memory synthetic latent cache: s/step, the teacher's share, peak CUDA memory;
- table: the latency table of search_spaces/decidiffusion.yaml built on this GPU
  (nas.cost.table_build.build_table) and validated on random architectures measured whole
  (Spearman rho, MAPE, share within +-10%).
No downloads, no text encoder: text embeddings are random tensors of CLIP's shape.

    PYTHONPATH=. python experiments/benchmarks/gpu_check.py --out results/gpu     # or: make gpu-check
    python experiments/benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke        # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `nas` and `experiments` from the checkout, installed or not

import torch  # noqa: E402

from nas.core.errors import NasError  # noqa: E402

ARCHS = "search_spaces/archs"


@dataclass
class Plan:
    """Sizes and budgets of one run: the GPU run or the CPU smoke run (same code, tiny sizes)."""

    device: str
    archs: list[str]  # architecture names under search_spaces/archs/, in priority order
    arms: list[tuple[str, str]]  # (runtime, precision), in priority order
    budgets: dict[str, float]  # section -> seconds
    warmup: int = 5  # untimed calls per latency arm (compilation and CUDA-graph capture happen here)
    iters: int = 20  # timed calls per latency arm
    batch: int = 2  # latents per call: one image with classifier-free guidance
    space: str = "search_spaces/decidiffusion.yaml"
    table_rounds: int = 5  # interleaved rounds over the blocks (median kept)
    table_fit: int = 6  # whole networks the correction is fitted on
    validate: int = 20  # random architectures measured whole to validate the table
    whole_iters: int = 10  # timed forwards per whole network
    teacher: str = "sd15"
    student: str = "bksdm_small"
    steps: int = 20  # optimizer steps timed (after `warm_steps` untimed ones)
    warm_steps: int = 2
    train_batch: int = 2
    mixed_precision: str = "bf16"
    extra: dict = field(default_factory=dict)


GPU = Plan(
    device="cuda",
    archs=["sd15", "decidiffusion_v1", "bksdm_small", "bksdm_base", "bksdm_tiny"],
    arms=[("eager", "fp16"), ("cudagraphs", "fp16"), ("compile", "fp16"), ("onnxruntime", "fp16")],
    budgets={"latency": 210.0, "train": 90.0, "table": 130.0},  # 430 s: under 8 min with start-up
)
SMOKE = Plan(
    device="cpu",
    archs=["tiny_stock", "tiny_flex"],
    # cudagraphs cannot run on CPU: it exercises the recorded-skip path
    arms=[("eager", "fp32"), ("onnxruntime", "fp32"), ("cudagraphs", "fp32")],
    budgets={"latency": 60.0, "train": 60.0, "table": 60.0},
    warmup=1,
    iters=2,
    space="search_spaces/tiny.yaml",
    table_rounds=1,
    table_fit=2,
    validate=3,
    whole_iters=2,
    teacher="tiny_stock",
    student="tiny_flex",
    steps=2,
    warm_steps=1,
    mixed_precision="no",
)


def units(plan: Plan) -> list[tuple[str, str, str]]:
    """(runtime, precision, arch) in the order run: eager for every arch first, then each compiled
    or exported runtime for SD 1.5 and DeciDiffusion's layout, then for the BK-SDM models."""
    first, rest = plan.archs[:2], plan.archs[2:]
    out = [(r, p, a) for r, p in plan.arms[:1] for a in plan.archs]
    for group in (first, rest):
        for arch in group:  # compile right after cudagraphs: inductor's cache serves the second
            out += [(r, p, arch) for r, p in plan.arms[1:] if r != "onnxruntime"]
        out += [(r, p, a) for r, p in plan.arms[1:] if r == "onnxruntime" for a in group]
    return out


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: float):
    """Raise OutOfTime in the block after `seconds` (SIGALRM; main thread, Unix)."""

    def alarm(signum, frame):
        raise OutOfTime(f"out of its {seconds:.0f} s budget")

    global _DEADLINE
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _DEADLINE = time.perf_counter() + seconds
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _DEADLINE = None


_DEADLINE: float | None = None  # end of the running section's budget (perf_counter seconds)


def check_deadline() -> None:
    """Raise OutOfTime when the section's budget is spent: the alarm's exception can be swallowed
    by a library that wraps what it catches (torch.compile's InductorError did on an H200)."""
    if _DEADLINE is not None and time.perf_counter() > _DEADLINE:
        raise OutOfTime("out of its budget")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def device_info(device: str) -> dict:
    info: dict = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        **{p: _version(p) for p in ("diffusers", "accelerate", "onnx", "onnxruntime", "onnxruntime-gpu")},
    }
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())  # fmt: skip
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["driver"] = f"unknown ({type(exc).__name__})"
    else:
        from nas.cost.table import device_info as table_device

        info.update(name=table_device(device).name, threads=torch.get_num_threads())
    return info


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


class Run:
    """The results of one run, written to OUT/results.json and README.md after every unit."""

    def __init__(self, plan: Plan, out: Path, smoke: bool, argv: list[str]):
        self.plan, self.started = plan, time.perf_counter()
        self.data: dict = {
            "smoke": smoke,
            "command": " ".join(["python", "experiments/benchmarks/gpu_check.py", *argv]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": device_info(plan.device),
            "budgets_s": plan.budgets,
            "sections": {},
        }
        self.out = out / slug(self.data["device"]["name"])
        self.out.mkdir(parents=True, exist_ok=True)

    def log(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {line}", flush=True)

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {"status": "running"})

    def save(self) -> None:
        from experiments.benchmarks.gpu_check_report import readme

        self.data["total_seconds"] = round(time.perf_counter() - self.started, 1)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "README.md").write_text(readme(self.data))


def free_memory() -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs and their CUDA-graph pools go with their models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def latency_section(run: Run, section: dict) -> None:
    from nas.cost.measure import arch_cost, measure_latency
    from nas.deploy.runtimes import check_runtime
    from nas.space import build_unet, load_arch

    plan = run.plan
    rows = section.setdefault("rows", [])
    costs = section.setdefault("archs", {})
    section.update(batch=plan.batch, warmup=plan.warmup, iters=plan.iters)
    for name in plan.archs:
        c = arch_cost(load_arch(ROOT / ARCHS / f"{name}.yaml"), batch=plan.batch)
        costs[name] = {"params": c["params"], "gmacs": round(c["macs"] / 1e9, 2), "class": c["model_class"],
                       "latent_size": c["latent_size"], "tokens": c["tokens"]}  # fmt: skip
    for runtime, precision, name in units(plan):
        check_deadline()
        row = {"arch": name, "runtime": runtime, "precision": precision}
        rows.append(row)
        try:
            check_runtime(runtime, precision, plan.device)
        except NasError as exc:
            row["skipped"] = str(exc)
            run.log(f"latency {name} {runtime} {precision}: skipped ({exc})")
            run.save()
            continue
        arch = load_arch(ROOT / ARCHS / f"{name}.yaml")
        started = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = build_unet(arch, device=plan.device)
            lat = measure_latency(model, arch, plan.device, plan.batch, warmup=plan.warmup, iters=plan.iters,
                                  runtime=runtime, precision=precision)  # fmt: skip
            row.update(ms_p50=round(lat.latency_ms_p50, 3), ms_p90=round(lat.latency_ms_p90, 3),
                       peak_memory_mb=round(lat.peak_memory_mb, 1), iters=lat.iters)  # fmt: skip
        except OutOfTime:
            row["skipped"] = "the section's time budget ran out during this arm"
            raise
        except Exception as exc:  # one arm failing (an export, a compile) must not end the section
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        finally:
            row["wall_s"] = round(time.perf_counter() - started, 1)  # build, export/compile, timing
            model = None
            free_memory()
            run.save()
        run.log(
            f"latency {name} {runtime} {precision}: {row.get('ms_p50', row.get('error'))} ({row['wall_s']} s)"
        )


class SyntheticCache:
    """An in-memory latent cache with `nas.data.cache.LatentCache`'s interface (len, manifest,
    dataset, empty_text): random latents and text embeddings of the given shapes."""

    def __init__(self, count: int, channels: int, size: int, text_len: int, text_dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mean = torch.randn(count, channels, size, size, generator=g)
        self.text = torch.randn(count, text_len, text_dim, generator=g)
        self.mask = torch.ones(text_len, dtype=torch.long)
        self.path = "synthetic-cache"
        self.manifest = {"latent_channels": channels, "latent_size": size, "text_len": text_len,
                         "text_dim": text_dim, "scaling_factor": 1.0, "count": count}  # fmt: skip

    def __len__(self) -> int:
        return len(self.mean)

    def dataset(self, sample: bool = True, generator: torch.Generator | None = None):
        cache = self

        class Items(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(cache)

            def __getitem__(self, i: int) -> dict:
                latents = cache.mean[i]
                if sample:
                    latents = latents + 0.05 * torch.randn(latents.shape, generator=generator)
                return {"latents": latents, "text": cache.text[i], "text_mask": cache.mask, "index": i}

        return Items()

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(self.text[0]), self.mask


def train_section(run: Run, section: dict) -> None:
    from nas.space import build_unet, load_arch
    from nas.train import TrainConfig
    from nas.train.distill import prepare_teacher
    from nas.train.loop import train

    plan = run.plan
    teacher_arch = load_arch(ROOT / ARCHS / f"{plan.teacher}.yaml")
    student_arch = load_arch(ROOT / ARCHS / f"{plan.student}.yaml")
    s = teacher_arch.settings
    cache = SyntheticCache(8, s.latent_channels, s.latent_size, s.text_len, s.cross_attention_dim)
    section.update(teacher=plan.teacher, student=plan.student, batch=plan.train_batch,
                   latent_size=s.latent_size, mixed_precision=plan.mixed_precision,
                   gradient_checkpointing=True)  # fmt: skip

    def config(steps: int) -> TrainConfig:
        return TrainConfig.model_validate(dict(
            name="gpu-check", max_steps=steps, batch_size=plan.train_batch, lr=1e-5, warmup_steps=0,
            ema=None, val_items=2, val_timesteps=1, val_every=10_000, log_every=1,
            checkpoint_every=10_000, mixed_precision=plan.mixed_precision, gradient_checkpointing=True,
            distill={"teacher": f"in-memory {plan.teacher}", "kind": "bk_sdm"},
        ))  # fmt: skip

    started = time.perf_counter()
    torch.manual_seed(0)
    teacher, student = build_unet(teacher_arch), build_unet(student_arch)
    distill = config(1).distill
    assert distill is not None
    prepare_teacher(distill, student, student_arch, cache, given=(teacher, teacher_arch), quiet=True)
    section["build_inherit_s"] = round(time.perf_counter() - started, 1)
    run.log(
        f"train: {plan.teacher} teacher and {plan.student} student built, inherited in {section['build_inherit_s']} s"
    )
    warm = train(student, cache, config(plan.warm_steps), quiet=True, teacher=teacher)  # kernels, autotune
    section["warm_step_s"] = warm.step_s
    cuda = plan.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(student, cache, config(plan.steps), quiet=True, teacher=teacher)
    section.update(
        steps=plan.steps, step_s=result.step_s, teacher_s=result.teacher_s,
        teacher_share=result.teacher_s / result.step_s if result.step_s else None,
        wall_s=round(time.perf_counter() - started, 1), val_loss=result.val_loss,
        peak_cuda_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    )  # fmt: skip
    run.log(f"train: {plan.steps} steps, {result.step_s:.3f} s/step, teacher {section['teacher_share']:.0%}")
    teacher = student = None
    free_memory()


def _spearman(a: list[float], b: list[float]) -> float:
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:  # the device machine may lack scipy; timings have no ties
        ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def table_section(run: Run, section: dict) -> None:
    from nas.cost.table import TableSetup, measure_whole, predict
    from nas.cost.table_build import build_table, fit_archs
    from nas.space import RandomChoices, build_unet, canonical, load_space, sample_arch

    plan = run.plan
    space = load_space(ROOT / plan.space)
    setup = TableSetup(dtype=space.latency.dtype, batch=plan.batch, warmup=3, rounds=plan.table_rounds)
    path = run.out / f"table_{space.name}.json"
    section.update(space=plan.space, setup=setup.model_dump(), fit=plan.table_fit)
    table = build_table(space, path, plan.device, setup, plan.table_fit, plan.whole_iters, log=run.log)
    section.update(table=path.name, blocks=len(table.blocks), build_seconds=table.build_seconds,
                   correction=table.fit.model_dump(exclude={"points"}))  # fmt: skip
    run.save()
    free_memory()
    seen = {json.dumps(canonical(a), sort_keys=True) for a in fit_archs(space, plan.table_fit)}
    chooser, rows = RandomChoices(100), section.setdefault("rows", [])
    for i in range(100 * plan.validate):
        if len(rows) == plan.validate:
            break
        arch = sample_arch(space, chooser, name=f"{space.name}-v{i}")
        key = json.dumps(canonical(arch), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        model = build_unet(arch, device=plan.device)
        point = measure_whole(arch, setup, plan.device, plan.whole_iters, model=model)
        rows.append({"arch": arch.name, "measured_ms": point.measured_ms,
                     "predicted_ms": predict(table, arch)["latency_ms_p50"]})  # fmt: skip
        model = None
        free_memory()
        run.log(f"table validation {len(rows)}/{plan.validate}: {point.measured_ms:.2f} ms whole, "
                f"{rows[-1]['predicted_ms']:.2f} ms predicted")  # fmt: skip
        score(section)
        run.save()


def score(section: dict) -> None:
    rows = section["rows"]
    measured, predicted = [r["measured_ms"] for r in rows], [r["predicted_ms"] for r in rows]
    errors = [100 * (p - m) / m for p, m in zip(predicted, measured)]
    section["validation"] = {
        "count": len(rows),
        "spearman": _spearman(predicted, measured) if len(rows) > 2 else None,
        "mape_pct": statistics.fmean(abs(e) for e in errors),
        "within_10pct": sum(abs(e) <= 10 for e in errors) / len(errors),
    }


SECTIONS = {"latency": latency_section, "train": train_section, "table": table_section}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu", help="folder; results go to OUT/<device slug>/")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny architectures and space, 8x8 latents")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--scale-budgets", type=float, default=1.0, help="multiply every section's budget")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here (use --smoke for the CPU check)")
    from nas.core.noise import quiet_harmless

    quiet_harmless()  # diffusers' empty "kept in float32: []" warning on every .to(dtype)
    run = Run(plan, Path(args.out), args.smoke, sys.argv[1:] if argv is None else argv)
    run.log(f"device {run.data['device']['name']}; writing {run.out}")
    for name in args.sections:
        section = run.section(name)
        started = time.perf_counter()
        seconds = plan.budgets[name] * args.scale_budgets
        run.log(f"section {name} (budget {seconds:.0f} s)")
        try:
            with budget(seconds):
                SECTIONS[name](run, section)
            section["status"] = "done"
        except OutOfTime as exc:
            section["status"] = f"stopped: {exc}"
        except Exception as exc:
            section["status"] = f"failed: {type(exc).__name__}: {exc}"[:500]
            section["traceback"] = traceback.format_exc()[-3000:]
        section["seconds"] = round(time.perf_counter() - started, 1)
        run.log(f"section {name}: {section['status']} in {section['seconds']} s")
        free_memory()
        run.save()
    run.log(f"wrote {run.out / 'results.json'} and README.md")
    return run.out


if __name__ == "__main__":
    main()
