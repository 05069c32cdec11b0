"""Device mesh, logical-axis rules and the shardings derived from them.

Parameters carry logical axis names (`embed`, `mlp`, ...) as metadata. One short rules
table maps them to mesh axes, so FSDP, tensor and data parallelism follow from the
mesh shape alone. A dimension that a mesh axis does not divide is replicated instead
of failing (tiny models on big meshes), and the fallback is reported once.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hbo_jax.config import MeshConfig
from hbo_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    # The embedding table shards its vocab rows over both axes: sharding its embed
    # column instead makes the gather reshard activations (involuntary remat).
    "vocab_table": ("fsdp", "tensor"),
    "embed_table": None,
    "norm": None,
    # The leading axis of stacked (scanned) blocks: never sharded, so a layer's slice is
    # laid out like an unrolled block's parameter and a dynamic index moves no data.
    "layers": None,
}

_warned: set[tuple] = set()


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Builds a Mesh(data, fsdp, tensor) from config; a -1 axis takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    fills = [i for i, s in enumerate(shape) if s == -1]
    if len(fills) > 1:
        raise ConfigError("mesh: at most one of mesh.data/fsdp/tensor may be -1")
    fixed = math.prod(s for s in shape if s != -1)
    if fills:
        if n % fixed:
            raise ConfigError(f"mesh: {n} devices are not divisible by the fixed axes product {fixed}")
        shape[fills[0]] = n // fixed
    if math.prod(shape) != n:
        raise ConfigError(f"mesh: shape {tuple(shape)} needs {math.prod(shape)} devices, have {n}")
    dev = np.asarray(devices).reshape(shape)
    return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: tuple | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Maps logical axis names to a PartitionSpec, replicating dims the mesh cannot divide."""
    if not logical:
        return P()
    out = []
    for name, dim in zip(logical, shape):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        if axes is not None and dim % _axis_size(mesh, axes):
            key = (name, dim, tuple(mesh.shape.items()))
            if key not in _warned:
                _warned.add(key)
                hint = " (model.vocab_multiple pads it)" if name.startswith("vocab") else ""
                log.info("replicating logical axis %r (size %d): not divisible by mesh %s%s", name, dim, axes, hint)
            axes = None
        out.append(axes)
    return P(*out)


def tree_shardings(abstract_state, mesh: Mesh):
    """NamedSharding for every leaf of an nnx.State of abstract Variables (by logical names)."""
    from flax import nnx

    def one(var):
        if isinstance(var, nnx.Variable):
            names = var.get_metadata().get("out_sharding")
            return var.replace(NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sums_to_json(tree: dict | None) -> dict | None:
    """Device arrays by name -> JSON (value and dtype), so a checkpoint's metadata carries them exactly."""
    if tree is None:
        return None
    return {k: {"value": np.asarray(jax.device_get(v)).tolist(), "dtype": str(np.asarray(v).dtype)}
            for k, v in tree.items()}


def sums_from_json(saved: dict | None, mesh: Mesh) -> dict | None:
    """`sums_to_json`'s output back on the mesh, replicated (an older plain list reads as float32)."""
    if not saved:
        return None
    arrays = {k: np.asarray(v["value"], v["dtype"]) if isinstance(v, dict) else np.asarray(v, np.float32)
              for k, v in saved.items()}
    return jax.device_put(arrays, replicated(mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def check_batch_size(key: str, n: int, mesh: Mesh) -> None:
    """Raises ConfigError unless the batch axes (data x fsdp) divide a global batch size."""
    d = batch_divisor(mesh)
    if n % d:
        raise ConfigError(f"{key}={n} must be a multiple of the mesh's data x fsdp size {d} "
                          f"(mesh {dict(mesh.shape)})")


def round_up_rows(n: int, mesh: Mesh) -> int:
    """The smallest row count >= n that the batch axes divide (for padded probe/eval batches)."""
    d = batch_divisor(mesh)
    return -(-n // d) * d


def global_batch_from_host(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Builds global arrays from this host's slice of a batch (identity on one host)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
        for k, v in batch.items()
    }


def host_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ConfigError(f"train.batch_size={global_batch_size} not divisible by {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)
