"""Nested run state (RNG states, loader and mask-generator state) in a file that runs no code.

A state is a tree of dicts (str keys), lists, tuples, str / int / float / bool / None, torch
tensors and numpy arrays. Tensors and arrays go into a safetensors file; the tree, with each
array replaced by a reference to its safetensors key, goes into the file's JSON metadata.
Loading parses JSON and reads raw tensor bytes: nothing is unpickled, so a planted file can
at worst fail to parse.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

_TREE = "vmaescale_state"


def save_state(path: Path, state) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_TREE: json.dumps(tree)})
    tmp.replace(path)


def load_state(path: Path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _TREE not in meta:
            raise ValueError(f"{path} is not a vmaescale state file (no {_TREE!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(json.loads(meta[_TREE]), tensors)


def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"$ndarray": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state dict keys must be str, got {sorted(map(repr, obj))[:5]}")
        return {"$dict": {k: _encode(v, tensors) for k, v in obj.items()}}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file; accepted: dict, list, "
                    "tuple, str, int, float, bool, None, torch.Tensor, numpy.ndarray")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    (kind, value), = obj.items()
    if kind == "$tensor":
        return tensors[value]
    if kind == "$ndarray":
        return tensors[value].numpy()
    if kind == "$tuple":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "$dict":
        return {k: _decode(v, tensors) for k, v in value.items()}
    raise ValueError(f"unknown entry {kind!r} in a state file")
