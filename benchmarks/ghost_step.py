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
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from train_step_cpu import SHAPES, jax_spec  # noqa: E402

from hbo_jax.config import MeshConfig  # noqa: E402
from hbo_jax.models.llama import init_params  # noqa: E402
from hbo_jax.parallel import global_batch_from_host, make_mesh  # noqa: E402
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
    holder = {"state": init_train_state(params, tx, mesh)}
    shardings = state_shardings(holder["state"])
    steps = {name: make_train_step(graphdef, tx, mesh, 1, shardings, example_gradnorm=ghost)
             for name, ghost in (("plain", False), ("ghost", True))}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, v, (args.batch, args.seq + 1)).astype(np.int32)
    mask = np.ones((args.batch, args.seq), np.float32)
    mask[:, : args.seq // 4] = 0.0  # a prompt
    batch = global_batch_from_host({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
                                    "group_id": np.zeros(args.batch, np.int32)}, mesh)

    def flops(name: str) -> float:  # XLA's count for the compiled step: the work, free of timing noise
        cost = steps[name].lower(holder["state"], batch).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    work = {name: flops(name) for name in steps}

    def run(name: str) -> float:
        t0 = time.perf_counter()
        holder["state"], m = steps[name](holder["state"], batch)
        jax.block_until_ready(m)
        return time.perf_counter() - t0

    for name in steps:
        run(name)  # compile and warm up
    times: dict = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name in steps:
            times[name].append(run(name))
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
