"""`python -m hbo_jax.memory [--config FILE] [key=value ...]`: will this run fit?

Compiles the run's device programs for the configured model, mesh, batch and mixing
strategy from shapes alone (no weights are read, no data is tokenized) and prints what
XLA allocates on one device for each:

  train step         the optimizer step (with per-example gradient norms too, when the
                     global reward comes from training: `mixing.global_source=train`)
  global probes      the probe-based global reward (per-example gradients for
                     `gradnorm_per_example`), when the strategy uses one
  (ScaleBiO)         its u-step, w-step and lambda step, each with the state it
                     does not take ("held": the other model's) counted in its peak
  scoring /          the per-example NLL forward of difficulty scoring and evaluation,
  evaluation         `scorer.score_batch_size` rows

The numbers are XLA's buffer assignment for the devices this runs on, so run it where
the job will run (same accelerator and mesh); a CPU's numbers say little about a GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hbo_jax.algorithm import PlanContext, algorithm_class
from hbo_jax.cli import USER_ERRORS, add_config_arguments, setup_logging
from hbo_jax.config import Config, load_config
from hbo_jax.data.prepare import count_subsets
from hbo_jax.distributed import initialize as init_distributed
from hbo_jax.models.llama import LlamaSpec, abstract_model
from hbo_jax.models.base import base_spec
from hbo_jax.parallel import batch_sharding, check_batch_size, make_mesh, round_up_rows, tree_shardings
from hbo_jax.step import make_example_nll_fn


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Bytes one device holds while a compiled program runs (XLA's memory analysis)."""

    name: str
    arguments: int  # inputs: parameters, optimizer state, batch
    outputs: int
    aliased: int  # outputs written into donated inputs (counted once)
    scratch: int  # temporaries: activations, gradients, collectives' buffers
    # The run's other device state, held while this program runs but not among its inputs
    # (ScaleBiO's u-step runs while w's state waits): part of the device's peak.
    held: int = 0

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.scratch + self.held

    @classmethod
    def of(cls, name: str, compiled, held: int = 0) -> "ProgramMemory":
        m = compiled.memory_analysis()
        return cls(name, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                   m.temp_size_in_bytes, held)


def model_spec(cfg: Config) -> LlamaSpec:
    """The run's model shape, read from the checkpoint's config or metadata only."""
    return base_spec(cfg)


def _rows(n: int, seq: int, mesh, *, ref_nll: bool = False, packing: bool = False) -> dict:
    """ShapeDtypeStructs of a batch of `n` rows in the batch shardings (a train batch's keys)."""
    bs, b1 = batch_sharding(mesh), batch_sharding(mesh, 1)
    batch = {"input_ids": jax.ShapeDtypeStruct((n, seq), jnp.int32, sharding=bs),
             "targets": jax.ShapeDtypeStruct((n, seq), jnp.int32, sharding=bs),
             "loss_mask": jax.ShapeDtypeStruct((n, seq), jnp.float32, sharding=bs),
             "group_id": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=b1)}
    if packing:
        batch.update(positions=batch["input_ids"], segment_ids=batch["input_ids"])
    if ref_nll:
        batch["ref_nll"] = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=b1)
    return batch


def plan(cfg: Config, mesh=None, num_datasets: int | None = None) -> tuple[LlamaSpec, list[ProgramMemory]]:
    """Compiles the run's programs from shapes and returns their per-device memory.

    The training method (`algorithm`) lists its own programs; scoring and evaluation
    are the same for every method.

    Args:
        cfg: The run's config.
        mesh: The mesh (default: `cfg.mesh` over all devices).
        num_datasets: Subsets in the mixture (default: `count_subsets(cfg)`).
    """
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    check_batch_size("train.batch_size", cfg.train.batch_size, mesh)
    spec = model_spec(cfg)
    seq = cfg.data.seq_len
    graphdef, abstract = abstract_model(spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          tree_shardings(abstract, mesh))
    num_datasets = count_subsets(cfg) if num_datasets is None else num_datasets
    ctx = PlanContext(cfg, mesh, graphdef, params, num_datasets,
                      lambda n, **kw: _rows(n, seq, mesh, **kw))
    # (name, compiled) or (name, compiled, bytes held outside its inputs): `Algorithm.programs`.
    out = [ProgramMemory.of(*program) for program in algorithm_class(cfg.algorithm).programs(ctx)]
    # Scoring and evaluation: score_batch_size rows (rounded up to the mesh), widest at seq_len.
    ev = _rows(round_up_rows(cfg.scorer.score_batch_size, mesh), seq, mesh)
    nll = make_example_nll_fn(graphdef, mesh)
    lowered = nll.everywhere.lower(params, ev["input_ids"], ev["targets"], ev["loss_mask"])  # the larger one
    out.append(ProgramMemory.of("scoring / evaluation forward", lowered.compile()))
    return spec, out


def device_memory() -> int | None:
    """Bytes one device may allocate, when the backend says (GPU, TPU); None on CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def format_plan(spec: LlamaSpec, programs: list[ProgramMemory], mesh, limit: int | None) -> str:
    """A table of the programs' per-device memory, and whether the largest fits `limit` bytes."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_model(spec)[1]))
    worst = max(programs, key=lambda p: p.peak)
    width = max(34, *(len(p.name) + 2 for p in programs))
    unit, div = ("GiB", 1024**3) if max(worst.peak, limit or 0) >= 1024**3 else ("MiB", 1024**2)
    lines = [f"model: {n / 1e6:,.1f} M parameters ({spec.param_dtype}), compute {spec.dtype}, "
             f"remat {spec.remat_policy if spec.remat else 'off'}",
             f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].device_kind} device(s)",
             "", f"{'per device (' + unit + ')':<{width}}"
             + "".join(f"{c:>10}" for c in ("inputs", "outputs", "scratch", "held", "peak"))]
    for p in programs:
        lines.append(f"{p.name:<{width}}{p.arguments / div:>10.2f}{(p.outputs - p.aliased) / div:>10.2f}"
                     f"{p.scratch / div:>10.2f}{p.held / div:>10.2f}{p.peak / div:>10.2f}")
    head = f"\nlargest: {worst.name}, {worst.peak / div:.2f} {unit} per device"
    if limit:
        verdict = "fits" if worst.peak <= limit else "does NOT fit"
        lines.append(f"{head} of {limit / div:.2f} {unit}: {verdict}")
    else:
        lines.append(f"{head} (this backend reports no memory limit)")
    if spec.remat and jax.devices()[0].platform == "cpu":
        lines.append("note: XLA:CPU does not schedule the backward for memory, "
                     "so remat shows little of its saving here")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbo_jax.memory", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        init_distributed(cfg.distributed)  # on a pod, plan for the global mesh, as the job sees it
        mesh = make_mesh(cfg.mesh)
        spec, programs = plan(cfg, mesh)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limit = device_memory()
    if jax.process_index() == 0:
        print(format_plan(spec, programs, mesh, limit))
    return 0 if not limit or max(p.peak for p in programs) <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
