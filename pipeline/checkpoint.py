"""One-file checkpoints: ``{format, version, kind, args, model, ema, optimizer, ..., step, rng, config}``.

The same format serves the resume checkpoint of a training stage (``<stage>/checkpoint.pt``,
one fixed name for saving and loading, as DINO's ``restart_from_checkpoint``) and the final
``<stage>/model.pt``. Files are written to a temporary name and renamed (a killed job never
leaves a half-written checkpoint) and read with ``torch.load(weights_only=True)``: nothing we
read executes code. RNG states are stored as tensors and plain numbers for the same reason.

Below every stage: torch, numpy, the standard library and the model factory
(``pipeline.models.build_model``, for :func:`load_model`) only.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models import build_model

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "save",
    "load",
    "rng_state",
    "set_rng_state",
    "load_state_dict_strict",
    "load_model",
    "EXPORT_WEIGHTS",
    "EXPORT_META",
    "export_model",
    "load_export",
    "source_sha256",
]

FORMAT = "vq-latent-pipeline"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, not ours, from another version, or does not fit a model."""


def rng_state() -> dict:
    """Every RNG state a stage draws from: python, numpy, torch CPU and (if present) CUDA."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Save ``payload`` (plus format and version tags) to ``path`` atomically.

    ``payload`` should hold only tensors, containers and plain numbers/strings so that it
    loads with ``weights_only=True``.
    """
    from pipeline.io import atomic_path

    data = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(data, tmp)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save`, or, where ``<folder>/model.pt`` is asked for
    and the folder holds an export instead (:func:`export_model`), that export.

    Raises:
        CheckpointError: the file is missing, cannot be unpickled safely (not ours, or
            corrupt), or has another format tag or version; the message names the file.
    """
    p = Path(path)
    if not p.is_file() and (p.parent / EXPORT_WEIGHTS).is_file():
        return load_export(p.parent, map_location)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, weights_only refusals
        raise CheckpointError(
            f"{p}: not a vq-latent-pipeline checkpoint or corrupt ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a vq-latent-pipeline checkpoint (no format tag {FORMAT!r})")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint version {data.get('version')!r}, this code reads version {VERSION}")
    return data


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)`` with an error that lists the mismatching keys and shapes.

    Raises:
        CheckpointError: missing, unexpected or differently shaped keys (first few named).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
            )
        if shape:
            parts.append("shape mismatch " + "; ".join(shape[:5]))
        raise CheckpointError(f"{source}: checkpoint does not fit the model architecture: " + ", ".join(parts))
    module.load_state_dict(state)


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", weights: str = "ema"
) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a ``model.pt`` through the factory and load its weights.

    Args:
        weights: "ema" (the EMA weights when the file has them, else the raw ones), "raw", or
            "guide" (the early snapshot that autoguidance guides away from).

    Returns:
        (model in eval mode on ``device``, the checkpoint dict).

    Raises:
        pipeline.checkpoint.CheckpointError: not our file, weights that do not fit, or
            ``weights="guide"`` for a model trained without a snapshot.
    """
    state = load(path, map_location=device)
    for key in ("kind", "args", "model"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    try:
        model = build_model(state["kind"], state["args"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if weights == "guide":
        if state.get("guide") is None:
            raise CheckpointError(f"{path}: has no autoguidance guide; train it with guide_fraction > 0")
        sd = state["guide"]
    else:
        sd = state["ema"] if weights == "ema" and state.get("ema") is not None else state["model"]
    load_state_dict_strict(model, sd, str(path))
    return model.to(device).eval(), state


# --- exports: safetensors + JSON, no pickle ---------------------------------------------------
#: the two files of an exported model in its folder
EXPORT_WEIGHTS, EXPORT_META = "model.safetensors", "model.json"


def source_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a ``model.pt``, or, for an export in its place, of the ``model.pt`` it was made
    from (recorded in ``model.json``): what the priors record as ``vqvae_sha256``.

    Raises:
        CheckpointError: neither exists.
    """
    import json

    from pipeline.io import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    meta = p.parent / EXPORT_META
    if meta.is_file():
        return json.loads(meta.read_text())["source_sha256"]
    raise CheckpointError(f"checkpoint {str(p)!r} does not exist")


def export_model(model_pt: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the model of ``model_pt`` as ``<folder>/model.safetensors`` (every tensor: the
    state dicts ``model``, ``ema``, ``guide`` under ``<entry>.<parameter>``, other tensors under
    ``tensor.<entry>``) and ``<folder>/model.json`` (kind, constructor args, the other entries,
    the format tag and version, and the SHA-256 of ``model_pt``), both atomically. Reading it
    back (:func:`load_export`) runs no pickled code: safetensors holds raw tensors, JSON plain
    values. Returns the weights file.

    Raises:
        CheckpointError: ``model_pt`` is not ours (see :func:`load`).
    """
    import json

    from safetensors.torch import save_file

    from pipeline.io import atomic_path, atomic_write_text, sha256_file

    state = load(model_pt)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"source_sha256": sha256_file(model_pt), "state_dicts": [], "tensors": []}
    for key, value in state.items():
        if isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{key}.{k}": v.detach().cpu().contiguous().clone() for k, v in value.items()})
            meta["state_dicts"].append(key)
        elif isinstance(value, torch.Tensor):
            tensors[f"tensor.{key}"] = value.detach().cpu().contiguous().clone()
            meta["tensors"].append(key)
        else:
            meta[key] = value
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EXPORT_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    atomic_write_text(out / EXPORT_META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out / EXPORT_WEIGHTS


def load_export(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of an exported model (:func:`export_model`): the same entries as its
    ``model.pt``, read from safetensors and JSON only.

    Raises:
        CheckpointError: a file is missing, or is not an export of this format and version.
    """
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta_path = folder / EXPORT_WEIGHTS, folder / EXPORT_META
    for f in (weights, meta_path):
        if not f.is_file():
            raise CheckpointError(f"export {str(folder)!r} has no {f.name}")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights), device=str(map_location))
    except Exception as exc:  # JSON or safetensors errors
        raise CheckpointError(f"{folder}: not a readable export ({type(exc).__name__}: {str(exc)[:200]})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} export of version {VERSION}")
    state = {k: v for k, v in meta.items() if k not in ("state_dicts", "tensors", "source_sha256")}
    for key in meta["state_dicts"]:
        prefix = f"{key}."
        state[key] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    for key in meta["tensors"]:
        state[key] = tensors[f"tensor.{key}"]
    state["source_sha256"] = meta["source_sha256"]
    return state
