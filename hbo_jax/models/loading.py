"""Parameters by flat path, tensor by tensor: our safetensors format and the shared loaders.

The native layout uses our parameter paths (`layers.0.attn.q_proj.kernel`, ...). Every
loader (this one, Hugging Face, GGUF) places each tensor with `place_tensor`: each device
shard is sliced from the source on demand, so no host builds the whole model twice.
Loading checks every tensor's presence and shape and names the offending tensor.

Names are per layer (`layers.3.attn.q_proj.kernel`) whatever the model's layout: for a
model with stacked (scanned) blocks, whose parameter is `layers.attn.q_proj.kernel`
`[L, ...]`, `layer_entry` finds the stacked array and the layer's index, `place_params`
builds each stacked array from the L per-layer tensors (each device shard read straight
from the L sources), and export reads one layer's slice at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

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
    want = tuple(abstract.shape)
    have, pad_axis = _checked_shape(source, name, transposed, want, where, pad_axis)
    return jax.make_array_from_callback(want, sharding, _shard_reader(source, transposed, abstract, want, have,
                                                                       pad_axis))


def _checked_shape(source, name: str, transposed: bool, want: tuple, where, pad_axis: int | None):
    """(the source's shape in our layout, pad_axis or None when no padding applies); raises on a misfit."""
    shape = tuple(source.get_shape() if hasattr(source, "get_shape") else source.shape)
    have = shape[::-1] if transposed else shape
    if pad_axis is not None and have[pad_axis] <= want[pad_axis]:
        want_src = want[:pad_axis] + (have[pad_axis],) + want[pad_axis + 1:]
    else:
        pad_axis, want_src = None, want
    if have != want_src:
        shown = f"{shape} (transposed {shape[::-1]})" if transposed else f"{shape}"
        raise CheckpointMismatch(f"{where}: tensor {name!r} has shape {shown}, model expects {want}")
    return have, pad_axis


def _shard_reader(source, transposed: bool, abstract, want: tuple, have: tuple, pad_axis: int | None):
    """index -> the block of `source` (our layout, `abstract.dtype`, zero vocab padding), memoised."""
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

    return shard


_LAYER_PATH = re.compile(r"layers\.(\d+)\.(.+)")


def layer_entry(flat: dict, path: str) -> tuple[Any, int | None]:
    """Where a per-layer parameter path lives in a model's flat dict (or anything keyed like it).

    Returns:
        (flat[path], None) when the model has the path itself (unrolled blocks, or no
        block parameter); (flat["layers.<rest>"], i) for `layers.<i>.<rest>` of a model
        whose blocks are stacked: the layer is index i of that entry's leading axis.

    Raises:
        KeyError: Neither form is in `flat`.
    """
    if path in flat:
        return flat[path], None
    m = _LAYER_PATH.fullmatch(path)
    if m is None or f"layers.{m.group(2)}" not in flat:
        raise KeyError(path)
    return flat[f"layers.{m.group(2)}"], int(m.group(1))


def place_params(abstract, mesh, names: dict[str, tuple[str, bool]], source: Callable[[str], Any], where,
                 label: Callable[[str], str] | None = None):
    """The model's parameters in their shardings over `mesh`, every tensor read from `source`.

    Args:
        abstract: The model's abstract `nnx.Param` state (`abstract_model(spec)[1]`).
        mesh: The device mesh.
        names: Per-layer parameter path -> (tensor name, transposed), as `hf.name_map`.
        source: Tensor name -> a sliceable tensor in Hugging Face layout; raises
            CheckpointMismatch for a missing one.
        where: The checkpoint, for error messages.
        label: Tensor name -> the name messages use (default: the name itself).

    Returns:
        The `nnx.State`: a stacked parameter's device shards are stacked from the L
        layers' sources, so no per-layer copy is ever built on device.
    """
    flat_abs = flat_params(abstract)
    flat_shard = flat_params(tree_shardings(abstract, mesh))
    loaded, stacks = {}, {}
    for path, (tensor, transposed) in names.items():
        name = label(tensor) if label else tensor
        _, layer = layer_entry(flat_abs, path)
        if layer is None:
            loaded[path] = place_tensor(source(tensor), name, transposed, flat_abs[path], flat_shard[path], where,
                                        VOCAB_AXES.get(path))
        else:
            stacks.setdefault(_LAYER_PATH.fullmatch(path).group(2), {})[layer] = (source(tensor), name, transposed)
    for rest, layers in stacks.items():
        key = f"layers.{rest}"
        stacked = flat_abs[key]
        one = jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
        readers = []
        for i in range(stacked.shape[0]):
            src, name, transposed = layers[i]
            have, _ = _checked_shape(src, name, transposed, one.shape, where, None)
            readers.append(_shard_reader(src, transposed, one, one.shape, have, None))

        def shard(index, readers=readers):  # [layers, ...]: each layer's block of the same index
            return np.stack([readers[i](index[1:]) for i in range(*index[0].indices(len(readers)))])

        loaded[key] = jax.make_array_from_callback(stacked.shape, flat_shard[key], shard)
    return params_from_flat(abstract, loaded)


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
