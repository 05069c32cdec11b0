"""Memory and time of the chunked loss (`model.loss_chunk`) against whole-sequence logits.

    python benchmarks/loss_chunk.py --shape smollm2_135m --batch 8 --seq 512 --chunk 128 --remat --rounds 3
    python benchmarks/loss_chunk.py --shape llama_1b --batch 4 --seq 512 --chunk 128 --remat --compile-only

Builds the train step twice for the same model, weights and batch: logits for the whole
sequence at once, and `--chunk` positions at a time with each chunk's logits recomputed
in the backward. Reports XLA's scratch bytes of both compiled steps (the memory the
chunking saves, exact) and their times taken turn by turn in one process (median).
`--compile-only` skips the timing (and the weights): for shapes that do not fit here.
XLA's FLOP count is not compared: it counts a loop's body once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step_cpu import SHAPES, alternate, compiled_cost, jax_spec, random_batch  # noqa: E402

from hbo_jax.config import MeshConfig  # noqa: E402
from hbo_jax.models.llama import abstract_model, init_params  # noqa: E402
from hbo_jax.parallel import make_mesh, replicated  # noqa: E402
from hbo_jax.step import (TrainState, init_train_state, make_optimizer, make_train_step,  # noqa: E402
                          state_shardings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat", action="store_true", help="rematerialise each block (model.remat)")
    ap.add_argument("--compile-only", action="store_true", help="report scratch bytes only, from shapes")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    spec, v = jax_spec(SHAPES[args.shape], args.dtype, remat=args.remat), SHAPES[args.shape][5]
    mesh = make_mesh(MeshConfig())
    tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
    if args.compile_only:
        graphdef, abstract = abstract_model(spec)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
        shardings = jax.tree.map(lambda _: replicated(mesh), state)
        batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32) for k in ("input_ids", "targets")}
        batch.update(loss_mask=jax.ShapeDtypeStruct((args.batch, args.seq), jnp.float32),
                     group_id=jax.ShapeDtypeStruct((args.batch,), jnp.int32))
    else:
        graphdef, params = init_params(spec, mesh, 0)
        state = init_train_state(params, tx, mesh)
        shardings = state_shardings(state)
        batch = random_batch(v, args.batch, args.seq, mesh)
    # The chunk size is a static model option: same weights, another graphdef.
    graphdefs = {"whole": graphdef, "chunked": abstract_model(dataclasses.replace(spec, loss_chunk=args.chunk))[0]}
    steps = {name: make_train_step(g, tx, mesh, 1, shardings) for name, g in graphdefs.items()}
    cost = {name: compiled_cost(step, state, batch) for name, step in steps.items()}
    res = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "chunk": args.chunk, "dtype": args.dtype,
           "remat": args.remat, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
           "logits_bytes": args.batch * args.seq * v * 4,
           "scratch_bytes": {n: c["scratch_bytes"] for n, c in cost.items()}}
    timing = ""
    if not args.compile_only:
        times, state = alternate(steps, state, batch, args.rounds)
        med = {name: float(np.median(t)) for name, t in times.items()}
        res.update(median_s=med, times_s=times)
        timing = f"; step {med['whole']:.3f} -> {med['chunked']:.3f} s ({med['chunked'] / med['whole']:.3f}x)"
    mb = {n: c["scratch_bytes"] / 2**20 for n, c in cost.items()}
    print(f"{res['devices']}; {args.shape} batch {args.batch} x {args.seq} {args.dtype}"
          f"{' remat' if args.remat else ''}, chunk {args.chunk}: scratch {mb['whole']:.0f} -> "
          f"{mb['chunked']:.0f} MiB (whole fp32 logits {res['logits_bytes'] / 2**20:.0f} MiB){timing}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
