"""What each cluster job of a config costs, from measured rates, before any data or weights exist.

The one place where work is counted and turned into job sizes: `ddaepp plan CONFIG` prints it,
the workflow's `job_resources` (workflow/rules/common.smk) asks for it, and
benchmarks/gpu_check.py prints its grid estimate through it.

- Rates (`jobs.rates`): images per second per GPU of each stage, measured by gpu_check on one
  card (`load_rates`). The shipped `h100` is the README's "GPU check" session; `gpu_check
  --write-rates FILE` writes one for another card.
- Work: images per split from the index when it exists, else `dataset.images` (the paper config
  declares ImageNet-1k's 1,281,167 / 50,000); epochs per training segment, samples per shard,
  the probes' feature passes.
- Sizes: runtime = expected × jobs.margin, at least jobs.min_runtime, at most jobs.max_runtime
  (a training segment longer than that finishes through its own USR1 requeue, see
  ddaepp.preemption); memory = what the job holds (mapped latents, model and optimizer,
  processes) × jobs.mem_margin; CPUs = jobs.cpus_per_gpu per GPU. An explicit jobs.<rule> entry
  wins over all of it. Without rates, jobs.default and jobs.<rule> size every job, as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import io
from .config import ConfigError, MODEL_SIZES, run_config, run_name

RATES_DIR = Path(__file__).parent / "rates"
GB = 1e9
LATENT_BYTES = 2  # latents are stored as float16
RATE_KEYS = ("train_compiled", "train_eager", "encode", "decode", "sample_nocfg", "sample_cfg", "probe_features")


def load_rates(spec: str | None) -> dict | None:
    """The rates file `spec` names: a shipped one by name (src/ddaepp/rates/<name>.yaml) or a path."""
    if spec is None:
        return None
    path = RATES_DIR / f"{spec}.yaml" if (RATES_DIR / f"{spec}.yaml").is_file() else Path(spec)
    if not path.is_file():
        shipped = sorted(p.stem for p in RATES_DIR.glob("*.yaml"))
        raise ConfigError(f"config key 'jobs.rates': {spec!r} is neither a shipped rates file ({', '.join(shipped)}) "
                          "nor a file; write one with `python benchmarks/gpu_check.py --write-rates FILE` on your GPU")
    rates = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    missing = [k for k in RATE_KEYS if k not in rates.get("images_per_s", {})]
    if missing or "assumed" not in rates:
        raise ConfigError(f"rates file {path}: needs images_per_s.{{{', '.join(RATE_KEYS)}}} and an `assumed` "
                          f"section (missing: {', '.join(missing) or 'assumed'}); see {RATES_DIR / 'h100.yaml'}")
    return rates


def split_images(config: dict, split: str) -> int | None:
    """Images of `split`: the index's rows when it exists, else dataset.images, else None."""
    index = Path(io.dataset_dir(config)) / f"index-{split}.parquet"
    if index.is_file():
        import pyarrow.parquet as pq

        return pq.ParquetFile(index).metadata.num_rows
    return (config["dataset"].get("images") or {}).get(split)


def encode_shards(config: dict, split: str) -> int:
    """Encoding jobs of `split`: tokenizer.shards when set, else enough that none encodes more than
    tokenizer.shard_images images (mirrored views counted), from dataset.images. Not from the index
    nor the rates, so the DAG stays the same once the index exists or jobs.rates changes."""
    tokenizer = config["tokenizer"]
    if tokenizer["shards"] is not None:
        return tokenizer["shards"]
    images = (config["dataset"].get("images") or {}).get(split)
    if images is None:
        raise ConfigError(f"config key 'tokenizer.shards': null (sized by work) needs dataset.images.{split}; "
                          "declare the split's image count, or give the number of encoding jobs per split")
    return math.ceil(images * _views(config, split) / tokenizer["shard_images"])


def _views(config: dict, split: str) -> int:
    return 2 if split == "train" and config["dataset"]["hflip"] else 1


