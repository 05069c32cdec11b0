"""Cost of per-example gradient norms in the train step (`mixing.global_source=train`).

    python benchmarks/ghost_step.py --shape smollm2_135m --batch 2 --seq 128 --rounds 5

Builds the plain train step and the one that also returns per-example gradient norms
(`make_train_step(..., example_gradnorm=True)`, hbo_jax/models/ghost.py) for the same
model, batch and state, and times them in alternation within one process (median
seconds per step over `--rounds` turns, after a compile/warm-up call of each), so the
ratio is measured under the same machine load; it also reports XLA's FLOP count of both
compiled steps (the extra work, free of timing noise). A global reward from training steps
costs (ghost - plain) seconds for each of the `mixing.global_train_steps` steps before
an update.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step_cpu import SHAPES, alternate, compiled_cost, jax_spec, random_batch  # noqa: E402

from hbo_jax.config import MeshConfig  # noqa: E402
from hbo_jax.models.llama import init_params  # noqa: E402
from hbo_jax.parallel import make_mesh  # noqa: E402
from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    spec, v = jax_spec(SHAPES[args.shape], args.dtype), SHAPES[args.shape][5]
    mesh = make_mesh(MeshConfig())
    graphdef, params = init_params(spec, mesh, 0)
    tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    steps = {name: make_train_step(graphdef, tx, mesh, 1, state_shardings(state), example_gradnorm=ghost)
             for name, ghost in (("plain", False), ("ghost", True))}
    batch = random_batch(v, args.batch, args.seq, mesh)
    work = {name: compiled_cost(step, state, batch)["flops"] for name, step in steps.items()}
    times, state = alternate(steps, state, batch, args.rounds)
    med = {name: float(np.median(t)) for name, t in times.items()}
    res = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "median_s": med,
           "times_s": times, "ghost_over_plain": med["ghost"] / med["plain"], "flops": work,
           "flops_ghost_over_plain": work["ghost"] / work["plain"]}
    print(f"{res['devices']}; {args.shape} batch {args.batch} x {args.seq} {args.dtype}: plain "
          f"{med['plain']:.3f} s/step, with per-example norms {med['ghost']:.3f} s/step "
          f"({res['ghost_over_plain']:.3f}x); XLA FLOPs {work['plain']:.3e} vs {work['ghost']:.3e} "
          f"({res['flops_ghost_over_plain']:.3f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
