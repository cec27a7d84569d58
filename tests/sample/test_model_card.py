"""`nas export-pipeline` writes README.md, a model card with the Hugging Face Hub's metadata that
huggingface_hub parses (offline), stating the architecture, cost, training, and the latency and
evaluation figures when given; nothing is uploaded."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from nas.cli import main
from nas.cost.measure import arch_cost
from nas.space import load_arch


def test_pipeline_folder_has_a_hub_model_card(sample_world, tmp_path):
    search_card = tmp_path / "card.json"
    search_card.write_text(json.dumps({"latency_ms_p50": 8.5, "latency_ms_p90": 10.9, "batch": 2,
                                       "latency_device": "AMD EPYC", "latency_source": "measure",
                                       "study": "s", "trial": 4}))  # fmt: skip
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"results": [{"steps": 30, "alignment": 0.538, "frechet_distance": 1688.6}],
                                  "reference": {"real_alignment": 0.969}}))  # fmt: skip
    out = tmp_path / "pipe"
    argv = ["export-pipeline", str(sample_world.run_flex), "--out", str(out), "--search-card", str(search_card),
            "--eval", str(report)]  # fmt: skip
    assert main(argv) == 0
    card = ModelCard.load(out / "README.md")  # the Hub's own parser: YAML metadata + text
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "custom-code" in card.data.tags and card.data.get("base_model") is None  # no Hub teacher
    cost = arch_cost(load_arch(sample_world.run_flex / "arch.yaml"))
    text = card.text
    assert f"{cost['params']:,} parameters" in text and "FlexUNet2DConditionModel" in text
    assert "trust_remote_code=True" in text and "unet/flex_unet.py" in text
    assert "8.50 ms per U-Net call (p90 10.90 ms), batch 2, on AMD EPYC" in text
    assert "| 30 | 0.538 | 1688.6 |" in text and "Real images score alignment 0.969" in text


def test_card_of_a_stock_run_without_figures(sample_world, tmp_path):
    out = tmp_path / "pipe"
    assert main(["export-pipeline", str(sample_world.run_stock), "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert "custom-code" not in card.data.tags and "trust_remote_code" not in card.text
    assert "## Latency" not in card.text and "## Evaluation" not in card.text  # nothing found beside it
    assert "## Training" in card.text and "v_prediction" in card.text
