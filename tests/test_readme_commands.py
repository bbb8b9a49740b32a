"""Every `snakemake ...` and `ddaepp ...` command the README shows runs as written.

Commands come from the README's code blocks and inline code. They run in a fresh working
directory that sees the repository's workflow, configs and profile, with small real stand-ins
where the paper config expects ImageNet and weights (data/imagenet, weights/...). Snakemake
commands run as dry runs (`-n` appended): none may crash or fail. A `--report` of a run that has
built nothing may only fail with Snakemake's "does not exist" (the README says to name finished
targets then; tests/test_e2e.py opens a real report in Chromium).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from standins import make_imagefolder, make_vavae_checkpoint

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND = re.compile(r"^(?:\.venv/bin/)?(snakemake|ddaepp) \S")  # a bare name is a mention


def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"^\s*```[a-z]*\n(.*?)^\s*```", text, re.M | re.S)
    prose = re.sub(r"^\s*```[a-z]*\n.*?^\s*```", "", text, flags=re.M | re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`([^`\n]+)`", prose)
    commands = []
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line.strip())  # a trailing comment
        for part in line.split("&&"):
            part = " ".join(part.split()).removeprefix(".venv/bin/")  # the same command either way
            if COMMAND.match(part) and part not in commands:
                commands.append(part)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkout's view with the paper config's data and weights paths filled by stand-ins."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("Snakefile", "workflow", "config.yaml", "config", "slurm", "tests"):
        (root / name).symlink_to(REPO / name)
    make_imagefolder(root / "data/imagenet", image_size=64)
    (root / "weights").mkdir()
    make_vavae_checkpoint(root / "weights/vavae-imagenet256-f16d32-dinov2.pt")
    import torch

    torch.save({"stand-in": torch.zeros(1)}, root / "weights/weights-inception-2015-12-05-6726825d.pth")
    # the DAG records a digest of the reference's mu and sigma, so the stand-in holds both
    np.savez(root / "weights/VIRTUAL_imagenet256_labeled.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    return root


def test_the_readme_shows_the_commands_people_run():
    assert any("--profile slurm" in c and "imagenet-dit-b" in c for c in COMMANDS)
    assert any(c.startswith("ddaepp ") for c in COMMANDS)
    assert len(COMMANDS) >= 8, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(workdir, command):
    program, *args = shlex.split(command)
    tool = Path(program).name
    if tool == "snakemake" and not {"-n", "--dry-run", "--unlock", "--report"} & set(args):
        args.append("-n")
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=workdir, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    if "--report" in args and proc.returncode:
        assert re.search(r"File results/\S+ marked for report but does not exist", out), out[-3000:]
        return
    assert proc.returncode == 0, out[-3000:]
