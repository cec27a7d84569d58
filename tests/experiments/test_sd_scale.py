"""experiments/studies/sd_scale.py at test size: the same stages (parts, 1 precompute, 2 inherit,
3 train with distill and gradient checkpointing, 4 sample / export-pipeline / a plain diffusers
pipeline, 5 export-onnx with external data forced, 6 latency table and its validation) on tiny parts,
run in this process; the whole command with its per-stage processes is the slow test. The SD-size
run is results/sd_scale/."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.studies import sd_parts, sd_scale


def test_sd_configs_have_sd15_sizes():
    """The SD parts are SD 1.5's: VAE 83,653,863 and CLIP text tower 123,060,480 parameters
    (runwayml/stable-diffusion-v1-5), built on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(**sd_parts.SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(**sd_parts.SD_TEXT))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 123_060_480


def test_offline_bpe_tokenizer_merges_caption_words(tmp_path):
    from transformers import AutoTokenizer

    captions = ["a big red circle in the centre", "a small blue square top left"] * 5
    size = sd_parts.save_tokenizer(tmp_path, captions, max_length=77)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(tokenizer).__name__ == "CLIPTokenizer" and len(tokenizer) == size
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red circle xyz").input_ids)
    # learned words are single tokens; an unseen word falls back to bytes, never to <unk>
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "x", "y", "z</w>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny SD folders and the 8-image cache (stages parts and 1)."""
    work = tmp_path_factory.mktemp("sd_scale")
    figures = {name: sd_scale.run_stage(name, work, sd_scale.SMALL) for name in ("parts", "precompute")}
    return work, figures


def test_text_encoder_folder_of_an_sd_layout_finds_its_tokenizer(world):
    """A cache records an SD folder's text encoder as SD/text_encoder (no tokenizer inside); loading
    it again (nas sample, export-pipeline) must find SD/tokenizer beside it. Failed before the fix in
    nas/data/encoders.py ("Couldn't instantiate the backend tokenizer")."""
    from nas.data.encoders import load_text_encoder

    work, figures = world
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    recorded = manifest["text_encoder"]["path"]
    assert recorded.endswith("text_encoder")
    encoder = load_text_encoder(recorded, max_length=manifest["text_len"])
    assert encoder.tokenizer("a red circle").input_ids[0] == figures["parts"]["vocab"] - 2  # <|startoftext|>


def test_stage1_precompute(world):
    _, figures = world
    f = figures["precompute"]
    assert f["items"] == sd_scale.SMALL["images"] and f["latent_size"] == 8 and f["text_len"] == 32
    assert f["bytes_per_item"] > 0


def test_stages_2_to_5(world):
    """inherit, train (distill, gradient checkpointing), sample, export-pipeline, a plain diffusers
    pipeline on the export, ONNX export with external data."""
    work, _ = world
    inherit = sd_scale.run_stage("inherit", work, sd_scale.SMALL)
    assert set(inherit) == {"tiny_flex"} and (work / "inherit" / "tiny_flex").is_dir()
    train = sd_scale.run_stage("train", work, sd_scale.SMALL)
    assert train["steps"] == 3 and 0 < train["teacher_share"] < 1
    config = (work / "train" / "config.yaml").read_text()
    assert "gradient_checkpointing: true" in config and "distill:" in config
    assert sd_scale.run_stage("sample", work, sd_scale.SMALL)["size"] == [64, 64]
    assert sd_scale.run_stage("export_pipeline", work, sd_scale.SMALL)["bytes"] > 0
    plain = sd_scale.run_stage("diffusers_pipeline", work, sd_scale.SMALL)
    assert plain["class"] == "StableDiffusionPipeline" and plain["size"] == [64, 64]
    onnx = sd_scale.run_stage("export_onnx", work, sd_scale.SMALL)
    assert onnx["external_data"] == "unet.onnx.data" and onnx["data_bytes"] > onnx["graph_bytes"] / 10
    assert onnx["max_abs_diff"] <= onnx["tolerance"]


def test_stage6_latency_table_and_validation(world):
    work, _ = world
    table = sd_scale.run_stage("latency_table", work, sd_scale.SMALL)
    assert table["blocks"] > 0 and table["setup"]["batch"] == 2 and table["fit_networks"] == 2
    check = sd_scale.run_stage("table_validation", work, sd_scale.SMALL)
    assert check["count"] == 3 and -1 <= check["spearman"] <= 1 and len(check["rows"]) == 3
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in check["rows"])


@pytest.mark.slow  # reason: 10 child processes, each importing torch and diffusers (~2 min on 2 cores)
def test_command_runs_every_stage_in_its_own_process(tmp_path):
    data = sd_scale.main(["--small", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert list(data["stages"]) == sd_scale.STAGES
    for name, row in data["stages"].items():
        assert row["exit_code"] == 0 and "figures" in row, (name, row.get("error"))
        assert row["wall_s"] > 0 and 0.05 < row["peak_rss_gib"] < 8, (name, row)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("\n") == len(sd_scale.STAGES) + 2 and "FAILED" not in table
    again = sd_scale.main(["--small", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert again["stages"] == data["stages"]  # a rerun skips finished stages
