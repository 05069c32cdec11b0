"""Saving and loading model parameters as safetensors, straight into sharded arrays.

The native layout uses our parameter paths (`layers.0.attn.q_proj.kernel`, ...). Loading
checks every tensor's presence and shape against the model and names the offending
tensor when they disagree.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx, traverse_util

from hbo_jax.parallel import tree_shardings


class CheckpointMismatch(ValueError):
    """A weights file does not fit the model; the message names the tensor."""


def _flat(pure: dict) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(pure).items()}


def save_params(params, path: str | Path) -> None:
    from safetensors.numpy import save_file

    flat = {k: np.asarray(jax.device_get(v)) for k, v in _flat(nnx.to_pure_dict(params)).items()}
    tmp = Path(str(path) + ".tmp")
    save_file(flat, str(tmp))
    tmp.rename(path)


def load_params(path: str | Path, abstract_params, mesh):
    """Reads a safetensors file tensor by tensor into the shardings of `abstract_params`."""
    from safetensors import safe_open

    shardings = tree_shardings(abstract_params, mesh)
    expected = _flat(nnx.to_pure_dict(abstract_params))
    flat_shard = _flat(nnx.to_pure_dict(shardings))
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        have = set(f.keys())
        for name, spec in expected.items():
            if name not in have:
                raise CheckpointMismatch(f"{path}: tensor {name!r} is missing")
            t = f.get_tensor(name)
            if tuple(t.shape) != tuple(spec.shape):
                raise CheckpointMismatch(f"{path}: tensor {name!r} has shape {t.shape}, model expects {spec.shape}")
            out[name] = jax.device_put(t.astype(spec.dtype), flat_shard[name])
        extra = sorted(have - set(expected))
        if extra:
            raise CheckpointMismatch(f"{path}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
    nested = traverse_util.unflatten_dict({tuple(_key(p) for p in k.split(".")): v for k, v in out.items()})
    params = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(params, nested)
    return params


def _key(part: str):
    return int(part) if part.isdigit() else part
