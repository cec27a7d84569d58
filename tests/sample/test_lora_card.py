"""A `lora:` run of `nas train` gets its own model card (README.md): huggingface_hub parses it, the
Hub metadata (library_name, tags, base_model only as a Hub id) and the adapter's figures are there."""

from __future__ import annotations

import json

from nas.cli import main
from nas.sample.card import lora_card


def test_lora_run_has_a_hub_model_card(sample_world, tmp_path, capsys):
    from huggingface_hub import ModelCard

    run = tmp_path / "lora-run"
    argv = ["train", "tiny", "--cache", str(sample_world.cache), "--out", str(run), "--max-steps", "2",
            "--quiet", "--set", "val_items=8", "val_timesteps=1", "batch_size=4", "ema=null",
            f"lora.init_from={sample_world.run_flex}", "lora.rank=2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    card = ModelCard.load(run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"lora", "text-to-image"} <= set(data["tags"])
    assert "base_model" not in data  # a local run folder: the Hub takes only repository ids there
    info = json.loads((run / "lora.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    text = card.text
    assert "| rank | 2 |" in text and "| alpha | 2.0 |" in text
    assert "`to_q`, `to_k`, `to_v`, `to_out.0`" in text
    assert f"{info['trainable_params']:,} of {info['total_params']:,}" in text
    assert f"{summary['val_loss_start']:.4g} before" in text and f"{summary['val_loss']:.4g} after" in text
    assert str(sample_world.run_flex) in text and "Steps: 2," in text

    named = ModelCard(lora_card(run, base_model="someone/quickstart-pipeline")).data.to_dict()
    assert named["base_model"] == "someone/quickstart-pipeline"
    assert 'from_pretrained("someone/quickstart-pipeline"' in lora_card(run, "someone/quickstart-pipeline")
