"""Compile time of the train step with unrolled vs stacked (`model.scan_layers`) blocks.

    python benchmarks/compile_time.py [--layers 30] [--hidden 64] [--rounds 3]

XLA compiles an unrolled model's `num_layers` blocks one by one and a scanned model's one
block once, so compile time grows with depth only for the former. Each measurement runs
in a fresh process (nothing cached), variants alternate round by round so machine load
hits both alike, and the step is compiled from shapes alone (`jit(...).lower(...)`:
tracing and lowering; `.compile()`: XLA). Compile time depends on the layer count, not
on the width, so a narrow model suffices. Prints the medians and their ratio as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(layers: int, hidden: int, scan: bool, remat: bool, batch: int, seq: int) -> dict:
    """Seconds to lower and to compile one train step (full fine-tuning, AdamW) on one device."""
    import jax

    from hbo_jax.config import MeshConfig, ModelConfig
    from hbo_jax.models.llama import LlamaSpec, abstract_model
    from hbo_jax.parallel import make_mesh, tree_shardings
    from hbo_jax.step import abstract_train_state, make_optimizer, make_train_step, state_shardings

    spec = LlamaSpec.from_config(ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                                             intermediate_size=2 * hidden, remat=remat, scan_layers=scan),
                                 vocab_size=1024)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, abstract = abstract_model(spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          tree_shardings(abstract, mesh))
    tx = make_optimizer(1e-4, 100, 10, 0.0, 1.0)
    state = abstract_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, 1, state_shardings(state))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jax.numpy.int32)  # noqa: E731
    batch_ = {"input_ids": i32(batch, seq), "targets": i32(batch, seq),
              "loss_mask": jax.ShapeDtypeStruct((batch, seq), jax.numpy.float32), "group_id": i32(batch)}
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--remat", action="store_true", help="rematerialise each block (model.remat)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", choices=("unrolled", "scanned"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.layers, args.hidden, args.worker == "scanned", args.remat, args.batch,
                                 args.seq)))
        return
    here = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(here)), JAX_PLATFORMS="cpu")
    common = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--batch", str(args.batch),
              "--seq", str(args.seq), *(["--remat"] if args.remat else [])]
    runs = {"unrolled": [], "scanned": []}
    for r in range(args.rounds):
        for name in runs:
            out = subprocess.run([sys.executable, here, "--worker", name, *common], env=env, capture_output=True,
                                 text=True)
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name} {runs[name][-1]}", flush=True)
    result = {"layers": args.layers, "hidden": args.hidden, "remat": args.remat, "rounds": args.rounds}
    for name, rs in runs.items():
        result[name] = {k: statistics.median(x[k] for x in rs) for k in ("lower_s", "compile_s")}
    total = {name: result[name]["lower_s"] + result[name]["compile_s"] for name in runs}
    result["unrolled_over_scanned"] = total["unrolled"] / total["scanned"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