@dataclass
class Job:
    """One rule's jobs: how many, what each asks for, and the expected seconds of one (None: no rate)."""
    rule: str
    count: int
    gpus: int
    expected_s: float | None
    mem_bytes: float | None
    runtime: int = 0  # minutes
    mem_mb: int = 0
    cpus: int = 0
    local: bool = False
    wildcards: list = field(default_factory=list)  # each job's wildcards this group's size fits (see `job_size`)
    nodes: int = 1  # `gpus`, memory and CPUs are per node (train.nodes for training)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.expected_s is None else self.count * self.nodes * max(self.gpus, 1) * self.expected_s / 3600

    @property
    def limit_gpu_hours(self) -> float:
        return self.count * self.nodes * max(self.gpus, 1) * self.runtime / 60


def _params(run: dict) -> float:
    """Parameters of the run's model: DiT blocks hold about 18 hidden² each (attention 4, MLP 8, adaLN 6)."""
    hidden, depth, _ = MODEL_SIZES[run["model"]["size"].split("/")[0]]
    return 18 * depth * hidden**2


def _tokens(size: str, latent_hw) -> int:
    patch = int(size.split("/")[1])
    return (latent_hw[0] // patch) * (latent_hw[1] // patch)


def model_cost(run: dict, config: dict, rates: dict | None) -> float:
    """The run's model's cost per image relative to the model the rates were measured on
    (rates' measured_on): parameters x tokens, the matmul FLOPs that dominate a DiT's step and
    sampling (L/1 against B/1: 3.5x). Rates without measured_on are taken as the run's own model."""
    measured = (rates or {}).get("measured_on")
    if not measured:
        return 1.0
    from .tokenizers import latent_shape

    hw = latent_shape(config["tokenizer"], config["dataset"])[1:]
    ours = _params(run) * _tokens(run["model"]["size"], hw)
    theirs = _params({"model": {"size": measured["model"]}}) * _tokens(measured["model"], measured["latent"][1:])
    return ours / theirs


def _latent_bytes(config: dict, split: str) -> float:
    from .tokenizers import latent_shape

    c, h, w = latent_shape(config["tokenizer"], config["dataset"])
    return (split_images(config, split) or 0) * _views(config, split) * c * h * w * LATENT_BYTES


def _runs(config: dict):
    for setting, spec in config["settings"].items():
        for variant in config["variants"]:
            run = run_config(config, setting, variant)
            for seed in config["seeds"]:
                yield run, seed, spec["epochs"]


class _Plan:
    """Collects jobs into groups of equal size; a cost is None where a rate or a count is unknown."""

    def __init__(self, config: dict):
        self.config, self.groups = config, {}
        rates = load_rates(config["jobs"]["rates"])
        self.rates, self.known = rates, rates is not None
        self.rate = (rates or {}).get("images_per_s", {})
        assumed = (rates or {}).get("assumed", {})
        self.startup, self.worker = assumed.get("job_startup_s", 0), assumed.get("worker_gb", 0) * GB
        self.process = assumed.get("process_gb", 0) * GB
        self.n = {split: split_images(config, split) for split in ("train", "val")}
        self.latents = {split: _latent_bytes(config, split) for split in ("train", "val")}

    def seconds(self, images: float | None, rate_key: str, gpus: int = 1, cost: float = 1.0) -> float | None:
        """Seconds of a job that processes `images` on `gpus` GPUs at `cost` x the measured model's work."""
        if not self.known or images is None:
            return None
        return self.startup + images * cost / (self.rate[rate_key] * max(gpus, 1))

    def held(self, nbytes: float) -> float | None:
        return nbytes if self.known else None

    def add(self, rule, gpus, seconds, mem, count=1, nodes=1, **wildcards):
        key = (rule, gpus, nodes, None if seconds is None else round(seconds), None if mem is None else round(mem))
        group = self.groups.setdefault(key, Job(rule, 0, gpus, seconds, mem, nodes=nodes))
        group.count += count
        group.wildcards.append({k: str(v) for k, v in wildcards.items()})


def jobs(config: dict) -> list[Job]:
    """Every rule's jobs for `config` (validated), grouped by size and sized (see `size`)."""
    plan = _Plan(config)
    _data_jobs(plan)
    for run, seed, epochs in _runs(config):
        _run_jobs(plan, run, seed, epochs)
    return [size(config, job) for job in sorted(plan.groups.values(), key=lambda j: _ORDER.index(j.rule))]


def _data_jobs(plan: _Plan) -> None:
    """The dataset's jobs: index, encoding, merges, reference statistics, the floor probe, tables."""
    from .devices import stage_gpus

    config = plan.config
    for split in ("train", "val"):
        n = plan.n[split]
        shards = encode_shards(config, split) if config["tokenizer"]["shards"] or n is not None else 1
        per = None if n is None else math.ceil(n / shards) * _views(config, split)
        plan.add("encode_shard", stage_gpus(config, "encode"), plan.seconds(per, "encode"),
                 plan.held(plan.process + 4 * GB), shards, split=split)  # + the VAE and a few image batches
        plan.add("index", 0, None, None)
        plan.add(f"merge_{split}_latents", 0, None, plan.held(plan.latents[split]))
    plan.add("reference_stats", stage_gpus(config, "reference"), None, None)
    plan.add("real_grid", 0, None, None)
    plan.add("probe_floor", stage_gpus(config, "floor"), None, None)
    plan.add("table", 0, None, None, len(config["default_tables"]))


def _run_jobs(plan: _Plan, run: dict, seed: int, epochs: list[int]) -> None:
    """One run and seed's jobs: a training segment per budget, its samples, metrics and probe."""
    from . import layer_search
    from .devices import stage_gpus

    config, n_train, n_val = plan.config, plan.n["train"], plan.n["val"]
    name = run_name(run["setting"], run["variant"])
    gpus, one = stage_gpus(config, "train", run), stage_gpus(config, "sample", run)
    nodes, model = run["train"]["nodes"], model_cost(run, config, plan.rates)
    state = _params(run) * 16  # fp32 weights, EMA, Adam's two moments
    pixels = 3 * config["dataset"]["image_size"] ** 2
    sample, probe = run["sample"], run["probe"]
    per_shard = math.ceil(sample["n"] / sample["shards"])
    train_rate, workers = "train_compiled" if run["train"]["compile"] else "train_eager", run["train"]["num_workers"]
    selection = probe["selection_per_class"] * _classes(config)
    probe_images = (None if n_train is None or n_val is None  # features of every t, then the final probe's
                    else (selection + n_val) * len(probe["t"]) + n_train + n_val)
    # per node: every node maps the latents and holds its own GPUs' processes
    held = plan.latents["train"] + max(gpus, 1) * (plan.process + state + workers * plan.worker)
    if layer_search.is_auto(run):  # one short run per candidate block, on the training jobs' nodes
        search_images = run["layer_search"]["steps"] * run["train"]["batch_size"]
        for layer in layer_search.candidates(run):
            plan.add("layer_search_run", gpus, plan.seconds(search_images, train_rate, gpus * nodes, model),
                     plan.held(held), nodes=nodes, run=name, seed=seed, layer=layer)
    for prev, epoch in zip([0] + epochs[:-1], epochs):
        train_images = None if n_train is None else (epoch - prev) * n_train
        plan.add("train", gpus, plan.seconds(train_images, train_rate, gpus * nodes, model), plan.held(held),
                 nodes=nodes, run=name, seed=seed, epoch=epoch)
        for guide in ["nocfg", "cfg"] if run["conditional"] else ["nocfg"]:
            plan.add("sample_shard", one, plan.seconds(per_shard, f"sample_{guide}", cost=model),
                     plan.held(plan.process + state + per_shard * pixels), sample["shards"],
                     run=name, seed=seed, epoch=epoch, guide=guide)
            plan.add("metrics", stage_gpus(config, "metrics", run), None, plan.held(plan.process + sample["n"] * pixels))
        mapped = plan.latents["train"] + plan.latents["val"]
        plan.add("probe", one, plan.seconds(probe_images, "probe_features", cost=model),
                 plan.held(plan.process + state + mapped + probe["max_memory_gb"] * GB))


_ORDER = ["index", "encode_shard", "merge_train_latents", "merge_val_latents", "reference_stats", "real_grid",
          "probe_floor", "layer_search_run", "train", "sample_shard", "metrics", "probe", "table"]


def _classes(config: dict) -> int:
    return 1000 if config["dataset"]["name"] == "imagefolder" else 10


def size(config: dict, job: Job) -> Job:
    """Fill the job's runtime (min), mem_mb and cpus from its expected cost; jobs.<rule> entries win."""
    jobs_cfg = config["jobs"]
    default, explicit = jobs_cfg["default"], jobs_cfg.get(job.rule, {})
    if job.expected_s is not None:
        minutes = math.ceil(job.expected_s * jobs_cfg["margin"] / 60)
        job.runtime = min(jobs_cfg["max_runtime"], max(jobs_cfg["min_runtime"], minutes))
    else:
        job.runtime = default["runtime"]
    if job.mem_bytes is not None and jobs_cfg["rates"] is not None:
        job.mem_mb = max(default["mem_mb"], 1000 * math.ceil(job.mem_bytes * jobs_cfg["mem_margin"] / 1e9))
    else:
        job.mem_mb = default["mem_mb"]
    job.cpus = job.gpus * jobs_cfg["cpus_per_gpu"] if job.gpus and jobs_cfg["rates"] is not None else default["cpus"]
    job.runtime, job.mem_mb, job.cpus = (explicit.get(k, v) for k, v in
                                         (("runtime", job.runtime), ("mem_mb", job.mem_mb), ("cpus", job.cpus)))
    job.local = job.rule in jobs_cfg["local"]
    return job


def job_size(config: dict, planned: list[Job], rule: str, wildcards: dict | None = None) -> dict:
    """runtime, mem_mb and cpus of one job of `rule` (the workflow's resources): the planned group
    whose wildcards match `wildcards`; without wildcards, or for a job the plan does not list, the
    largest of the rule's groups; for a rule the plan does not size, jobs.<rule> over jobs.default."""
    groups = [j for j in planned if j.rule == rule]
    if not groups:
        return {**config["jobs"]["default"], **config["jobs"].get(rule, {})}
    if wildcards:
        given = {k: str(v) for k, v in dict(wildcards).items()}
        match = [j for j in groups if any(all(given.get(k) == v for k, v in w.items()) for w in j.wildcards)]
        groups = match or groups
    return {k: max(getattr(j, k) for j in groups) for k in ("runtime", "mem_mb", "cpus")}


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def format_plan(config: dict, planned: list[Job]) -> str:
    """The table `ddaepp plan` prints, with the totals."""
    rates = config["jobs"]["rates"]
    head = f"{'rule':<28}{'jobs':>6}{'GPUs':>6}{'expected/job':>14}{'limit/job':>11}{'mem':>10}{'CPUs':>6}{'GPU-h':>9}"
    lines = [f"rates: {rates or 'none (jobs sized by jobs.default / jobs.<rule>)'}", head, "-" * len(head)]
    for j in planned:
        gpu_h = "-" if j.gpu_hours is None else f"{j.gpu_hours:.1f}"
        where = " (local)" if j.local else ""
        gpus = f"{j.nodes}x{j.gpus}" if j.nodes > 1 else str(j.gpus)
        lines.append(f"{j.rule + where:<28}{j.count:>6}{gpus:>6}{_minutes(j.expected_s):>14}"
                     f"{_minutes(j.runtime * 60):>11}{j.mem_mb / 1000:>8.0f}GB{j.cpus:>6}{gpu_h:>9}")
    cluster = [j for j in planned if not j.local]
    total = sum(j.gpu_hours or 0 for j in cluster if j.gpus)
    limits = sum(j.limit_gpu_hours for j in cluster if j.gpus)
    lines.append("-" * len(head))
    lines.append(f"{sum(j.count for j in cluster)} cluster jobs; expected {total:.1f} GPU-hours of GPU jobs, "
                 f"time limits reserve {limits:.1f} GPU-hours ({limits / total:.2f}x)" if total else
                 f"{sum(j.count for j in cluster)} cluster jobs; no rates, so no expected GPU-hours")
    return "\n".join(lines)


def stage_hours(config: dict) -> dict:
    """Expected GPU-hours per stage (train, encode, sample, probe) of the grid: gpu_check prints these."""
    names = {"train": "train", "encode_shard": "encode", "sample_shard": "sample", "probe": "probe"}
    hours = dict.fromkeys(names.values(), 0.0)
    for j in jobs(config):
        if j.rule in names and j.gpu_hours is not None:
            hours[names[j.rule]] += j.gpu_hours
    return hours
