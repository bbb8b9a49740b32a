"""Several training processes: `accelerate launch` with every setting explicit (its own config
file, a free port per job on one machine), and every rank's output streamed into the job's log.

Across nodes (train.nodes > 1) only under Slurm: the job's command runs once, in the batch step on
the first node, and starts one launcher per node with `srun` across the allocation (`slurm_nodes`);
each launcher takes its machine rank from its Slurm step (SLURM_NODEID), the main address is the
first node of `scontrol show hostnames`, and the port is derived from the job id, so all agree.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

MACHINE_RANK = "{machine_rank}"  # in a node launcher's command: replaced by its SLURM_NODEID


def free_port() -> int:
    """A TCP port free now, for the processes' rendezvous: two jobs on one node never share one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(processes: int, precision: str, work_dir: Path, machines: int = 1,
                       main_address: str = "127.0.0.1", port: int | None = None,
                       machine_rank: str = "0") -> list[str]:
    """`accelerate launch` of `processes` processes in all over `machines` machines with every
    setting explicit, reading its own config file (written here) instead of the user's
    ~/.cache/huggingface/accelerate/default_config.yaml. One machine: a free port on the loopback."""
    import yaml

    port = free_port() if port is None else port
    settings = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": machines,
                "machine_rank": 0, "num_processes": processes, "main_process_ip": main_address,
                "main_process_port": port, "mixed_precision": precision, "gpu_ids": "all", "use_cpu": False,
                "rdzv_backend": "static", "same_network": True, "dynamo_config": {"dynamo_backend": "NO"},
                "debug": False}
    config_file = work_dir / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    # --multi_gpu starts `processes` ranks; on device cpu the script's Accelerator(cpu=True) makes them gloo ranks
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--multi_gpu",
            "--num_machines", str(machines), "--machine_rank", machine_rank, "--main_process_ip", main_address,
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


def require_slurm_nodes(nodes: int) -> None:
    """Refuse train.nodes > 1 outside a Slurm allocation of that many nodes, before any work."""
    if "SLURM_JOB_ID" not in os.environ:
        raise RuntimeError(
            f"train.nodes is {nodes}: training across nodes runs only inside a Slurm job of {nodes} nodes "
            "(one launcher per node is started with srun; outside Slurm nothing can start the other nodes' "
            "processes). Run with `--profile slurm`, or set train.nodes: 1")
    allocated = int(slurm_job()["NumNodes"].split("-")[0])
    if allocated != nodes:
        raise RuntimeError(f"train.nodes is {nodes} but Slurm job {os.environ['SLURM_JOB_ID']} holds {allocated} "
                           f"node(s): submit it through the train rule, which asks for train.nodes nodes")


def slurm_job() -> dict[str, str]:
    """This Slurm job's record (`scontrol show job`), read from Slurm: Snakemake's jobstep removes
    every SLURM_* variable but the job id from a job's environment (SLURM_JOB_NODELIST included)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", os.environ["SLURM_JOB_ID"]], check=True,
                         capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def check_partition_nodes(nodes: int, partition: str | None) -> None:
    """Refuse a node count the Slurm partition cannot give, when planning: Slurm itself accepts such
    a job and keeps it pending for ever (PartitionNodeLimit). Nothing to check without `sinfo` or
    an existing partition of that name (planning on another machine, a dry run elsewhere)."""
    if nodes <= 1 or not partition or shutil.which("sinfo") is None:
        return
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%D %s"], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if not rows:
        return
    total = sum(int(row[0]) for row in rows)
    sizes = [row[1].split("-")[-1] for row in rows]  # job sizes in nodes, e.g. 1-infinite, 1-4
    largest = [int(size) for size in sizes if size.isdigit()]  # the partition's MaxNodes per job, if set
    can_give = min([total, *largest])
    if nodes > can_give:
        raise ValueError(f"train.nodes is {nodes} but Slurm partition '{partition}' gives a job at most {can_give} "
                         f"node(s) (sinfo -p {partition}: {total} nodes"
                         f"{', MaxNodes ' + str(min(largest)) if largest else ''}); Slurm would keep the job pending "
                         f"for ever. Set train.nodes to at most {can_give}, or use another partition")


def rendezvous_port(job_id: str) -> int:
    """The main process's port, the same on every node of the job without talking: from the job id
    (a requeued job keeps its id, and its previous processes have released the port)."""
    return 20000 + int(job_id) % 20000


def main_node_address(node_list: str) -> str:
    """The address of the allocation's first node: `scontrol show hostnames` names it, `scontrol
    show node` gives its NodeAddr (the name itself on most clusters; node names need not resolve)."""
    first = subprocess.run(["scontrol", "show", "hostnames", node_list], check=True,
                           capture_output=True, text=True).stdout.split()[0]
    node = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True).stdout
    match = re.search(r"NodeAddr=(\S+)", node)
    return match.group(1) if match else first


def slurm_nodes(nodes: int, processes_per_node: int, precision: str, work_dir: Path) -> list[str]:
    """`srun` of one launcher per node of this Slurm job, each an `accelerate launch` of its node's
    processes. The job's command itself runs once (the train rule has the `mpi` resource, so
    Snakemake's jobstep does not wrap it in `srun -n1`, whose single-task step could not start a
    step across the other nodes)."""
    require_slurm_nodes(nodes)
    job_id, job = os.environ["SLURM_JOB_ID"], slurm_job()
    launch = accelerate_command(nodes * processes_per_node, precision, work_dir, machines=nodes,
                                main_address=main_node_address(job["NodeList"]), port=rendezvous_port(job_id),
                                machine_rank=MACHINE_RANK)
    # every step setting explicit: the job's environment holds none of the allocation's (see slurm_job)
    # --label: each line of the log says which node (task) printed it
    return ["srun", f"--jobid={job_id}", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--label",
            f"--cpus-per-task={job.get('CPUs/Task', '1')}", "--kill-on-bad-exit=1",
            sys.executable, "-m", "ddaepp.processes", *launch]


def node_launcher(cmd: list[str]) -> None:
    """One node's launcher, started by srun: its machine rank from the Slurm step, then `cmd`.

    SIGUSR1 (Slurm's time-limit warning, `scancel --signal=USR1`) reaches every process of the
    step; ignored here and so in accelerate's launcher (an ignored signal stays ignored across
    exec and fork), it reaches the training processes only, which install their own handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    rank = os.environ["SLURM_NODEID"]
    cmd = [rank if part == MACHINE_RANK else part for part in cmd]
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    node_launcher(sys.argv[1:])
