"""experiments/benchmarks/gpu_check.py in --smoke mode (CPU, tiny architectures and space, 8x8
latents, 2 steps): every section through the same code the GPU run takes, so the script cannot rot."""

from __future__ import annotations

import json

from experiments.benchmarks import gpu_check


def test_smoke_run_writes_every_section(tmp_path):
    out = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    assert out.parent == tmp_path and out.name == gpu_check.slug(out.name)
    data = json.loads((out / "results.json").read_text())
    assert data["smoke"] and data["device"]["torch"] and "diffusers" in data["device"]
    sections = data["sections"]
    assert [sections[s]["status"] for s in ("latency", "train", "table")] == ["done"] * 3, sections

    rows = {(r["arch"], r["runtime"]): r for r in sections["latency"]["rows"]}
    for arch in ("tiny_stock", "tiny_flex"):
        assert rows[(arch, "eager")]["ms_p50"] > 0 and rows[(arch, "onnxruntime")]["ms_p50"] > 0
        assert "needs --device cuda" in rows[(arch, "cudagraphs")]["skipped"]  # recorded, not measured
    assert sections["latency"]["archs"]["tiny_flex"]["class"] == "FlexUNet2DConditionModel"

    train = sections["train"]
    assert train["steps"] == 2 and train["step_s"] > 0 and 0 < train["teacher_share"] < 1
    assert train["gradient_checkpointing"] and train["latent_size"] == 8

    table = sections["table"]
    assert table["blocks"] > 0 and (out / table["table"]).is_file()
    assert table["validation"]["count"] == 3 and -1 <= table["validation"]["spearman"] <= 1

    readme = (out / "README.md").read_text()
    assert "| tiny_stock |" in readme and "Spearman rho" in readme and "s/step" in readme


def test_out_of_time_sections_still_write_results(tmp_path):
    """A section that runs out of its budget is recorded as stopped with what it finished, and the
    next section still runs: one device run always yields results."""
    out = gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "latency", "table",
                          "--scale-budgets", "0.02"])  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    statuses = {name: s["status"] for name, s in data["sections"].items()}
    assert set(statuses) == {"latency", "table"}
    assert all(s == "done" or s.startswith("stopped: out of its") for s in statuses.values()), statuses
    assert any(s.startswith("stopped") for s in statuses.values()), statuses
    assert "## latency" in (out / "README.md").read_text()


def test_units_put_eager_first_and_pair_compiled_runs():
    order = gpu_check.units(gpu_check.GPU)
    assert len(order) == len(gpu_check.GPU.archs) * len(gpu_check.GPU.arms)
    assert [u[0] for u in order[:5]] == ["eager"] * 5
    assert order[5:7] == [("cudagraphs", "fp16", "sd15"), ("compile", "fp16", "sd15")]
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
