"""The Ray engine on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a
raylet per node, as `ray start` makes): a head and a worker that train (1 CPU each) and a latency
node that declares `accelerator_type:A10G` (what Ray declares on a real A10G node) and no CPU, as
the README tells a user to start a dedicated latency node. Every wait below waits for a state; its
deadline only guards against a hang. The cluster tests are `slow` (`make test-slow`): about 8
minutes together on a loaded 2-core machine, most of it Ray start-up and node-death detection."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.search.ray_backend import RaySettings, latency_node_warnings, latency_resources, run_ray_search
from nas.search.study import SearchSettings, load_study

ROOT = Path(__file__).resolve().parents[2]
HANG = 600.0  # seconds: only a hang takes this long
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def test_latency_task_takes_the_whole_accelerator_token_and_no_cpu():
    assert latency_resources("A10G", "cpu") == {
        "num_cpus": 0,
        "num_gpus": 0,
        "resources": {"accelerator_type:A10G": 1.0},
    }
    assert latency_resources("A10G", "cuda:0")["num_gpus"] == 1


def test_a_latency_node_offering_cpus_is_warned_about():
    nodes = [
        {"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 4.0, "accelerator_type:A10G": 1.0}},
        {"NodeID": "b" * 56, "Alive": True, "Resources": {"accelerator_type:A10G": 1.0, "GPU": 1.0}},
        {"NodeID": "c" * 56, "Alive": True, "Resources": {"CPU": 8.0}},
        {"NodeID": "d" * 56, "Alive": False, "Resources": {"CPU": 4.0, "accelerator_type:A10G": 1.0}},
    ]
    (line,) = latency_node_warnings(nodes, "A10G")
    assert "aaaaaaaaaaaa" in line and "--num-cpus=0" in line


@pytest.fixture(scope="module")
def cluster():
    """Head + worker (trainers) + latency node; shut down even when a test fails."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = c.add_node(num_cpus=1)
        latency = c.add_node(num_cpus=0, resources={"accelerator_type:A10G": 1})
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield {"cluster": c, "head": c.head_node.node_id, "worker": worker, "latency": latency.node_id}
    finally:
        ray.shutdown()
        c.shutdown()


def settings(space, cache, results, study, trials):
    return SearchSettings(
        space=str(space), study=study, trials=trials, cache=str(cache), results=str(results), workers=2
    )


def states(trials) -> list:
    return [(t.state.name, t.user_attrs.get("error")) for t in trials]


def assert_placement(trials, nodes):
    for t in trials:
        assert t.user_attrs["latency_node"] == nodes["latency"], t.number
        assert t.user_attrs["train_node"] != nodes["latency"], t.number


@pytest.mark.slow  # a 3-node cluster and three studies: minutes on 2 cores
def test_latency_on_the_a10g_node_training_elsewhere_then_export(cluster, search_cache, space_file, tmp_path):
    results = tmp_path / "results"
    argv = ["search", str(space_file("ray")), "--study", "c", "--trials", "4", "--workers", "2"]
    argv += ["--cache", str(search_cache), "--results", str(results), "--backend", "ray", "--quiet"]
    argv += ["--ray-address", cluster["cluster"].address, "--latency-accelerator", "A10G"]
    assert main(argv) == 0
    trials = load_study("c", results=str(results)).get_trials()
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials), states(trials)
    assert_placement(trials, cluster)
    assert {t.user_attrs["train_node"] for t in trials} <= {cluster["head"], cluster["worker"].node_id}
    out = tmp_path / "export"
    assert main(["export", "--study", "c", "--results", str(results), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


def finished_numbers(study) -> set[int]:
    return {t.number for t in study.get_trials() if t.state in FINISHED}


@pytest.mark.slow  # a 3-node cluster and three studies: minutes on 2 cores
def test_killed_driver_resumes_with_tuner_restore(cluster, search_cache, space_file, tmp_path):
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "nas", "search", str(space_file("ray")), "--study", "d", "--trials", "4"]
    argv += ["--workers", "2", "--cache", str(search_cache), "--results", str(results), "--backend", "ray"]
    argv += ["--quiet", "--ray-address", cluster["cluster"].address, "--latency-accelerator", "A10G"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + HANG
        while driver.poll() is None and time.monotonic() < deadline:
            if (results / "d" / "ray" / "owner.json").exists() and finished_numbers(
                load_study("d", results=str(results))
            ):
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]  # killed mid-study
        driver.kill()  # SIGKILL: no cleanup of any kind
    finally:
        driver.kill()
        driver.wait()
    before = finished_numbers(load_study("d", results=str(results)))
    assert 0 < len(before) < 4
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=HANG)
    (tmp_path / "rerun.log").write_text(rerun.stderr)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trials = load_study("d", results=str(results)).get_trials()
    # Tuner.restore continued the same experiment to four finished trials; a trial the killed driver
    # started after Tune last saved its state is failed (not left RUNNING) and drawn again.
    finished = [t for t in trials if t.state in FINISHED]
    orphans = [t for t in trials if t.state not in FINISHED]
    assert len(finished) == 4, states(trials)
    assert all(t.state == TrialState.FAIL and "error" not in t.user_attrs for t in orphans)
    study = load_study("d", results=str(results))
    assert sorted(t.number for t in orphans) == study.user_attrs.get("orphaned_trials", [])
    assert before <= finished_numbers(load_study("d", results=str(results)))
    assert_placement(finished, cluster)


def trial_actor_on(node_id: str) -> bool:
    from ray._private import state

    return any(
        a["State"] == "ALIVE" and a["Address"]["NodeID"] == node_id and "ImplicitFunc" in a["ActorClassName"]
        for a in state.actors().values()
    )


@pytest.mark.slow  # a 3-node cluster and three studies: minutes on 2 cores
def test_worker_node_killed_mid_study_loses_no_trial(cluster, search_cache, space_file, tmp_path):
    """Last in this module: the worker node is gone afterwards."""
    results = tmp_path / "results"
    run = settings(space_file("ray"), search_cache, results, "k", trials=5)
    worker = cluster["worker"]
    seen: dict = {}

    def kill_worker_when_it_trains() -> None:
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            started = (results / "k" / "ray" / "owner.json").exists()  # the study exists: read it
            done = finished_numbers(load_study("k", results=str(results))) if started else set()
            if done and trial_actor_on(worker.node_id):
                seen["before"] = {n for n in done}
                cluster["cluster"].remove_node(worker, allow_graceful=False)  # SIGKILL its raylet
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_worker_when_it_trains, daemon=True)
    killer.start()
    grid = run_ray_search(
        run, RaySettings(address=cluster["cluster"].address, latency_accelerator="A10G"), True
    )
    killer.join(timeout=HANG)
    assert "before" in seen, "no trial ran on the worker node after one had finished"
    trials = load_study("k", results=str(results)).get_trials()
    # Tune retried the trial the lost node was running (FailureConfig); none errored or got lost.
    assert grid.num_errors == 0
    assert len(trials) == 5 and all(t.state in FINISHED for t in trials), states(trials)
    assert seen["before"] <= finished_numbers(load_study("k", results=str(results)))
    assert_placement(trials, cluster)
