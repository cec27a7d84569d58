"""`python -m tests.search.synthetic_cli search ...`: the `nas` command line with the `synthetic`
point evaluation (tests/fixtures/search.py) instead of measuring and training, for the extra local
workers a test's search starts (`--workers N`, with `study.WORKER_MODULE` set to this module), so
that tests can use real processes and real signals. Importing it changes nothing; running it
does. Environment, read at each trial:

    NAS_TEST_PEERS=DIR     each trial marks DIR/<pid>, then waits (at most HOLD_S) until
                           NAS_TEST_PEER_COUNT processes have marked it: every worker gets a trial
    NAS_TEST_HOLD=1        then the trial waits (short sleeps, at most HOLD_S) until a signal stops it
"""

import gc
import os
import sys
import time
from pathlib import Path

from tests.fixtures.search import synthetic_point

HOLD_S = 120  # a waiting trial's bound: a test whose signal or peer never comes fails, not hangs


def wait_for_peers() -> None:
    peers = os.environ.get("NAS_TEST_PEERS")
    if not peers:
        return
    (Path(peers) / str(os.getpid())).touch()
    want, deadline = int(os.environ["NAS_TEST_PEER_COUNT"]), time.monotonic() + HOLD_S
    while len(list(Path(peers).iterdir())) < want and time.monotonic() < deadline:
        time.sleep(0.05)


def evaluate(space, arch, cache, train_config, hooks, measure=None):
    wait_for_peers()
    if os.environ.get("NAS_TEST_HOLD") == "1":
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:  # a signal raises here (run_search allows it in trials)
            time.sleep(0.05)
        raise RuntimeError(f"held trial {arch.name} got no signal in {HOLD_S} s")
    return synthetic_point(space, arch, cache, train_config, hooks, measure)


if __name__ == "__main__":
    import nas.search.study as study_module
    from nas.cli import main

    study_module.evaluate_point = evaluate
    gc.collect = lambda generation=2: 0  # as the `synthetic` fixture: a synthetic point frees nothing
    sys.exit(main())
