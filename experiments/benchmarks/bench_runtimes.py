"""U-Net forward latency behind each deploy-time runtime (nas/deploy/runtimes.py), as a ratio to eager
PyTorch fp32 measured in the same process.

Every runtime x precision that can run here wraps its own copy of the same U-Net (same seed);
after a warm-up, the arms take turns in rounds (round-robin, so drifting load on a shared machine
hits all alike) of --iters timed forwards each; an arm's latency is the median of all its forwards.
Batch 2: one image with classifier-free guidance. A pairing that cannot run here (not installed,
needs CUDA) is listed as skipped with the reason.

    python experiments/benchmarks/bench_runtimes.py search_spaces/archs/tiny_stock.yaml [--rounds 3] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Hashable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: spinning OpenMP threads cost 10x

import torch

from nas.core.errors import NasError
from nas.cost.measure import example_inputs, guidance_input
from nas.deploy.runtimes import RUNTIMES, wrap_unet
from nas.space import build_unet, load_arch


def wrap_arms(arch, arms, device: str = "cpu") -> dict:
    """{"runtime precision": model} for every (runtime, precision) in `arms` that runs here, each
    wrapping its own copy of the same U-Net (same seed); the others are printed as skipped."""
    models = {}
    for runtime, precision in arms:
        torch.manual_seed(0)
        try:
            models[f"{runtime} {precision}"] = wrap_unet(
                build_unet(arch), runtime, precision, device, arch.settings.text_len
            )
        except NasError as exc:
            print(f"{arch.name} {runtime} {precision}: skipped ({exc})")
    return models


def time_models(
    entries: dict[Hashable, tuple], device: str = "cpu", warmup: int = 2, rounds: int = 3, iters: int = 5
) -> dict[Hashable, list[float]]:
    """Forward milliseconds per entry (name -> (model, inputs)): after `warmup` untimed forwards
    each, the entries take turns in `rounds` rounds of `iters` timed forwards (round-robin: load
    that drifts on a shared host hits all alike)."""
    cuda = device.startswith("cuda")
    times: dict[Hashable, list[float]] = {name: [] for name in entries}
    with torch.inference_mode():
        for model, inputs in entries.values():
            for _ in range(warmup):
                model(*inputs)
        for _ in range(rounds):
            for name, (model, inputs) in entries.items():
                for _ in range(iters):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(*inputs)
                    if cuda:
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - t0) * 1000)
    return times


def with_guidance(models: dict, arch, batch: int) -> dict:
    """Each model called with the arch's `timestep_cond` (a guidance-embedded student; the exported
    ONNX graphs need it), or as is."""
    from functools import partial

    cond = guidance_input(arch, batch)
    return models if cond is None else {name: partial(m, timestep_cond=cond) for name, m in models.items()}


def time_arms(
    arch, arms, device: str = "cpu", batch: int = 2, warmup: int = 2, rounds: int = 3, iters: int = 5
) -> dict[str, list[float]]:
    """Forward milliseconds per arm ("runtime precision" -> list) of one architecture: `wrap_arms`
    then `time_models`. An arm that cannot run here is printed as skipped with the reason."""
    inputs = example_inputs(arch, batch)
    models = with_guidance(wrap_arms(arch, arms, device), arch, batch)
    times = time_models({name: (m, inputs) for name, m in models.items()}, device, warmup, rounds, iters)
    return {str(name): t for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", help="architecture YAML")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="latents per forward (2: one image with CFG)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed forwards per arm (compile happens here)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per arm and round")
    parser.add_argument("--skip", nargs="*", default=[], help="runtimes to leave out, e.g. compile")
    args = parser.parse_args()

    arch = load_arch(args.arch)
    arms = [(r, p) for r, cls in RUNTIMES.items() if r not in args.skip for p in cls.precisions]
    times = time_arms(arch, arms, args.device, args.batch, args.warmup, args.rounds, args.iters)
    base = statistics.median(times["eager fp32"])
    print(f"{arch.name}, batch {args.batch}, {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'runtime precision':<26} {'median ms':>10} {'vs eager fp32':>14}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<26} {median:>10.2f} {median / base:>13.2f}x")


if __name__ == "__main__":
    main()
