"""Parameters by flat path, tensor by tensor: our safetensors format and the shared loaders.

The native layout uses our parameter paths (`layers.0.attn.q_proj.kernel`, ...). Every
loader (this one, Hugging Face, GGUF) places each tensor with `place_tensor`: each device
shard is sliced from the source on demand, so no host builds the whole model twice.
Loading checks every tensor's presence and shape and names the offending tensor.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx, traverse_util

from hbo_jax.errors import CheckpointMismatch
from hbo_jax.parallel import tree_shardings


def flat_params(state) -> dict:
    """`{"layers.0.attn.q_proj.kernel": leaf}` for an nnx.State (or its abstract twin)."""
    pure = nnx.to_pure_dict(state)
    return {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(pure).items()}


def params_from_flat(abstract, flat: dict):
    """The nnx.State shaped like `abstract` holding the arrays of a flat path dict."""
    def key(part: str):
        return int(part) if part.isdigit() else part

    nested = traverse_util.unflatten_dict({tuple(key(p) for p in k.split(".")): v for k, v in flat.items()})
    params = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(params, nested)
    return params


VOCAB_AXES = {"embed": 0, "lm_head.kernel": 1}  # parameters with vocab rows (padded, see LlamaSpec)


def place_tensor(source, name: str, transposed: bool, abstract, sharding, where: str | Path,
                 pad_axis: int | None = None):
    """One global array in `sharding`, each device shard sliced from `source` on demand.

    Args:
        source: A sliceable tensor in Hugging Face layout (a safetensors slice, a
            memory map or a NumPy array); only the slices this host's devices hold are
            read.
        name: The tensor's name, for error messages.
        transposed: `source` is `[out, in]` and our parameter `[in, out]`.
        abstract: The parameter's ShapeDtypeStruct (shape and dtype to produce).
        sharding: The parameter's NamedSharding.
        where: The checkpoint, for error messages.
        pad_axis: An axis (of our layout) on which the parameter may be longer than
            the source (a padded vocabulary): the extra entries are zeros.

    Returns:
        A `jax.Array` of `abstract.shape` and `abstract.dtype`.

    Raises:
        CheckpointMismatch: The tensor's shape does not fit the model.
    """
    shape = tuple(source.get_shape() if hasattr(source, "get_shape") else source.shape)
    want = tuple(abstract.shape)
    have = shape[::-1] if transposed else shape
    if pad_axis is not None and have[pad_axis] <= want[pad_axis]:
        want_src = want[:pad_axis] + (have[pad_axis],) + want[pad_axis + 1:]
    else:
        pad_axis, want_src = None, want
    if have != want_src:
        shown = f"{shape} (transposed {shape[::-1]})" if transposed else f"{shape}"
        raise CheckpointMismatch(f"{where}: tensor {name!r} has shape {shown}, model expects {want}")
    cache: dict = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        return source[index[::-1]].T if transposed else source[index]

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            if pad_axis is None:
                part = read(index)
            else:  # rows past the source's end are padding: zeros
                lo, hi = index[pad_axis].indices(want[pad_axis])[:2]
                n = have[pad_axis]
                inner = list(index)
                inner[pad_axis] = slice(min(lo, n), min(hi, n))
                part = np.asarray(read(tuple(inner)))
                widths = [(0, 0)] * len(want)
                widths[pad_axis] = (0, (hi - lo) - part.shape[pad_axis])
                part = np.pad(part, widths)
            cache[key] = np.ascontiguousarray(part).astype(abstract.dtype)
        return cache[key]

    return jax.make_array_from_callback(want, sharding, shard)


def save_params(params, path: str | Path) -> None:
    from safetensors.numpy import save_file

    flat = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(params).items()}
    tmp = Path(str(path) + ".tmp")
    save_file(flat, str(tmp))
    tmp.rename(path)


def load_params(path: str | Path, abstract_params, mesh):
    """Reads a safetensors file of our layout into the shardings of `abstract_params`."""
    from safetensors import safe_open

    expected = flat_params(abstract_params)
    flat_shard = flat_params(tree_shardings(abstract_params, mesh))
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        have = set(f.keys())
        extra = sorted(have - set(expected))
        if extra:
            raise CheckpointMismatch(f"{path}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
        for name, spec in expected.items():
            if name not in have:
                raise CheckpointMismatch(f"{path}: tensor {name!r} is missing")
            out[name] = place_tensor(f.get_slice(name), name, False, spec, flat_shard[name], path)
    return params_from_flat(abstract_params, out)
