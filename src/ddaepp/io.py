"""Small file helpers every stage shares: atomic writes, JSON, logging, free-space checks, shards.

A finished output is only ever created by a rename, so a killed job leaves either the old
file, nothing, or a temporary `*.tmp-*` name that no rule declares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent, suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the rest of a group
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def setup_logging(log_file: str | os.PathLike | None = None) -> logging.Logger:
    """Log to stderr and, when given, to `log_file` (a rule's `log:`)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    return logging.getLogger("ddaepp")


def check_free_space(directory: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Fail before writing `what` when the disk under `directory` cannot hold it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.05:
        raise OSError(f"not enough disk for {what} in {directory}: needs about {needed_bytes / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB free; free space or point results/ elsewhere")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """torch.save atomically, with a `<name>.sha256` beside it that load_checkpoint verifies.

    The checksum is written before the rename, so a finished checkpoint always has one.
    """
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        Path(str(path) + ".sha256").write_text(file_sha256(tmp) + "\n")


def load_checkpoint(path: str | os.PathLike, map_location="cpu", require_checksum: bool = True) -> Any:
    """Load without executing pickled code (weights_only) after checking the file's checksum."""
    import pickle

    import torch

    path = Path(path)
    sidecar = Path(str(path) + ".sha256")
    if sidecar.exists():
        if sidecar.read_text().strip() != file_sha256(path):
            raise ValueError(f"checkpoint {path} is corrupt (its sha256 differs from {sidecar.name}); "
                             "delete it and rerun the job that makes it")
    elif require_checksum:
        raise ValueError(f"checkpoint {path} has no {sidecar.name}: it was not written completely by ddaepp; "
                         "delete it and rerun the job that makes it")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))  # torch's words for the culprit
        what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors and plain data"
        keep = (f"import torch; c = torch.load({str(path)!r}, weights_only=False); "
                "torch.save({k: c[k] for k in ('ema', 'model') if k in c}, 'weights.pt')")
        raise ValueError(f"refusing to load {path}: it holds {what}, which could run code when loaded. If you "
                         f"trust the file, keep only its weights, python -c \"{keep}\", and use weights.pt "
                         "(with its sha256) instead") from None


def attempt_header() -> str:
    """One line that heads each attempt of a job in its log: where and as what it runs. A SLURM job
    requeued after its time-limit warning or a preemption keeps its id and counts up
    SLURM_RESTART_COUNT, so the attempts of one job read in order in one file."""
    import datetime
    import socket

    env = os.environ
    where = (f"SLURM job {env['SLURM_JOB_ID']} restart {_restart_count(env['SLURM_JOB_ID'])}"
             if "SLURM_JOB_ID" in env else "not under SLURM")
    gpus = env.get("SLURM_JOB_GPUS") or env.get("CUDA_VISIBLE_DEVICES") or "none visible"
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"===== attempt: {where}, host {socket.gethostname()}, GPUs {gpus}, pid {os.getpid()}, {started} ====="


def _restart_count(job_id: str) -> str:
    """SLURM_RESTART_COUNT, or SLURM's own count when the job step does not pass it on (the
    executor plugin's job step keeps only a few SLURM_* variables)."""
    if "SLURM_RESTART_COUNT" in os.environ:
        return os.environ["SLURM_RESTART_COUNT"]
    import re
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"Restarts=(\d+)", out)
    return found.group(1) if found else "unknown"


@contextlib.contextmanager
def job_log(log_file: str | os.PathLike, threads: int | None = None) -> Iterator[logging.Logger]:
    """Run a workflow job with its stdout, stderr (progress bars) and logging going to `log_file`.

    Every attempt of a job is kept, each under its `attempt_header`. Snakemake removes a job's log
    before it runs the job again (a SLURM requeue, a retry), so while a job runs its log has a second
    name, `<log>.attempts` (a hard link, not a declared file), and the next attempt starts its log
    with what that holds. A second name rather than a copy at exit: `scontrol requeue` ends the job
    at once, and the process that holds this context may be killed before any exit path runs (the
    launcher of an `accelerate launch` job, whose rank 0 asked for the requeue). A finished job
    removes it; where the file system has no hard links, a copy is made at exit instead."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    earlier = log_file.with_name(log_file.name + ".attempts")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .preemption import PREEMPTED_EXIT

    # line-buffered: what a killed attempt had written is in the file (progress bars flush themselves)
    with open(log_file, "a", buffering=1) as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(stream):
        if earlier.is_file() and not os.path.samefile(earlier, log_file):
            text = earlier.read_text(errors="replace")
            if text not in log_file.read_text(errors="replace"):
                stream.write(text)
        print(attempt_header(), file=stream, flush=True)
        linked = _second_name(log_file, earlier)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            handlers=[logging.StreamHandler(stream)], force=True)
        logger = logging.getLogger("ddaepp")
        finished = False
        try:
            yield logger
            finished = True
        except SystemExit as stop:
            finished = stop.code in (0, None)
            if stop.code not in (0, None, PREEMPTED_EXIT):  # saved, to be resumed: not a failure
                logger.exception("job failed")
            raise
        except BaseException:
            logger.exception("job failed")
            raise
        finally:
            stream.flush()
            if finished:
                earlier.unlink(missing_ok=True)
            elif not linked:
                earlier.write_text(log_file.read_text(errors="replace"))


def _second_name(path: Path, name: Path) -> bool:
    """Make `name` a hard link to `path`, replacing what was there only once the link exists;
    False where the file system cannot link."""
    new = name.with_name(name.name + ".new")
    new.unlink(missing_ok=True)
    try:
        os.link(path, new)
    except OSError:
        return False
    os.replace(new, name)
    return True


def dataset_dir(config: dict) -> str:
    """Where the workflow keeps the dataset's index and latents (common.smk's DATASET_DIR)."""
    data = config["dataset"]
    # digits on a canvas are other images than the upsampled ones
    return f"results/data/{data['name']}{data['image_size']}" + ("-random" if data["placement"] == "random" else "")


def wip_dir(out_path: str | os.PathLike, job: str = "") -> Path:
    """The in-progress folder of the job that writes `out_path`: `_wip/<job><its folder's name>` beside
    the output's folder, e.g. results/runs/R/s0/ep10/state.pt -> results/runs/R/s0/_wip/ep10.

    The one definition of where a job keeps its lock, resume state and scratch files: the workflow's
    scripts and the by-hand `ddaepp` stages both take it from here, so a job started either way
    resumes (and locks) what the other left."""
    folder = Path(out_path).parent
    if not folder.name:  # an output in the working folder
        folder = folder.absolute()
    return folder.parent / "_wip" / f"{job}{folder.name}"


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the file lock `lock_path` so that two jobs never write the same in-progress files.

    Two Snakemake invocations, or a job and its own requeued copy, could otherwise both resume
    from (and append to) one `_wip` folder; the second one fails at once and says why.
    """
    import filelock

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RuntimeError(f"another process is writing {what} (it holds {lock_path}); wait for it to "
                           "finish, or stop it, then rerun") from None
    try:
        yield
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)  # leave no litter in folders that jobs clean up


def shard_rows(n: int, shard: int, num_shards: int) -> range:
    """Contiguous rows of shard `shard` of `n` (encoding jobs, sampling jobs):
    [k * ceil(n / S), (k + 1) * ceil(n / S)) clipped to n."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    per = math.ceil(n / num_shards)
    return range(min(shard * per, n), min((shard + 1) * per, n))
