"""`nas run` on a user's own captioned folder (issue #32): the plan trains an evaluator on the latent
cache and evaluates with it, offline; stages after `train` can be skipped; evaluation's
prerequisites are checked before the first stage; the quickstart plan keeps its fingerprints."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from nas.cli import main
from tests.pipeline.test_pipeline import _fake_execute, stage_states, tiny_experiment, write

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 215, 40),
           "black": (0, 0, 0), "white": (255, 255, 255)}  # fmt: skip
KINDS = ("stripes", "gradient", "checkerboard", "rings")


def _draw(kind: str, fg: str, bg: str, size: int, i: int) -> tuple[Image.Image, str]:
    """One image of a pattern in two colours, and its caption."""
    a, b = COLOURS[fg], COLOURS[bg]
    image = Image.new("RGB", (size, size), b)
    draw = ImageDraw.Draw(image)
    if kind == "stripes":
        width, vertical = 2 + i % 3, i % 2 == 0
        for k in range(0, size, 2 * width):
            box = (k, 0, k + width - 1, size) if vertical else (0, k, size, k + width - 1)
            draw.rectangle(box, fill=a)
        text = f"{'thin' if width == 2 else 'wide'} {fg} and {bg} {'vertical' if vertical else 'horizontal'} stripes"
    elif kind == "gradient":
        for x in range(size):
            t = x / (size - 1)
            draw.line(
                (x, 0, x, size), fill=tuple(round(p * (1 - t) + q * t) for p, q in zip(a, b, strict=True))
            )
        text = f"a gradient from {fg} on the left to {bg} on the right"
    elif kind == "checkerboard":
        cell = size // 4
        for y in range(4):
            for x in range(4):
                if (x + y) % 2 == 0:
                    draw.rectangle((x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1), fill=a)
        text = f"a {fg} and {bg} checkerboard"
    else:
        centre = size // 2
        for r in range(centre, 0, -4):
            draw.ellipse((centre - r, centre - r, centre + r, centre + r), outline=a, width=2)
        text = f"{fg} rings on a {bg} background"
    return image, text


def make_own_folder(folder: Path, n: int = 48, size: int = 32) -> Path:
    """A captioned image folder that is not `shapes`: PNGs + metadata.jsonl (file_name, text)."""
    folder.mkdir(parents=True)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        fg, bg = names[i % 4], names[4 + (i // 4) % 2]
        image, text = _draw(kind, fg, bg, size, i // len(KINDS))
        image.save(folder / f"img_{i:03d}.png")
        lines.append(json.dumps({"file_name": f"img_{i:03d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def folder_experiment(tmp_path: Path, **changes) -> dict:
    """The tiny experiment of test_pipeline.py on a generated folder instead of `shapes`."""
    data = tmp_path / "my_images"
    if not data.exists():
        make_own_folder(data)
    exp = tiny_experiment(tmp_path, data={"path": "my_images", "evaluator": {"steps": 30}})
    exp["sample"] = {"steps": 2, "n": 1}  # default prompts: captions held out of training
    exp.update(changes)
    return exp


def plan_lines(capsys) -> dict[str, str]:
    """`nas run --dry-run` output as {stage: its block of lines}."""
    blocks: dict[str, str] = {}
    name = ""
    for line in capsys.readouterr().out.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = ""
        blocks[name] += line + "\n"
    return blocks


def test_folder_plan_trains_an_evaluator_on_the_cache_and_evaluates_with_it(tmp_path, capsys):
    path = write(tmp_path, folder_experiment(tmp_path))
    results = tmp_path / "r"
    assert main(["run", path, "--results", str(results), "--dry-run"]) == 0
    plan = plan_lines(capsys)
    assert list(plan) == ["data", "vae", "precompute", "evaluator", "search", "export", "train", "sample",
                          "evaluate", "report"]  # fmt: skip
    cache, evaluator = results / "tiny" / "precompute" / "cache", results / "tiny" / "evaluator" / "evaluator"
    assert (
        f"nas data train-evaluator --out {evaluator} --cache {cache} --steps 30 --val-items 8"
        in plan["evaluator"]
    )
    assert f"--evaluator {evaluator}" in plan["evaluate"] and not results.exists()


def test_folder_plan_names_the_data_evaluator_key(tmp_path, capsys):
    path = write(tmp_path, folder_experiment(tmp_path, data={"path": "my_images", "evaluator": {"stepz": 3}}))
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: data.evaluator.stepz: unknown setting" in err, err


def test_folder_fingerprints_keep_earlier_stages_when_the_evaluator_changes(tmp_path):
    from nas.pipeline.plan import fingerprint, plan
    from nas.pipeline.runner import load_experiment

    def prints(exp: dict) -> dict[str, str]:
        loaded = load_experiment(write(tmp_path, exp))
        stages = plan(loaded, tmp_path / "exp.yaml", tmp_path / "r")
        fingerprint(stages, loaded)
        return {s.name: s.fingerprint for s in stages}

    before = prints(folder_experiment(tmp_path))
    after = prints(folder_experiment(tmp_path, data={"path": "my_images", "evaluator": {"steps": 31}}))
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["evaluate", "evaluator", "report"]


# The quickstart plan's fingerprints (from the repository root, `--results results`, as `make demo`
# runs it), taken before issue #32's pipeline changes: a user's `make demo` after an upgrade skips
# every finished stage only while these hold. Changed quickstart.yaml or its space on purpose? Then
# update them: every `make demo` reruns from the first stage whose fingerprint changed.
QUICKSTART_FINGERPRINTS = {
    "data": "b4ab4e051cdb7e2f",
    "vae": "70d5d3e5cb8e29e1",
    "precompute": "6e18b31087fa81e8",
    "search": "da660e4ba99a8575",
    "export": "42947bebdb5c14eb",
    "train": "e8d79e0c20f2f569",
    "sample": "6331b539f7aa1fdf",
    "evaluate": "c413f19c0a2171df",
    "report": "daf5b000ecbee15a",
}


def test_quickstart_plan_keeps_its_fingerprints(monkeypatch):
    from nas.pipeline.plan import fingerprint, plan
    from nas.pipeline.runner import load_experiment

    monkeypatch.chdir(ROOT)
    exp = load_experiment("experiments/quickstart.yaml")
    stages = plan(exp, Path("experiments/quickstart.yaml"), Path("results"))
    fingerprint(stages, exp)
    assert {s.name: s.fingerprint for s in stages} == QUICKSTART_FINGERPRINTS


SKIPS = [  # section -> the stages planned, and those shown as not run
    ({"evaluate": {"skip": True}}, ["evaluator", "evaluate"]),
    ({"sample": {"skip": True}}, ["sample"]),
    ({"report": {"skip": True}, "sample": {"skip": True}}, ["sample", "report"]),
]


@pytest.mark.parametrize(("change", "skipped"), SKIPS, ids=["evaluate", "sample", "sample+report"])
def test_skipped_stages_are_shown_and_not_planned(tmp_path, capsys, change, skipped):
    path = write(tmp_path, folder_experiment(tmp_path, **change))
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    plan = plan_lines(capsys)
    shown = sorted(name for name, block in plan.items() if block.split()[1] == "skip")
    assert shown == sorted(skipped)
    for name in skipped:
        assert "not run (" in plan[name] and "nas " not in plan[name]
    assert "nas train " in plan["train"] and "nas search " in plan["search"]


def test_skipped_evaluate_still_reports_and_drops_old_figures(tmp_path, monkeypatch):
    """A run evaluated before, then rerun with `evaluate: {skip: true}`: the report and the summary
    complete; the earlier evaluation's folder stays as it was but its figures leave the summary."""
    from nas.pipeline import runner

    monkeypatch.setattr(runner, "_execute", _fake_execute)
    results = tmp_path / "results"
    assert main(["run", write(tmp_path, tiny_experiment(tmp_path)), "--results", str(results)]) == 0
    root = results / "tiny"
    summary = json.loads((root / "summary.json").read_text())
    assert (root / "eval.json").is_file() and "alignment_accuracy_2_steps" in summary
    first = stage_states(results)
    path = write(tmp_path, tiny_experiment(tmp_path, evaluate={"skip": True, "steps": [2, 3], "n": 4}))
    assert main(["run", path, "--results", str(results)]) == 0
    after = stage_states(results)
    for stage in ("data", "vae", "precompute", "search", "export", "train", "sample", "evaluate"):
        assert after[stage] == first[stage]  # skip: true changes nothing upstream, and deletes nothing
    assert after["report"]["done"] and after["report"]["fingerprint"] != first["report"]["fingerprint"]
    summary = json.loads((root / "summary.json").read_text())
    assert "best_params" in summary and not any(k.startswith("alignment") for k in summary)
    assert not (root / "eval.json").exists() and "evaluate" not in summary["stage_seconds"]
    run = json.loads((root / "run.json").read_text())
    assert "evaluate" not in run["stages"] and run["seeds"]["evaluate"] is None


