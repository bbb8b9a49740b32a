"""What reruns: the part of a config that decides what each stage computes.

Snakemake reruns a job when the params it records differ from those of the job's last run. The
rules record each stage's `result_config` (its STAGE_SECTIONS minus the OPERATIONAL_KEYS) through
StageConfig, and training fingerprints its states with the same, so editing a key that only
changes how a job runs reruns nothing, and a key that changes results reruns the stages that read
it and what follows.
"""

from __future__ import annotations

import copy

from .config import ConfigError, run_config

# Keys that change how a job runs, never what it computes. This one list serves both the rules'
# params (what Snakemake compares to decide a rerun, see StageConfig) and train's resume check,
# so editing any of them after a finished run reruns nothing.
OPERATIONAL_KEYS = {
    # Locations: where the same bytes live. The index stores image paths relative to the root;
    # what the weights are is fixed by tokenizer.name and by the FID definition (torch-fidelity's
    # Inception file). Pointing a location at different content is a new experiment: use a new
    # results folder or --forcerun. metrics.reference is the exception that proves the rule: two
    # legitimate reference files differ in content for the same config, so the reference_stats
    # rule records a digest of the statistics it holds (reference_digest) in place of its path.
    "dataset": ("root",
                "images"),  # declared counts for ddaepp.cost's plan; the index counts what is there
    "tokenizer": ("path",
                  # encoding is per image: the batch only groups the encoder calls (and fixes the
                  # _wip chunk layout, which the encoding job keys on by itself)
                  "batch_size"),
    "train": ("gpus",  # N processes equal one at the same global batch, up to float reduction order
              "nodes",  # the same processes, on more machines
              "micro_batch",  # gradient accumulation: the same global batch's gradient, summed in parts
              "activation_checkpointing",  # the same forward, recomputed in the backward
              "num_workers",  # loader processes; every batch is a function of (seed, step)
              "checkpoint_minutes",  # a resumed segment equals an uninterrupted one
              "compile",  # the same graph, fused: reduction order only
              "log_every"),  # what is logged, not what is computed
    # Not operational: train.precision. bf16 against fp32 is a numerical choice that changes the
    # trained weights beyond reduction order, so changing it retrains and a state made in one is not
    # resumed in the other. `auto` means "what the device does best" (fp32 on CPU, bf16 on GPUs):
    # whoever writes auto lets train.gpus decide; pin bf16 or fp32 to make the numbers device-free.
    "sample": ("batch_size",  # sample i's noise and label depend on (seed, i) only
               "compile"),  # the same graph, fused: float rounding only (as train.compile)
    # Features are noised per (seed, image, t) whatever the batch; the probes are trained on the same
    # minibatches whether the features sit in RAM or stream from disk. (probe.batch_size is the
    # probes' SGD batch: it changes results.)
    "probe": ("feature_batch_size", "max_memory_gb"),
    "metrics": ("inception_weights", "reference"),
}
# Not operational, though they name files: tokenizer.shards and sample.shards decide which rows or
# samples each shard file holds, so a shard written under another count is wrong for the new one.
# Changing them redoes the sharded stage (and, by modification time, what reads its output).

