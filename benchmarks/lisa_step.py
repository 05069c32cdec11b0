"""Memory and step time of LISA (only `gamma` blocks trainable) against full fine-tuning.

    python benchmarks/lisa_step.py --shape smollm2_135m --gammas 2 4 [--time]
    python benchmarks/lisa_step.py --shape llama_1b --gammas 2 4          # memory only

Both steps train the same model with stacked blocks (`model.scan_layers`) and AdamW
(`hbo_jax.step.make_train_step` vs `hbo_jax.lisa.make_lisa_train_step`), on one device,
from the shapes of `benchmarks/train_step_cpu.py`. Memory is XLA's buffer assignment of
the compiled step, as `python -m hbo_jax.memory` reports it (arguments: parameters and
optimizer state; scratch: gradients and activations). `--time` also runs each step on
random weights, the variants taking turns step by step, and reports the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_cpu import SHAPES, jax_spec, random_batch  # noqa: E402


def shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of a LISA comparison: shape, gammas, batch, sequence, remat and timing."""
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    ap.add_argument("--gammas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--time", action="store_true", help="also time the steps on random weights")
    ap.add_argument("--rounds", type=int, default=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape_arguments(ap)
    args = ap.parse_args()

    import dataclasses

    import jax
    import jax.numpy as jnp

    from hbo_jax import lisa
    from hbo_jax.config import MeshConfig
    from hbo_jax.memory import ProgramMemory
    from hbo_jax.models.llama import abstract_model, init_params
    from hbo_jax.parallel import batch_sharding, make_mesh, replicated, tree_shardings
    from hbo_jax.step import abstract_train_state, init_train_state, make_optimizer, make_train_step, state_shardings

    spec = dataclasses.replace(jax_spec(SHAPES[args.shape], "float32", remat=args.remat), scan_layers=True)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, abstract = abstract_model(spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          tree_shardings(abstract, mesh))
    b, t = args.batch, args.seq
    rows_ = batch_sharding(mesh)
    shaped = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows_) for k in ("input_ids", "targets")}
    shaped.update(loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=rows_),
                  group_id=jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding(mesh, 1)))
    tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
    full_state = abstract_train_state(params, tx, mesh)
    full_step = make_train_step(graphdef, tx, mesh, 1, state_shardings(full_state))
    rows = {"full": ProgramMemory.of("full", full_step.lower(full_state, shaped).compile())}
    txs = {g: lisa.make_lisa_optimizer(1e-4, 1000, 10, 0.0, 1.0, g) for g in args.gammas}
    for g in args.gammas:
        rows[f"lisa_{g}"] = ProgramMemory.of(f"lisa_{g}", lisa.compile_lisa_step(graphdef, params, txs[g], mesh, g,
                                                                                  shaped))
    result = {"shape": args.shape, "batch": b, "seq": t, "remat": args.remat, "layers": spec.num_layers,
              "params_m": spec.num_params() / 1e6, "memory_mib": {}}
    for name, m in rows.items():
        result["memory_mib"][name] = {"arguments": m.arguments / 2**20, "scratch": m.scratch / 2**20,
                                      "peak": m.peak / 2**20, "peak_vs_full": m.peak / rows["full"].peak}
    if args.time:
        batch = random_batch(spec.vocab_size, b, t, mesh)
        graphdef, real = init_params(spec, mesh, 0)
        state = init_train_state(real, tx, mesh)
        runs = {"full": (make_train_step(graphdef, tx, mesh, 1, state_shardings(state)), state)}
        for g in args.gammas:
            graphdef, real = init_params(spec, mesh, 0)
            state = lisa.init_lisa_state(real, txs[g], mesh, g)
            active = jax.device_put(lisa.LisaSchedule(spec.num_layers, g).active(0), replicated(mesh))
            step = lisa.make_lisa_train_step(graphdef, txs[g], mesh, 1, jax.tree.map(lambda x: x.sharding, state))
            runs[f"lisa_{g}"] = (lambda s, bt, step=step, active=active: step(s, bt, active), state)
        times = {name: [] for name in runs}
        for r in range(args.rounds + 1):  # round 0 compiles and warms up; variants take turns
            for name, (fn, state) in runs.items():
                t0 = time.perf_counter()
                state, m = fn(state, batch)
                jax.block_until_ready(m)
                runs[name] = (fn, state)
                if r:
                    times[name].append(time.perf_counter() - t0)
        result["seconds_per_step"] = {name: statistics.median(ts) for name, ts in times.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