REFUSED = [  # (case, experiment changes, what the one line says)
    ("evaluate null", {"evaluate": None}, "evaluate: Value error, null is not a setting; to leave the stage out "
     "write `evaluate: {skip: true}`"),
    ("skip train", {"train": {"skip": True}}, "train: Value error, train cannot be skipped: every stage up to "
     "train makes the model (skip: true is for sample, evaluate, few_step, variants, report)"),
    ("skip typo", {"evaluate": {"skipp": True}}, "evaluate.skipp: unknown key"),
    ("variants need evaluate", {"evaluate": {"skip": True}, "variants": {"runs": [{"name": "raw", "reuse": "main"}]}},
     "evaluate.skip: the variants stage compares against the main run's evaluation"),
    ("evaluator flag for shapes", {"data": {"path": "my_images", "evaluator": {"size": 16}}},
     "data.evaluator: --size: not with --cache"),
    ("missing evaluator", {"evaluate": {"evaluator": "no_such_evaluator"}}, "evaluate.evaluator: "),
    ("not an evaluator", {"evaluate": {"evaluator": "my_images"}}, "evaluate.evaluator: "),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "needle"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_skip_or_evaluator_is_one_line_before_the_first_stage(tmp_path, capsys, case, change, needle):
    path = write(tmp_path, folder_experiment(tmp_path, **change))
    results = tmp_path / "r"
    assert main(["run", path, "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: " in err and needle in err, err
    assert not results.exists()


def test_given_evaluator_replaces_the_evaluator_stage(tmp_path, capsys):
    made = tmp_path / "old_evaluator"
    made.mkdir()
    (made / "evaluator.json").write_text("{}")
    path = write(
        tmp_path, folder_experiment(tmp_path, evaluate={"evaluator": "old_evaluator", "steps": [2], "n": 4})
    )
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    plan = plan_lines(capsys)
    assert "evaluator" not in plan and f"--evaluator {made}" in plan["evaluate"]


def test_evaluation_without_anything_to_measure_with_names_the_key(tmp_path):
    from nas.commands import eval
    from nas.core.errors import NasError
    from nas.pipeline.check import check_evaluation

    settings = eval.Settings(run=str(tmp_path / "run"))
    with pytest.raises(NasError, match=r"^exp.yaml: evaluate.evaluator: not set, and nothing else"):
        check_evaluation(settings, tmp_path / "r", lambda field: f"exp.yaml: evaluate.{field}")


def test_own_data_example_plans(monkeypatch, tmp_path, capsys):
    """The example of docs/own-data.md plans as shipped once its folder exists."""
    text = (ROOT / "experiments" / "own_data_example.yaml").read_text()
    exp = yaml.safe_load(text)
    make_own_folder(tmp_path / exp["data"]["path"], n=12)
    (tmp_path / "own_data_example.yaml").write_text(
        text.replace("../search_spaces/", f"{ROOT}/search_spaces/")
    )
    assert (
        main(["run", str(tmp_path / "own_data_example.yaml"), "--results", str(tmp_path / "r"), "--dry-run"])
        == 0
    )
    plan = plan_lines(capsys)
    assert "evaluator" in plan and "nas data train-evaluator" in plan["evaluator"]


def test_own_data_page_shows_the_shipped_example():
    page = (ROOT / "docs" / "own-data.md").read_text()
    block = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    shipped = (ROOT / "experiments" / "own_data_example.yaml").read_text()
    assert yaml.safe_load(block) == yaml.safe_load(shipped)


@pytest.fixture
def no_network(monkeypatch):
    """Offline as a user without internet: the hub told so, and any socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(self, address, *args, **kwargs):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


# about 20 s on a quiet 2-core machine, about a minute beside other jobs: in the fast suite, as the
# whole flow on a user's folder is what a newcomer runs first
def test_own_folder_end_to_end_offline(tmp_path, no_network, capsys):
    results = tmp_path / "results"
    path = write(tmp_path, folder_experiment(tmp_path))
    assert main(["run", path, "--results", str(results)]) == 0
    states = stage_states(results)
    assert sorted(states) == sorted(["data", "vae", "precompute", "evaluator", "search", "export", "train",
                                     "sample", "evaluate", "report"])  # fmt: skip
    assert all(s["done"] for s in states.values())
    root = results / "tiny"
    report = json.loads((root / "eval.json").read_text())
    assert report["evaluator"] == "evaluator/evaluator" and {r["steps"] for r in report["results"]} == {2, 3}
    for row in report["results"]:
        assert 0 <= row["alignment"] <= 1 and row["frechet_distance"] >= 0
    summary = json.loads((root / "summary.json").read_text())
    assert "alignment_accuracy_3_steps" in summary and "domain_fid_3_steps" in summary
    assert (root / "pareto.png").is_file() and (root / "grid.png").is_file()
    # the VAE this experiment trained: its pictures and verdict beside the U-Net's results
    assert (root / "vae_reconstructions.png").is_file() and (root / "vae_psnr.png").is_file()
    assert summary["vae_verdict"].startswith("vae verdict: ") and isinstance(summary["vae_usable"], bool)
    assert summary["vae_val_psnr_db"] > 0
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    # The same experiment with `evaluate: {skip: true}`: nothing upstream reruns, the report completes.
    capsys.readouterr()
    path = write(tmp_path, folder_experiment(tmp_path, evaluate={"skip": True, "steps": [2, 3], "n": 4}))
    assert main(["run", path, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "evaluate: not run (evaluate: {skip: true})" in out and "evaluator: not run" in out
    after = stage_states(results)
    for stage in ("data", "vae", "precompute", "search", "export", "train", "sample"):
        assert after[stage] == states[stage]
    assert after["report"]["done"] and after["report"]["fingerprint"] != states["report"]["fingerprint"]
    assert not (root / "eval.json").exists() and "alignment_accuracy_3_steps" not in json.loads(
        (root / "summary.json").read_text()
    )