# The run-config sections each stage computes from; its rules' params carry these minus the
# operational keys, so a new probe setting re-probes and does not retrain.
STAGE_SECTIONS = {
    "index": ("dataset",),
    "encode": ("dataset", "tokenizer"),
    "classifier": ("dataset", "metrics"),
    "reference": ("dataset", "metrics"),
    "train": ("dataset", "tokenizer", "model", "train", "conditional"),
    "sample": ("dataset", "tokenizer", "model", "sample", "conditional"),
    "metrics": ("dataset", "metrics", "sample", "conditional"),
    "probe": ("dataset", "model", "probe", "conditional"),
    "layer_search": ("dataset", "tokenizer", "model", "train", "layer_search", "conditional"),
    # what a table shows: everything a run's cells come from, and the paper comparison reads
    "table": ("dataset", "tokenizer", "model", "train", "sample", "probe", "metrics", "conditional"),
}
# Keys of those sections a stage never reads: the stages that read images, not latents, ignore
# whether the latents store flips.
STAGE_IGNORES = {stage: {"dataset": ("hflip",)} for stage in ("index", "classifier", "reference")}
# The digits-net classifier is the same whether precision and recall are computed with it.
STAGE_IGNORES["classifier"]["metrics"] = ("precision_recall", "pr_reference_n")
# A run's first probe does not read the second's settings (probe.compare: rule probe_compare).
STAGE_IGNORES["probe"] = {"probe": ("compare",)}
# Probe keys a protocol never reads (probe.protocol): DDAE's trains every pair on all of train for
# probe.epochs, a fresh noise draw each epoch, and chooses on val (ddaepp.probe_ddae), so the
# selection split, the stored draws and the final probe's epochs are not its settings.
PROTOCOL_IGNORES = {"ddae": ("selection_per_class", "holdout_fraction", "noise_draws", "final_epochs", "grid_steps")}


def result_config(cfg: dict, stage: str) -> dict:
    """The part of `cfg` (a run config, or the validated config for the data stages) that decides
    what `stage` computes: its STAGE_SECTIONS without the OPERATIONAL_KEYS (nor its STAGE_IGNORES,
    nor the probe keys its probe.protocol does not read)."""
    if stage not in STAGE_SECTIONS:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGE_SECTIONS)})")
    out = {}
    for section in STAGE_SECTIONS[stage]:
        skip = OPERATIONAL_KEYS.get(section, ()) + STAGE_IGNORES.get(stage, {}).get(section, ())
        value = cfg[section]
        if section == "probe":
            skip += PROTOCOL_IGNORES.get(value.get("protocol"), ())
        out[section] = {k: v for k, v in value.items() if k not in skip} if isinstance(value, dict) else value
    return copy.deepcopy(out)


def table_result_config(config: dict, table: str) -> dict:
    """What table `table` shows: its spec, its setting's budgets, the seeds, and the result config of
    each run in it; no other table, setting or variant, and no operational key."""
    spec = config["tables"][table]
    setting = config["settings"][spec["setting"]]
    return {"table": spec, "seeds": config["seeds"],
            "setting": {"conditional": setting["conditional"], "epochs": setting["epochs"]},
            "runs": {v: result_config(run_config(config, spec["setting"], v), "table") for v in spec["variants"]}}


def reference_digest(path) -> str | None:
    """sha1 of the FID statistics (mu, sigma) a reference file holds: what the reference is, whatever
    folder it sits in. None without a reference file (the statistics are computed from the data)."""
    if not path:
        return None
    import hashlib

    import numpy as np

    try:
        npz = np.load(path)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with npz:
            digest = hashlib.sha1()
            for key in ("mu", "sigma"):
                digest.update(np.ascontiguousarray(npz[key], dtype=np.float64).tobytes())
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"config key 'metrics.reference': {path} is not an ADM-style .npz with 'mu' and 'sigma' "
                          f"({type(err).__name__}: {err}); put the reference batch there, or set it to null to "
                          "compute the statistics from the train images") from None
    return digest.hexdigest()


class StageConfig(dict):
    """A job's whole config (what its script reads), recorded by Snakemake as `recorded` only.

    Snakemake reruns a job when the repr of one of its params differs from the repr it stored at
    the job's last run. This dict holds every key, operational ones included, but its repr is that
    of `recorded` (normally result_config), so editing an operational key reruns nothing. str()
    shows the whole dict, for logs.
    """

    def __init__(self, full: dict, recorded):
        super().__init__(full)
        self.recorded = recorded

    def __repr__(self) -> str:
        return repr(self.recorded)

    def __str__(self) -> str:
        return dict.__repr__(self)
