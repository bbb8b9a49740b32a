"""Loading, validating and resolving the workflow config.

The schema (config.schema.yaml, also reachable as workflow/schemas/config.schema.yaml) holds
types and defaults; this module adds what a schema cannot say (budgets in order, names that
refer to each other, files that must exist) and composes each run's effective config:
shared sections, then the setting's overrides, then the variant's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from .inputs import missing_inputs
from .reference import FEATURE_DIMS

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
RUN_SECTIONS = ("model", "train", "sample", "probe", "layer_search")
MODEL_SIZES = {  # name: (hidden_size, depth, num_heads)
    "T": (128, 4, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
# dataset.hflip when the config leaves it null: whether a mirrored image is still an image of its
# class. ImageNet's classes are (LightningDiT stores and trains on flipped latents); a mirrored
# digit is not a digit.
HFLIP_DEFAULT = {"digits": False, "imagefolder": True}
# What each stage's params record (which keys rerun what): ddaepp.reruns.


class ConfigError(ValueError):
    """A config problem, phrased for the person who has to fix it."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _filling_validator(schema: dict):
    base = jsonschema.validators.validator_for(schema)
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"config key '{key}': {error.message}{hint}"
    return f"config key '{key}': {error.message}"


def validate(config: dict, check_paths: bool = True) -> dict:
    """Return a validated copy of `config` with defaults filled; raise ConfigError otherwise."""
    schema = load_schema()
    config = copy.deepcopy(dict(config))
    plain = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(plain.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_describe(best))
    # Defaults are filled in the shared sections only: filling them inside a variant's
    # overrides would silently reset the shared values for that variant.
    # Checkpoints' sample/probe sections are overrides too; their model is filled in checkpoint_run_config.
    grid = {k: config.pop(k) for k in ("settings", "variants", "checkpoints") if k in config}
    for _ in _filling_validator(schema).iter_errors(config):  # already valid: run for the filling
        pass
    config.update(grid)
    config.setdefault("checkpoints", {})
    if config["dataset"]["hflip"] is None:
        config["dataset"]["hflip"] = HFLIP_DEFAULT[config["dataset"]["name"]]
    for setting in config["settings"].values():
        setting.setdefault("overrides", {})
    if not config["tables"]:
        config["tables"] = {name: {"setting": name} for name in config["settings"]}
    for table in config["tables"].values():
        table.setdefault("variants", list(config["variants"]))
    config.setdefault("default_tables", list(config["tables"]))
    _check_semantics(config)
    if check_paths:
        check_inputs(config)
    return _sorted(config)


