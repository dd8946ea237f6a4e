"""Resumable checkpoints that hold no pickle: tensors in safetensors, everything else in JSON.

A run folder is something people copy between machines and share, so reading a checkpoint must
never run code. The state (step, config, trainable weights, optimiser and scheduler state, log)
is split into its tensors, written with safetensors, and the rest, written as JSON with a
placeholder where each tensor was. Non-string dictionary keys (the optimiser's parameter
numbers) and tuples are spelled out so that they come back as they were.

No RNG state is needed: every random draw of a step is seeded from (seed, step) (see train.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, first_line
from .outputs import CHECKPOINT, atomic_folder

STATE, TENSORS = "state.json", "tensors.safetensors"


def encode(obj, tensors: dict, path: str = "s"):
    """`obj` as JSON-ready data; its tensors are moved into `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__items__": [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode(data, tensors: dict):
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__tuple__" in data:
            return tuple(decode(v, tensors) for v in data["__tuple__"])
        return {decode(k, tensors): decode(v, tensors) for k, v in data["__items__"]}
    return data


def write_checkpoint(out: Path, state: dict, name: str = CHECKPOINT) -> None:
    """Write `state` as out/checkpoint/ (or out/`name`/; a new folder renamed into place)."""
    tensors: dict = {}
    data = encode(state, tensors)
    with atomic_folder(out / name) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(data))


def read_checkpoint(folder: Path) -> dict:
    """Read a checkpoint folder: JSON and safetensors only, nothing that can run code."""
    try:
        tensors = load_file(str(folder / TENSORS))
        return decode(json.loads((folder / STATE).read_text()), tensors)
    except Exception as err:  # any damage: the user's remedy is the same
        raise CheckpointError(f"checkpoint {folder} is unreadable ({type(err).__name__}: "
                              f"{first_line(err)}); delete it to start over") from err


def checkpoint_config(folder: Path, with_processes: bool = False):
    """The settings a checkpoint was made with, read without its tensors (a sweep's plan compares
    them); with the number of processes that made it (1 where it does not say) and the digests of
    the inputs it was made from ({} where it does not say)."""
    try:
        items = dict((key, value) for key, value in json.loads((folder / STATE).read_text())["__items__"])
        config = decode(items["config"], {})
        if not with_processes:
            return config
        extra = dict((key, value) for key, value in (items.get("extra") or {"__items__": []})["__items__"])
        inputs = decode(extra.get("inputs") or {"__items__": []}, {})
        if not isinstance(config, dict) or not isinstance(inputs, dict):
            raise ValueError("its config or inputs are not a mapping")
        return config, items.get("processes", 1), inputs
    except Exception as err:  # any damage: the user's remedy is the same
        raise CheckpointError(f"checkpoint {folder} is unreadable ({type(err).__name__}: "
                              f"{first_line(err)}); delete it to start over") from err
