"""Throughput of `nas search` with 1, 2 and 3 local workers on SQLite and on PostgreSQL, and the
Ray backend's overhead per trial against the Optuna backend, measured in one run.

    python experiments/benchmarks/bench_scaleout.py --trials 12 --out results/scaleout

Everything is made here: a 240-image shapes set, a random tiny VAE (throughput, not quality), a
latent cache, a throwaway PostgreSQL server (Debian's `postgresql`; tests/fixtures/postgres.py).
Each configuration runs the tiny space (search_spaces/tiny.yaml, proxy shortened to 12 steps) as a
fresh study, timed from command start to exit (process start, imports, study creation included).
Prints a table and writes OUT/scaleout.json. On a 2-core machine a third worker only adds
contention: read the figures as the overhead of the storage and the engine, not as scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fixtures.data import make_tiny_vae  # noqa: E402
from tests.fixtures.postgres import ThrowawayPostgres, create_database  # noqa: E402


def _nas(*args: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nas", *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _make_cache(work: Path) -> Path:
    _nas("data", "shapes", "--out", str(work / "shapes"), "--n", "240")
    vae = make_tiny_vae(work / "vae")
    cache = work / "cache"
    _nas("precompute", "--data", str(work / "shapes" / "train"), "--vae", str(vae), "--out", str(cache))
    return cache


def _space(work: Path) -> Path:
    data = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
    data["baselines"] = [str(ROOT / "search_spaces" / rel) for rel in data["baselines"]]
    data["proxy"].update(steps=12, report_every=4)
    data["latency"] = {"device": "cpu", "batch": 1, "warmup": 0, "iters": 1}
    path = work / "bench_space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per study")
    parser.add_argument("--workers", default="1,2,3", help="worker counts to time")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scaleout")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="nas-scaleout-") as tmp, ThrowawayPostgres() as server:
        work = Path(tmp)
        cache, space = _make_cache(work), _space(work)

        def search(study: str, *extra: str) -> float:
            return _nas("search", str(space), "--study", study, "--trials", str(args.trials), "--cache", str(cache),
                        "--results", str(work / "results"), "--quiet", *extra, env=env)  # fmt: skip

        for workers in (int(w) for w in args.workers.split(",")):
            for storage in ("sqlite", "postgresql"):
                study = f"{storage}-{workers}"
                url = (create_database(server) if storage == "postgresql"
                       else f"sqlite:///{work / 'results' / study / 'study.db'}")  # fmt: skip
                seconds = search(study, "--workers", str(workers), "--storage", url)
                rows.append({"engine": "optuna", "storage": storage, "workers": workers, "seconds": seconds,
                             "trials_per_min": 60 * args.trials / seconds})  # fmt: skip
                print(f"optuna {storage:10s} workers {workers}: {seconds:6.1f} s, "
                      f"{rows[-1]['trials_per_min']:.1f} trials/min", flush=True)  # fmt: skip
        seconds = search("ray-1", "--backend", "ray", "--workers", "1")
        rows.append({"engine": "ray", "storage": "sqlite", "workers": 1, "seconds": seconds,
                     "trials_per_min": 60 * args.trials / seconds})  # fmt: skip
        print(f"ray    sqlite     workers 1: {seconds:6.1f} s", flush=True)
    optuna_1 = next(
        r for r in rows if r["engine"] == "optuna" and r["storage"] == "sqlite" and r["workers"] == 1
    )
    ray_overhead = (rows[-1]["seconds"] - optuna_1["seconds"]) / args.trials
    summary = {"trials": args.trials, "cpus": os.cpu_count(), "rows": rows,
               "ray_overhead_s_per_trial": ray_overhead}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"Ray backend: {ray_overhead:+.2f} s per trial against Optuna (Ray's start included, spread over trials)"
    )


if __name__ == "__main__":
    main()
