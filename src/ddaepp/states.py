"""Every model state a stage reads, ddaepp's own or external, is read here.

- A ddaepp state (`state.pt` with its `.sha256` sidecar, written by ddaepp.io.save_checkpoint)
  is checked against its sidecar, as before.
- An external file (hustvl/LightningDiT's format: a dict with `ema` and/or `model` state dicts,
  keys possibly prefixed `module.` by DDP, or a bare state dict) has no sidecar: it is trusted by
  the sha256 the config records for it (`checkpoints.<name>.sha256`), or, for `train --init`,
  its sha256 is computed and written to the job's summary.

Both are read with `torch.load(weights_only=True)`, so no pickled code ever runs. The weights are
loaded key by key: a missing, unexpected or differently shaped key is named, with both shapes.

Training's resume goes through here too: `resume_state` starts a job from its in-progress state,
else the previous budget's, else an external `train --init` file, and refuses a ddaepp state whose
`fingerprint` (what it was trained with) differs from the run's.

`self_cond_layer: auto` is resolved here, from the state's fingerprint (the layer the state was
trained with), so the model itself only ever sees a resolved block.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ddaepp import io
from ddaepp.config import is_auto, with_layer
from ddaepp.reruns import result_config

log = logging.getLogger(__name__)

# what wrappers put before every key of the module they wrap: DDP, then torch.compile's OptimizedModule
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_ddaepp_state(path: str | os.PathLike) -> bool:
    """Whether `path` was written by ddaepp (it has the `.sha256` sidecar save_checkpoint writes)."""
    return Path(str(path) + ".sha256").exists()


def read_external(path: str | os.PathLike, sha256: str | None = None) -> tuple[dict, str]:
    """(contents, sha256) of an external checkpoint, refused if `sha256` is given and differs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}; put the file there or fix the path in the config")
    actual = io.file_sha256(path)
    if sha256 is not None and actual != sha256.lower():
        raise ValueError(f"checkpoint {path} has sha256 {actual}, but the config records {sha256}; the file "
                         "changed or is not the one meant: restore it, or record the new hash if it is intended")
    return io.load_checkpoint(path, require_checksum=False), actual


def external_weights(contents: dict, which: str, path) -> dict[str, torch.Tensor]:
    """The state dict `which` ('ema' or 'model') of an external checkpoint's contents, without the
    prefixes DDP and torch.compile add (WRAPPER_PREFIXES). A bare state dict (tensors only) serves
    as either."""
    if not isinstance(contents, dict):
        raise ValueError(f"checkpoint {path} holds a {type(contents).__name__}, not a dict of state dicts")
    if all(isinstance(v, torch.Tensor) for v in contents.values()):
        weights = contents
    else:
        other = "model" if which == "ema" else "ema"
        weights = contents.get(which, contents.get(other))
        if not isinstance(weights, dict):
            raise ValueError(f"checkpoint {path} has neither an 'ema' nor a 'model' state dict (keys: "
                             f"{', '.join(map(str, contents))}); upstream LightningDiT checkpoints hold one of them")
        if which not in contents:
            log.warning("checkpoint %s has no '%s' weights; using its '%s' weights", path, which, other)
    return {_unwrapped(k): v for k, v in weights.items()}


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_weights(module: torch.nn.Module, weights: dict, path) -> None:
    """load_state_dict, with a mismatch reported as the key and both shapes."""
    own = module.state_dict()
    for key, value in weights.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"checkpoint {path}: key '{key}' has shape {tuple(value.shape)}, the configured model "
                             f"expects {tuple(own[key].shape)}; fix the model settings (size, patch, latent "
                             "channels, classes) to those the checkpoint was trained with")
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    prefix = os.path.commonprefix(unexpected) if len(unexpected) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]
    if prefix and sorted(k[len(prefix):] for k in unexpected) == missing:
        raise ValueError(f"checkpoint {path}: every key of the file carries the prefix '{prefix}' (e.g. "
                         f"'{unexpected[0]}'), which the model's do not; save the wrapped module's own state_dict")
    if missing or unexpected:
        shapes = [f"'{k}' {tuple(own[k].shape)} missing from the file" for k in missing[:3]]
        shapes += [f"'{k}' {tuple(weights[k].shape)} not in the model" for k in unexpected[:3]]
        raise ValueError(f"checkpoint {path} does not match the configured model: {len(missing)} key(s) missing, "
                         f"{len(unexpected)} unexpected, e.g. {'; '.join(shapes)}; fix the model settings "
                         "(self_cond, conditional, use_* switches) to those the checkpoint was trained with")
    try:
        module.load_state_dict(weights)
    except ValueError as err:  # a module's own check of what it loads (Rope2D's tables)
        raise ValueError(f"checkpoint {path}: {err}") from None