def _sorted(value):
    """Keys in sorted order at every level: Snakemake compares rule params by their text, so the
    same config written with its keys in another order must not rerun anything."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _check_semantics(config: dict) -> None:
    for name, setting in config["settings"].items():
        epochs = setting["epochs"]
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ConfigError(f"config key 'settings.{name}.epochs': budgets must be strictly increasing, got {epochs}")
    declared = config["dataset"]["images"] or {}
    if config["tokenizer"]["shards"] is None and not ("train" in declared and "val" in declared):
        raise ConfigError("config key 'tokenizer.shards': null sizes the encoding jobs from dataset.images, which "
                          "needs both counts, e.g. dataset: {images: {train: 1281167, val: 50000}}; or give a number")
    for name, table in config["tables"].items():
        if table["setting"] not in config["settings"]:
            raise ConfigError(f"config key 'tables.{name}.setting': unknown setting '{table['setting']}' "
                              f"(settings: {', '.join(config['settings'])})")
        for variant in table["variants"]:
            if variant not in config["variants"]:
                raise ConfigError(f"config key 'tables.{name}.variants': unknown variant '{variant}' "
                                  f"(variants: {', '.join(config['variants'])})")
    for name in config["default_tables"]:
        if name not in config["tables"]:
            raise ConfigError(f"config key 'default_tables': unknown table '{name}' (tables: {', '.join(config['tables'])})")
    _check_checkpoints(config)
    tok, data = config["tokenizer"], config["dataset"]
    if data["placement"] == "random" and data["name"] != "digits":
        raise ConfigError(f"config key 'dataset.placement': random places 8x8 digits on a canvas; dataset "
                          f"{data['name']!r} has no such digits, use placement: fill")
    if tok["name"] == "pixel" and data["image_size"] % tok["factor"]:
        raise ConfigError(f"config key 'tokenizer.factor': image_size {data['image_size']} is not divisible by {tok['factor']}")
    if tok["name"] == "pixel" and tok["posterior"] is not None:
        raise ConfigError("config key 'tokenizer.posterior': the pixel tokenizer has no posterior (it is exact "
                          "space-to-depth); leave it null, or use sd-vae / va-vae")
    if tok["name"] in ("sd-vae", "va-vae"):
        down = 8 if tok["name"] == "sd-vae" else 16
        if data["image_size"] % down:
            raise ConfigError(f"config key 'dataset.image_size': {tok['name']} needs a multiple of {down}, got {data['image_size']}")
    feature_dim = FEATURE_DIMS[config["metrics"]["features"]]
    train_nodes(config)
    for setting in config["settings"]:
        for variant in config["variants"]:
            run = run_config(config, setting, variant)
            depth = MODEL_SIZES[run["model"]["size"].split("/")[0]][1]
            where = f"run {setting}-{variant}"
            if run["model"]["self_cond"]:
                _check_self_cond_layer(run, depth, where)
            _check_objectives(run, depth, where)
            if run["sample"]["n"] <= feature_dim:
                raise ConfigError(f"config key 'sample.n' ({where}): FID needs more samples than the {feature_dim} feature "
                                  f"dimensions of '{config['metrics']['features']}' for a full-rank covariance; "
                                  f"got {run['sample']['n']}")
            if run["train"]["nodes"] > 1 and run["train"]["gpus"] == 0:
                raise ConfigError(f"config key 'train.nodes' ({where}): {run['train']['nodes']} nodes need train.gpus "
                                  "processes on each; train.gpus is 0 (one CPU process). Set train.gpus >= 1")
            _check_micro_batch(run, where)
            if run["train"]["gpus"] == 0 and run["train"]["precision"] == "bf16":
                raise ConfigError(f"config key 'train.precision' ({where}): bf16 needs GPUs (train.gpus > 0); use auto")


AUTO = "auto"  # model.self_cond_layer chosen by the layer search (ddaepp.layer_search)


def is_auto(run_cfg: dict) -> bool:
    """Whether this run self-conditions on a layer the search has to choose."""
    return bool(run_cfg["model"]["self_cond"]) and run_cfg["model"]["self_cond_layer"] == AUTO


def with_layer(run_cfg: dict, layer: int) -> dict:
    """The run config with model.self_cond_layer set to `layer`."""
    out = copy.deepcopy(run_cfg)
    out["model"]["self_cond_layer"] = int(layer)
    return out


def train_nodes(config: dict) -> int:
    """train.nodes, one value for every run: the train rule's Slurm resources (one node, or a step
    across several) are the rule's, not a run's."""
    nodes = {run_config(config, s, v)["train"]["nodes"] for s in config["settings"] for v in config["variants"]}
    if len(nodes) > 1:
        raise ConfigError(f"config key 'train.nodes': every run trains on the same number of nodes, got "
                          f"{sorted(nodes)} across variants/settings; set it once, in the top-level train section")
    return nodes.pop() if nodes else 1


def _check_micro_batch(run: dict, where: str) -> None:
    """train.micro_batch splits a loss that is a mean over rows; objectives over the batch are not."""
    from .objectives import enabled  # here, not at the top: importing ddaepp.config does not import torch

    batch_wide = [objective.name for objective in enabled(run)]
    if run["train"]["micro_batch"] and batch_wide:
        raise ConfigError(f"config key 'train.micro_batch' ({where}): the objectives {', '.join(batch_wide)} take "
                          "statistics over the whole batch, which micro-batches would change; leave micro_batch "
                          "null for this run")


def _check_objectives(run: dict, depth: int, where: str) -> None:
    """Every object-valued key of `train` names a registered objective, whose own check passes."""
    from . import objectives  # here, not at the top: importing ddaepp.config does not import torch

    try:
        configured = objectives.configured(run["train"])
    except ValueError as err:
        raise ConfigError(f"config key 'train' ({where}): {err}") from None
    for objective in configured:
        problem = objective.check(run["train"][objective.name], run, depth)
        if problem:
            key, message = problem
            raise ConfigError(f"config key 'train.{objective.name}.{key}' ({where}): {message}")


def _check_self_cond_layer(run: dict, depth: int, where: str) -> None:
    """A fixed layer, or `auto` with a layer search that can run and decide."""
    layer, search = run["model"]["self_cond_layer"], run["layer_search"]
    if layer != "auto":
        if layer >= depth - 1:
            raise ConfigError(f"config key 'model.self_cond_layer' ({where}): {layer} leaves no later block to "
                              f"condition in a model of depth {depth}; use 0..{depth - 2} or auto")
        return
    too_deep = [c for c in search["candidates"] or [] if c >= depth - 1]
    if too_deep:
        raise ConfigError(f"config key 'layer_search.candidates' ({where}): {too_deep} leave no later block to "
                          f"condition in a model of depth {depth}; use layers in 0..{depth - 2}")
    if search["window"] > search["steps"]:
        raise ConfigError(f"config key 'layer_search.window' ({where}): {search['window']} steps are more than the "
                          f"{search['steps']} of each short run; use at most layer_search.steps")


def check_inputs(config: dict) -> None:
    """Fail early, naming every input that is missing, empty or truncated and what to put where."""
    problems = missing_inputs(config)
    if problems:
        raise ConfigError(f"{len(problems)} input(s) not in place (fix them all, then rerun; `ddaepp plan CONFIG` "
                          "prints the jobs and their cost without them):\n  - " + "\n  - ".join(problems))


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def typed_overrides(value):
    """Snakemake's --config leaves nested values as strings ("64", "false"); read them as YAML would."""
    if isinstance(value, dict):
        return {k: typed_overrides(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed_overrides(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, str):
            try:
                return float(parsed) if parsed.strip().lower() not in ("nan", "inf", "-inf", "infinity") else parsed
            except ValueError:
                return parsed
        return parsed if parsed is not None or value.strip().lower() in ("null", "~", "none") else value
    return value


def run_config(config: dict, setting: str, variant: str) -> dict:
    """The effective config of one run: shared sections < setting overrides < variant overrides."""
    out = {k: copy.deepcopy(config[k]) for k in ("dataset", "tokenizer", "metrics")}
    for section in RUN_SECTIONS:
        merged = merge(config[section], config["settings"][setting].get("overrides", {}).get(section, {}))
        out[section] = merge(merged, config["variants"][variant].get(section, {}))
    out["setting"], out["variant"] = setting, variant
    out["conditional"] = config["settings"][setting]["conditional"]
    return _sorted(out)


def compare_run_config(run: dict) -> dict:
    """The run config of a run's second probe (probe.compare): its keys over the probe section."""
    out = copy.deepcopy(run)
    out["probe"] = merge({k: v for k, v in run["probe"].items() if k != "compare"}, run["probe"]["compare"] or {})
    out["probe"]["compare"] = None
    return out


def checkpoint_run_config(config: dict, name: str) -> dict:
    """The effective config of checkpoint `name` (config key `checkpoints`): the shared sections with
    the checkpoint's model, sample and probe over them, and a `checkpoint` entry (path, sha256,
    latent_stats) that tells ddaepp.states.load_ema to read it as an external file."""
    if name not in config["checkpoints"]:
        raise ConfigError(f"unknown checkpoint '{name}' (config key 'checkpoints' names: "
                          f"{', '.join(config['checkpoints']) or 'none'})")
    spec = config["checkpoints"][name]
    out = {k: copy.deepcopy(config[k]) for k in ("dataset", "tokenizer", "metrics")}
    for section in RUN_SECTIONS:
        out[section] = merge(config[section], spec.get(section, {}))
    # A checkpoint's model is its own, whatever the runs' shared model section says: schema defaults
    # (upstream LightningDiT's switches) under what the checkpoint declares.
    model_schema = load_schema()["$defs"]["model"]["properties"]
    out["model"] = merge({k: v["default"] for k, v in model_schema.items()}, spec["model"])
    out["setting"], out["variant"], out["conditional"] = "checkpoint", name, spec["conditional"]
    out["checkpoint"] = {"name": name, **{k: spec[k] for k in ("path", "sha256", "latent_stats")}}
    out["checkpoint"]["sha256"] = out["checkpoint"]["sha256"].lower()
    return _sorted(out)


def _check_checkpoints(config: dict) -> None:
    if config["checkpoints"] and "checkpoints" in config["tables"]:
        raise ConfigError("config key 'tables.checkpoints': the name is taken by the checkpoints table "
                          "(results/tables/checkpoints.md); rename the table")
    for name in config["checkpoints"]:
        run = checkpoint_run_config(config, name)
        if run["model"]["self_cond"] and run["model"]["self_cond_layer"] == "auto":
            raise ConfigError(f"config key 'checkpoints.{name}.model.self_cond_layer': auto needs the layer search "
                              "of a training run; give the block the checkpoint was trained with")
        feature_dim = FEATURE_DIMS[config["metrics"]["features"]]
        if run["sample"]["n"] <= feature_dim:
            raise ConfigError(f"config key 'sample.n' (checkpoint {name}): FID needs more samples than the "
                              f"{feature_dim} feature dimensions of '{config['metrics']['features']}'")


def run_name(setting: str, variant: str) -> str:
    return f"{setting}-{variant}"


def split_run(run: str) -> tuple[str, str]:
    setting, _, variant = run.partition("-")
    return setting, variant


def check_run(config: dict, run: str) -> tuple[str, str]:
    """(setting, variant) of `run`, or an error naming the runs that exist."""
    setting, variant = split_run(run)
    if setting not in config["settings"] or variant not in config["variants"]:
        runs = [run_name(s, v) for s in config["settings"] for v in config["variants"]]
        raise ConfigError(f"unknown run '{run}': runs are <setting>-<variant>, here {', '.join(runs)}")
    return setting, variant


def check_target(config: dict, run: str, seed=None, epoch=None, guide=None, shard=None) -> None:
    """Refuse a target outside the config's grid (a run, seed, epoch budget, guidance or sample
    shard it lacks), naming what exists, before anything is built for it."""
    setting, variant = check_run(config, run)
    if seed is not None and int(seed) not in config["seeds"]:
        raise ConfigError(f"run {run}: seed {seed} is not in the config (seeds: {config['seeds']}); "
                          "add it to `seeds` to build it")
    if epoch is not None:
        previous_epoch(config, setting, int(epoch))
    guides = ["nocfg", "cfg"] if config["settings"][setting]["conditional"] else ["nocfg"]
    if guide is not None and guide not in guides:
        raise ConfigError(f"run {run}: guidance '{guide}' is not built for setting '{setting}' "
                          f"(built: {', '.join(guides)}; CFG needs a conditional setting)")
    shards = run_config(config, setting, variant)["sample"]["shards"] if shard is not None else 0
    if shard is not None and int(shard) >= shards:
        raise ConfigError(f"run {run}: sample shard {shard} does not exist (sample.shards is {shards}: "
                          f"shards 0..{shards - 1})")


def check_table(config: dict, table: str) -> None:
    if table not in config["tables"]:
        raise ConfigError(f"unknown table '{table}' (tables: {', '.join(config['tables'])}; "
                          "config key 'tables' defines them)")


def previous_epoch(config: dict, setting: str, epoch: int) -> int | None:
    epochs = config["settings"][setting]["epochs"]
    if epoch not in epochs:
        raise ConfigError(f"epoch {epoch} is not a budget of setting '{setting}' (budgets: {epochs})")
    i = epochs.index(epoch)
    return epochs[i - 1] if i else None


def load(path: str | Path, overrides: dict | None = None, check_paths: bool = True) -> dict:
    """Read a YAML config file, apply `overrides` (as snakemake --config would) and validate."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    if overrides:
        config = merge(config, overrides)
    return validate(config, check_paths=check_paths)
