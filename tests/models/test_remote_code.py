"""Saved FlexUNet folders ship their code: plain diffusers loads them on a machine without `nas`.

One subprocess (same interpreter, `-I`, cwd outside the repo, `nas` made unimportable by a
`sys.meta_path` finder) loads an exported pipeline folder and a `nas train` model folder the ways a
diffusers user would, and writes what it got; the tests compare that with this process.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nas.models.flex_unet
from nas.models import FlexUNet2DConditionModel, ship_code
from nas.sample import SampleSettings, build_pipeline, export_pipeline, generate, jobs_for, load_run

PROMPT = "a large red circle in the centre on a white background"
STEPS, GUIDANCE, SEED = 2, 7.5, 0
# What the shipped file may import: it is loaded where only torch and diffusers are installed.
ALLOWED_IMPORTS = {"__future__", "collections", "typing", "torch", "diffusers"}

# Runs in the subprocess. argv: flex pipeline folder, stock pipeline folder, model folder, work dir,
# "block" (install the finder) or "env" (nas is simply not installed in that interpreter).
WITHOUT_NAS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockNas(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "nas" or name.startswith("nas."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    flex_dir, stock_dir, model_dir, work, how = sys.argv[1:6]
    if how == "block":
        sys.meta_path.insert(0, BlockNas())
    report = {}
    try:
        import nas  # noqa: F401
        report["import_nas"] = "imported"
    except ImportError as exc:
        report["import_nas"] = type(exc).__name__

    import torch
    from diffusers import AutoModel, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    fixed = load_file(work + "/input.safetensors")
    try:
        StableDiffusionPipeline.from_pretrained(flex_dir, local_files_only=True)
        report["untrusted"] = "loaded"
    except Exception as exc:
        report["untrusted"] = f"{type(exc).__name__}: {exc}"

    outputs = {}

    def unet_out(unet):
        with torch.no_grad():
            return unet(fixed["sample"], fixed["timestep"], fixed["text"]).sample.contiguous()

    def image(pipe, prompt):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   generator=torch.Generator().manual_seed(SEED)).images[0]
        return torch.from_numpy(out).contiguous()

    pipe = StableDiffusionPipeline.from_pretrained(flex_dir, local_files_only=True, trust_remote_code=True)
    report["flex_unet_class"] = f"{type(pipe.unet).__module__}.{type(pipe.unet).__name__}"
    outputs["flex_unet"] = unet_out(pipe.unet)
    outputs["flex_image"] = image(pipe, PROMPT)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True)
    report["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    outputs["model_unet"] = unet_out(model)
    component = AutoModel.from_pretrained(flex_dir + "/unet", trust_remote_code=True, local_files_only=True)
    outputs["component_unet"] = unet_out(component)
    try:  # model_index.json is read first and has no auto_map
        AutoModel.from_pretrained(flex_dir, subfolder="unet", trust_remote_code=True, local_files_only=True)
        report["subfolder"] = "loaded"
    except Exception as exc:
        report["subfolder"] = f"{type(exc).__name__}: {exc}"
    stock = StableDiffusionPipeline.from_pretrained(stock_dir, local_files_only=True)
    report["stock_unet_class"] = type(stock.unet).__name__
    outputs["stock_image"] = image(stock, PROMPT)
    save_file(outputs, work + f"/outputs_{how}.safetensors")
    report["modules_loaded"] = sorted(m for m in sys.modules if m == "nas" or m.startswith("nas."))
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def without_nas(sample_world, tmp_path_factory):
    """Export both runs, run WITHOUT_NAS on them; return (folders, report, outputs, fixed input)."""
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("remote_code")
    flex, stock = work / "flex_pipe", work / "stock_pipe"
    export_pipeline(sample_world.run_flex, flex)
    export_pipeline(sample_world.run_stock, stock)
    model_dir = sample_world.run_flex / "final" / "unet_ema"
    config = json.loads((model_dir / "config.json").read_text())
    size, g = config["sample_size"], torch.Generator().manual_seed(1)
    fixed = {
        "sample": torch.randn(2, config["in_channels"], size, size, generator=g),
        "timestep": torch.tensor([10, 700]),
        "text": torch.randn(2, 32, config["cross_attention_dim"], generator=g),  # 32 tokens
    }
    save_file(fixed, work / "input.safetensors")
    folders = {"flex": flex, "stock": stock, "model": model_dir, "work": work}
    report, outputs = _run_without_nas(sys.executable, folders, "block")
    return folders, report, outputs, fixed


def _run_without_nas(python: str, folders: dict[str, Path], how: str) -> tuple[dict, dict]:
    """Run WITHOUT_NAS with `python`; return its report and output tensors."""
    from safetensors.torch import load_file

    work = folders["work"]
    header = f"STEPS, GUIDANCE, SEED, PROMPT = {STEPS}, {GUIDANCE}, {SEED}, {PROMPT!r}\n"
    # -I ignores PYTHONPATH and user site-packages; HF_MODULES_CACHE is where diffusers copies the code
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / f"modules_{how}")}
    args = [str(folders[k]) for k in ("flex", "stock", "model", "work")]
    done = subprocess.run(
        [python, "-I", "-c", header + WITHOUT_NAS, *args, how],
        cwd=work,  # outside the repository: `nas` cannot come from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(work / f"outputs_{how}.safetensors")


def _unet_out(unet, fixed):
    with torch.no_grad():
        return unet(fixed["sample"], fixed["timestep"], fixed["text"]).sample


def test_flex_pipeline_loads_and_runs_without_nas(sample_world, without_nas):
    _, report, outputs, fixed = without_nas
    assert report["import_nas"] == "ModuleNotFoundError" and report["modules_loaded"] == []
    # diffusers imports the class from the copy in its modules cache, not from nas
    assert report["flex_unet_class"] == "diffusers_modules.local.flex_unet.FlexUNet2DConditionModel"
    components = load_run(sample_world.run_flex)
    assert isinstance(components.unet, FlexUNet2DConditionModel)
    ours = _unet_out(components.unet, fixed)
    assert torch.allclose(outputs["flex_unet"], ours, atol=1e-5)
    assert torch.allclose(outputs["component_unet"], ours, atol=1e-5)  # AutoModel on pipe/unet
    assert ours.abs().max() > 1e-2  # a real output, so the comparison can fail
    image = generate(components, build_pipeline(components), jobs_for([PROMPT], 1, SEED),
                     SampleSettings(steps=STEPS, guidance=GUIDANCE, batch_size=1), progress=False)  # fmt: skip
    assert torch.allclose(outputs["flex_image"], torch.from_numpy(image[0]), atol=1e-5)


def test_flex_pipeline_refused_without_trust_remote_code(without_nas):
    _, report, _, _ = without_nas
    # diffusers' own message (dynamic_modules_utils.get_cached_module_file), naming the file
    assert report["untrusted"].startswith("ValueError: The directory ")
    assert "contains custom code in flex_unet.py" in report["untrusted"]
    assert "Pass `trust_remote_code=True`" in report["untrusted"]
    # recorded, not wanted: AutoModel with subfolder= reads model_index.json, which has no auto_map
    assert report["subfolder"].startswith("ValueError: Selected model repository does not appear to have")


def test_model_folder_loads_with_automodel_without_nas(sample_world, without_nas):
    folders, report, outputs, fixed = without_nas
    assert report["model_class"] == "diffusers_modules.local.flex_unet.FlexUNet2DConditionModel"
    config = json.loads((folders["model"] / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "flex_unet.FlexUNet2DConditionModel"}
    assert (folders["model"] / "flex_unet.py").is_file() and (
        sample_world.run_flex / "final/unet/flex_unet.py"
    ).is_file()
    ours = FlexUNet2DConditionModel.from_pretrained(folders["model"]).eval()  # auto_map ignored, no warning
    assert torch.allclose(outputs["model_unet"], _unet_out(ours, fixed), atol=1e-5)


def test_stock_pipeline_needs_no_code(sample_world, without_nas):
    folders, report, outputs, _ = without_nas
    assert report["stock_unet_class"] == "UNet2DConditionModel"
    index = json.loads((folders["stock"] / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert not list(folders["stock"].rglob("*.py"))
    assert not list((sample_world.run_stock / "final" / "unet").glob("*.py"))
    assert (outputs["stock_image"] - outputs["flex_image"]).abs().max() > 1e-3  # different U-Nets


def test_shipped_file_is_the_module_itself_and_self_contained(without_nas, tmp_path):
    folders, _, _, _ = without_nas
    source = Path(nas.models.flex_unet.__file__)
    assert (folders["flex"] / "unet" / "flex_unet.py").read_bytes() == source.read_bytes()
    index = json.loads((folders["flex"] / "model_index.json").read_text())
    assert index["unet"] == ["flex_unet", "FlexUNet2DConditionModel"]
    assert json.loads((folders["flex"] / "nas_export.json").read_text())["unet_code"] == "unet/flex_unet.py"
    roots = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not shipped"
            roots.add((node.module or "").split(".")[0])
    assert roots <= ALLOWED_IMPORTS, roots - ALLOWED_IMPORTS
    from diffusers import UNet2DConditionModel

    assert ship_code(UNet2DConditionModel, tmp_path) is None and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_flex_pipeline_in_a_venv_without_nas(without_nas, tmp_path):
    """A real interpreter without `nas`: a fresh venv (no pip) whose site-packages holds one .pth
    naming this venv's site-packages. Python adds that folder to sys.path but processes no .pth file
    inside it, so the editable install of nas (a .pth finder) is not active: torch, diffusers and
    transformers import, `nas` does not, with no finder of the test's."""
    import site
    import venv

    folders, _, outputs, _ = without_nas
    packages = next(p for p in site.getsitepackages() if (Path(p) / "diffusers").is_dir())
    venv.create(tmp_path / "venv", with_pip=False)
    (purelib,) = (tmp_path / "venv" / "lib").glob("python*/site-packages")
    (purelib / "deps.pth").write_text(packages + "\n")
    report, theirs = _run_without_nas(str(tmp_path / "venv" / "bin" / "python"), folders, "env")
    assert report["import_nas"] == "ModuleNotFoundError" and report["modules_loaded"] == []
    assert report["flex_unet_class"] == "diffusers_modules.local.flex_unet.FlexUNet2DConditionModel"
    for name in ("flex_unet", "flex_image", "model_unet", "component_unet", "stock_image"):
        assert torch.allclose(theirs[name], outputs[name], atol=1e-5), name
