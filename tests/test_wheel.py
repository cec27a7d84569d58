"""A user who installs the wheel (not the checkout) gets the presets and the shipped model code:
build the wheel, install it into a fresh venv with no network (--no-deps; the dependencies come
from this test venv's site-packages through a .pth line), and run commands from outside the checkout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `nas` console script of a venv holding only the wheel (the dependencies are shared)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    shutil.copytree(ROOT / "nas", source / "nas", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")],
                   check=True, capture_output=True, cwd=tmp)  # fmt: skip
    wheel = next((tmp / "dist").glob("nas-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # the test venv's packages (torch, diffusers, ...) after the venv's own: a path line, not a
    # site dir, so the checkout's editable-install hook in there is not run
    (Path(purelib) / "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    return venv / "bin" / "nas"


def run(nas: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(nas), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_wheel_is_what_runs(installed, tmp_path):
    python = installed.parent / "python"
    where = subprocess.run([python, "-c", "import nas; print(nas.__file__)"], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout  # fmt: skip
    assert str(ROOT) not in where and "site-packages" in where


def test_train_preset_from_the_wheel(installed, tmp_path):
    done = run(installed, "train", "tiny", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["resolved_config"]
    # nas/train/presets/tiny.yaml over decidiffusion.yaml over the defaults
    assert resolved["name"] == "tiny" and resolved["max_steps"] == 300
    assert resolved["diffusion"]["prediction"] == "v_prediction"


def test_inspect_a_shipped_architecture_from_the_wheel(installed, tmp_path):
    done = run(installed, "inspect", str(ROOT / "search_spaces/archs/sd15.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "859.52M" in done.stdout  # SD 1.5's U-Net: 859,520,964 parameters


def test_old_preset_path_names_the_new_place(installed, tmp_path):
    (tmp_path / "experiments").mkdir()
    done = run(installed, "train", "experiments/train_tiny.yaml", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("use the preset name 'tiny' (nas/train/presets/tiny.yaml)")
    )
