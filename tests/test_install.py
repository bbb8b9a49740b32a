"""A plain (not editable) install works: the wheel carries every data file the package reads.

The wheel is built without build isolation (no network), installed with --no-deps into a fresh
venv whose dependencies come from this environment's site-packages through a .pth path line
(which, unlike the site dir itself, does not run this environment's editable-install hook), and
`ddaepp validate` is run from that install on both shipped configs.
"""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path


def run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_and_validates_both_configs(repo, tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(Path(repo) / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(Path(repo) / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         source])
    wheel = next((tmp_path / "dist").glob("ddaepp-*.whl"))
    tracked = run(["git", "-C", repo, "ls-files", "src/ddaepp"]).split()
    data_files = {Path(f).name for f in tracked if not f.endswith(".py")}
    packaged = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("ddaepp/")}
    assert data_files and data_files <= packaged, data_files - packaged

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin/python"
    venv_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (venv_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    where = run([python, "-c", "import ddaepp; print(ddaepp.__file__)"], cwd=tmp_path).strip()
    assert where.startswith(str(venv_site)), where

    for folder in ("data/imagenet/train", "data/imagenet/val", "weights"):  # stand-ins for the paper's inputs
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    import numpy as np
    import torch

    for name in ("vavae-imagenet256-f16d32-dinov2.pt", "weights-inception-2015-12-05-6726825d.pth"):
        torch.save({"stand-in": torch.zeros(1)}, tmp_path / "weights" / name)  # validation refuses empty files
    np.savez(tmp_path / "weights/VIRTUAL_imagenet256_labeled.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    for config in (Path(repo) / "config.yaml", Path(repo) / "config/imagenet-dit-b.yaml"):
        out = run([venv / "bin/ddaepp", "validate", config], cwd=tmp_path)
        assert "uncond-baseline" in out, out
