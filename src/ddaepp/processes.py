"""Several training processes on one machine: `accelerate launch` with every setting explicit (its
own config file, a free port per job), and every rank's output streamed into the job's log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free now, for the processes' rendezvous: two jobs on one node never share one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(processes: int, precision: str, work_dir: Path) -> list[str]:
    """`accelerate launch` on one machine with every setting explicit, reading its own config file
    (written here) instead of the user's ~/.cache/huggingface/accelerate/default_config.yaml."""
    import yaml

    port = free_port()
    settings = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
                "machine_rank": 0, "num_processes": processes, "main_process_ip": "127.0.0.1",
                "main_process_port": port, "mixed_precision": precision, "gpu_ids": "all", "use_cpu": False,
                "rdzv_backend": "static", "same_network": True, "dynamo_config": {"dynamo_backend": "NO"},
                "debug": False}
    config_file = work_dir / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    # --multi_gpu starts `processes` ranks; on device cpu the script's Accelerator(cpu=True) makes them gloo ranks
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--multi_gpu",
            "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--num_processes", str(processes), "--mixed_precision", precision,
            "--dynamo_backend", "no"]


def run_streaming(cmd: list[str]) -> None:
    """Run `cmd`, copying every rank's stdout and stderr (bars, losses, tracebacks) to ours, which
    inside a workflow job is the rule's log file; a failure raises with the exit status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while chunk := os.read(proc.stdout.fileno(), 65536):
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)
