"""Load held (issue 29.6): one `nas search --workers 8` on PostgreSQL, 40 trials of a few seconds
each (search_spaces/tiny.yaml, proxy shortened to 12 steps), on whatever machine this runs on.

    python experiments/benchmarks/pg_load.py --out results/reliability

Everything is made here (as bench_scaleout.py): a 240-image shapes set, a random tiny VAE, a
latent cache, a throwaway PostgreSQL server (tests/fixtures/postgres.py). Reports trials/min
(counted trials over the command's wall time, process starts included), the exact count, trials
lost (cut off and never rerun) and duplicated (an architecture measured twice, or a trial number
used twice), and the time each worker waited on the database: seconds inside storage calls,
counted by nas/search/retry.py and written per process (NAS_STORAGE_STATS). Writes OUT/pg_load.json.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.benchmarks.bench_scaleout import _make_cache, _space  # noqa: E402
from nas.core.runfolder import environment  # noqa: E402
from tests.fixtures.postgres import ThrowawayPostgres, create_database  # noqa: E402


def audit(url: str, trials_wanted: int) -> dict:
    """Count, lost and duplicated trials of study `load` in `url`."""
    import optuna
    from optuna.trial import TrialState

    from nas.search.storage import arch_key, counted

    trials = optuna.load_study(study_name="load", storage=url).get_trials()
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    lost = [t.number for t in trials if t.state == TrialState.RUNNING
            or (t.state == TrialState.FAIL and "error" not in t.user_attrs
                and "surplus" not in t.user_attrs and t.number not in retried)]  # fmt: skip
    keys = [arch_key(t.user_attrs["arch"]) for t in trials
            if counted(t) and "arch" in t.user_attrs and "duplicate_of" not in t.user_attrs]  # fmt: skip
    measured_twice = len(keys) - len(set(keys))
    numbers = [t.number for t in trials]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return {
        "trials_wanted": trials_wanted,
        "counted": sum(counted(t) for t in trials),
        "trials_in_storage": len(trials),
        "states": {
            s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)
        },
        "lost": len(lost),
        "duplicated": measured_twice + (len(numbers) - len(set(numbers))),
        "pruned_as_duplicate": sum("duplicate_of" in t.user_attrs for t in trials),
        "surplus": sum("surplus" in t.user_attrs for t in trials),
        "retried": len(retried),
        "trial_seconds_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
        "trial_seconds_max": max(seconds) if seconds else None,
        "workers_seen": len({t.user_attrs.get("worker") for t in trials if "worker" in t.user_attrs}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "reliability")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nas-pg-load-") as tmp, ThrowawayPostgres() as server:
        work = Path(tmp)
        cache, space = _make_cache(work), _space(work)
        url = create_database(server)
        stats = work / "stats"
        stats.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NAS_STORAGE_STATS": str(stats)}
        cmd = [sys.executable, "-m", "nas", "search", str(space), "--study", "load", "--trials", str(args.trials),
               "--cache", str(cache), "--results", str(work / "results"), "--storage", url,
               "--workers", str(args.workers), "--quiet"]  # fmt: skip
        start = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"nas search exited {run.returncode}: {run.stderr[-2000:]}")
        result = audit(url, args.trials)
        workers = sorted((json.loads(p.read_text()) for p in stats.glob("*.json")), key=lambda w: w["worker"])
    env_record = environment()
    summary = {
        "command": " ".join(["nas", *cmd[3:]]).replace(url, "postgresql://.../DB"),
        "machine": {k: env_record[k] for k in ("cpu", "cpu_cores", "platform", "python", "optuna")},
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(wall, 1),
        "trials_per_min": round(result["counted"] / wall * 60, 2),
        **result,
        "db_wait_main_thread_s": {
            "max_worker": max(w["main_s"] for w in workers),
            "sum_workers": round(sum(w["main_s"] for w in workers), 3),
            "max_single_call": max(w["max_call_s"] for w in workers),
        },
        "workers": [
            {k: w[k] for k in ("main_s", "all_s", "calls", "max_call_s", "retries")} for w in workers
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pg_load.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "workers"}, indent=2))
    for w in summary["workers"]:
        print(f"worker: {w['calls']:5d} storage calls, {w['main_s']:7.3f} s waited (main thread),"
              f" {w['all_s']:7.3f} s all threads, longest call {w['max_call_s']:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()