def resolve_layer(run_cfg: dict, state: dict) -> dict:
    """The run config with `self_cond_layer: auto` replaced by the layer a ddaepp state was trained with
    (its fingerprint)."""
    if not is_auto(run_cfg):
        return run_cfg
    layer = state["fingerprint"]["model"]["self_cond_layer"]
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"the state's fingerprint names self_cond_layer {layer!r}, not a block; retrain it")
    return with_layer(run_cfg, layer)


def fingerprint(run_cfg: dict, seed: int) -> dict:
    """What a state was trained with (reruns.result_config: the train rule's params too); resuming
    under a different fingerprint is refused, operational keys are free to differ."""
    return {**result_config(run_cfg, "train"), "seed": seed}


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield f"{prefix.rstrip('.')}: {a!r} in the state, {b!r} now"


def check_compatible(state: dict, expected: dict, path: Path) -> None:
    diffs = list(_diff(state["fingerprint"], expected))
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was trained with another config ("
                         + "; ".join(diffs) + "). Delete it, or restore the config it was made with")


def resume_state(init_path, wip_path, expected) -> dict | None:
    """The state to start from: the in-progress checkpoint, else the previous budget, else None.
    An `init_path` that ddaepp did not write (an upstream LightningDiT checkpoint) gives its weights
    at step 0 (see external_init)."""
    for path in (wip_path, init_path):
        if path and Path(path).exists():
            if path is init_path and not is_ddaepp_state(path):
                return external_init(path)
            state = io.load_checkpoint(path)
            check_compatible(state, expected, Path(path))
            log.info("starting from %s (step %d)", path, state["step"])
            return state
    return None


def external_init(path) -> dict:
    """Weights of an external checkpoint to start from: its `model` and `ema` state dicts (either
    serves for both when only one is there); the optimizer, the objectives' heads and the step
    start fresh, as upstream gives no state for them that matches ours. Its sha256 is recorded."""
    contents, sha256 = read_external(path)
    if isinstance(contents, dict) and "fingerprint" in contents:
        raise ValueError(f"checkpoint {path} is a ddaepp state without its {Path(path).name}.sha256: it was not "
                         "written completely by ddaepp; delete it and rerun the job that makes it")
    log.info("starting from the external checkpoint %s (sha256 %s) at step 0", path, sha256)
    return {"step": 0, "epoch_losses": [], "init_sha256": sha256,
            "external": {k: external_weights(contents, k, path) for k in ("model", "ema")}}


def load_ema(state_path: str | os.PathLike, run_cfg: dict, latent_shape, n_classes: int):
    """The EMA model of a finished state, in eval mode (what sampling and probing use).

    A run config with a `checkpoint` entry (an external checkpoint, see config.checkpoint_run_config)
    is read as an external file and checked against the sha256 recorded there; any other state must
    be ddaepp's, with its sidecar."""
    from ddaepp.models import model_from_run_config

    external = run_cfg.get("checkpoint")
    if external is not None:
        contents, _ = read_external(state_path, external["sha256"])
        weights = external_weights(contents, "ema", state_path)
    else:
        state = io.load_checkpoint(state_path)
        run_cfg = resolve_layer(run_cfg, state)
        weights = state["ema"]
    model = model_from_run_config(run_cfg, tuple(latent_shape), n_classes)
    load_weights(model, weights, state_path)
    return model.eval().requires_grad_(False)


def stats_from_file(path: str | os.PathLike) -> dict:
    """Per-channel latent statistics {'mean': [...], 'std': [...]} from upstream's `latents_stats.pt`
    (tensors `mean` and `std`, shaped (1, C, 1, 1)) or ddaepp's own stats.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latent statistics file {path}; give upstream's latents_stats.pt or a "
                                "ddaepp stats.json")
    if path.suffix == ".json":
        stats = io.read_json(path)
    else:
        stats = io.load_checkpoint(path, require_checksum=False)
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        raise ValueError(f"latent statistics {path} must hold 'mean' and 'std' (upstream's latents_stats.pt "
                         "or ddaepp's stats.json)")
    mean, std = (torch.as_tensor(stats[k], dtype=torch.float64).flatten() for k in ("mean", "std"))
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise ValueError(f"latent statistics {path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} must "
                         "be one positive std per channel")
    return {"mean": mean.tolist(), "std": std.tolist()}
