"""Memory and step time of ScaleBiO (full, and with LISA) against plain fine-tuning.

    python benchmarks/scalebio_step.py --shape smollm2_135m --gammas 2 4 --time --rss
    python benchmarks/scalebio_step.py --shape llama_1b --gammas 2 4            # memory only

Variants, all on one device with stacked blocks (`model.scan_layers`), from the shapes of
`benchmarks/train_step_cpu.py`:

- `plain`: one model, AdamW over every parameter (`hbo_jax.step.make_train_step`);
- `scalebio`: u, w and lambda, AdamW over every parameter of u and of w
  (`hbo_jax.mixing.scalebio_step.make_scalebio_step`, three forward+backward passes);
- `scalebio_lisa_<g>`: the same with `scalebio.lisa_layers=g` (moments of the view only).

Memory is XLA's buffer assignment of the compiled step, as `python -m hbo_jax.memory`
reports it (`scalebio_memory`, also what an accelerator run calls). `--time` runs the steps
on random weights, the variants taking turns step by step, and reports medians; `--rss`
runs each variant alone in a fresh process for `--rss-steps` steps and reports its peak
resident memory (`ru_maxrss`: the host's view, which on CPU includes the device buffers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lisa_step import shape_arguments  # noqa: E402
from train_step_cpu import SHAPES, jax_spec, random_batch  # noqa: E402

NUM_SOURCES = 10  # the reference's v2 math setup


def _setup(shape: str, batch: int, seq: int, remat: bool):
    import jax
    import jax.numpy as jnp

    from hbo_jax.config import MeshConfig
    from hbo_jax.models.llama import abstract_model
    from hbo_jax.parallel import batch_sharding, make_mesh, tree_shardings

    spec = dataclasses.replace(jax_spec(SHAPES[shape], "float32", remat=remat), scan_layers=True)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    graphdef, abstract = abstract_model(spec)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                          tree_shardings(abstract, mesh))
    rows = batch_sharding(mesh)
    shaped = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows) for k in ("input_ids", "targets")}
    shaped.update(loss_mask=jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=rows),
                  group_id=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding(mesh, 1)))
    return spec, mesh, graphdef, params, shaped


def _variant(name: str, graphdef, params, mesh, real: bool):
    """(jitted step, its arguments but the batches, callable(args, batch) -> new args, LISA's block
    indices or None (plain, full ScaleBiO)).

    `params` abstract (ShapeDtypeStructs, for compiling) or real (for running)."""
    import jax
    import jax.numpy as jnp

    from hbo_jax import lisa
    from hbo_jax.config import ScaleBiOConfig
    from hbo_jax.mixing.scalebio_step import FULL, LISA, LambdaState, init_lambda, make_optimizers, make_scalebio_step
    from hbo_jax.parallel import replicated
    from hbo_jax.step import (abstract_train_state, init_train_state, make_optimizer, make_train_step,
                              state_shardings)

    if name == "plain":
        tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
        state = (init_train_state if real else abstract_train_state)(params, tx, mesh)
        step = make_train_step(graphdef, tx, mesh, NUM_SOURCES, state_shardings(state))
        return step, (state,), lambda args, batch: step(args[0], batch)[:1], None
    gamma = int(name.rsplit("_", 1)[1]) if name.startswith("scalebio_lisa_") else 0
    sc = ScaleBiOConfig(lisa_layers=gamma, validation_subsets=["v"])
    txs = make_optimizers(sc, 1000)
    rep = replicated(mesh)
    if real:
        copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
        init = (lambda p, tx: lisa.init_lisa_state(p, tx, mesh, gamma)) if gamma else \
            (lambda p, tx: init_train_state(p, tx, mesh))
        u, w = init(params, txs.u), init(copy(params), txs.w)
        lam = init_lambda(NUM_SOURCES, txs.lam, mesh)
        active = jax.device_put(lisa.LisaSchedule(jax.tree.leaves(params["layers"])[0].shape[0], gamma).active(0),
                                rep) if gamma else None
    else:
        init = (lambda p, tx: lisa.abstract_lisa_state(p, tx, mesh, gamma)) if gamma else \
            (lambda p, tx: abstract_train_state(p, tx, mesh))
        u, w = init(params, txs.u), init(params, txs.w)
        logits = jax.ShapeDtypeStruct((NUM_SOURCES,), jnp.float32, sharding=rep)
        lam = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                           jax.eval_shape(lambda x: LambdaState(x, txs.lam.init(x)), logits))
        active = jax.ShapeDtypeStruct((gamma,), jnp.int32, sharding=rep) if gamma else None
    shardings = (state_shardings(u), state_shardings(w), jax.tree.map(lambda _: rep, lam))
    step = make_scalebio_step(graphdef, txs, mesh, NUM_SOURCES, 1, sc, 1000, shardings, True,
                              LISA if gamma else FULL)
    extra = ({"u": active, "w": active},) if gamma else ()

    def run(args, batch):
        val = {k: batch[k] for k in ("input_ids", "targets", "loss_mask")}
        return step(*args, batch, val, *extra)[:3]

    return step, (u, w, lam), run, extra


def scalebio_memory(shape: str = "smollm2_135m", gammas=(2, 4), batch: int = 4, seq: int = 256,
                    remat: bool = False) -> dict:
    """Compiled memory (MiB) of plain fine-tuning, full ScaleBiO and LISA ScaleBiO at a shape.

    Returns:
        {"shape", "batch", "seq", "params_m", "memory_mib": {variant: {"arguments",
        "scratch", "peak", "peak_vs_plain"}}}.
    """
    from hbo_jax.memory import ProgramMemory

    spec, mesh, graphdef, params, shaped = _setup(shape, batch, seq, remat)
    val = {k: shaped[k] for k in ("input_ids", "targets", "loss_mask")}
    rows, parts = {}, {}
    for name in ("plain", "scalebio", *(f"scalebio_lisa_{g}" for g in gammas)):
        step, args, _, extra = _variant(name, graphdef, params, mesh, real=False)
        if extra is None:
            rows[name] = ProgramMemory.of(name, step.lower(*args, shaped).compile())
            continue
        # ScaleBiO's programs run one after the other: the device's peak is the largest one's.
        parts[name] = [ProgramMemory.of(*program) for program in step.compile(*args, shaped, val, *extra)]
        rows[name] = max(parts[name], key=lambda m: m.peak)
    mib = lambda x: x / 2**20  # noqa: E731
    row = lambda m: {"arguments": mib(m.arguments), "held": mib(m.held), "scratch": mib(m.scratch),  # noqa: E731
                     "peak": mib(m.peak), "peak_vs_plain": m.peak / rows["plain"].peak}
    return {"shape": shape, "batch": batch, "seq": seq, "remat": remat, "params_m": spec.num_params() / 1e6,
            "memory_mib": {n: {**row(m), "largest": m.name} for n, m in rows.items()},
            "programs_mib": {n: {m.name: row(m) for m in ms} for n, ms in parts.items()}}


def _runner(name: str, spec, mesh, graphdef):
    from hbo_jax.models.llama import init_params

    _, params = init_params(spec, mesh, 0)
    out = _variant(name, graphdef, params, mesh, real=True)
    return out[1], out[2]


def step_times(shape: str, gammas, batch: int, seq: int, remat: bool, rounds: int) -> dict:
    """Median seconds a step of each variant, the variants taking turns (round 0 compiles)."""
    import jax

    spec, mesh, graphdef, _, _ = _setup(shape, batch, seq, remat)
    data = random_batch(spec.vocab_size, batch, seq, mesh)
    runs = {name: _runner(name, spec, mesh, graphdef)
            for name in ("plain", "scalebio", *(f"scalebio_lisa_{g}" for g in gammas))}
    times = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, (args, fn) in runs.items():
            t0 = time.perf_counter()
            args = fn(args, data)
            jax.block_until_ready(args)
            runs[name] = (args, fn)
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {name: {"seconds": s, "vs_plain": s / med["plain"]} for name, s in med.items()}


def _worker(name: str, shape: str, batch: int, seq: int, remat: bool, steps: int) -> dict:
    import jax

    spec, mesh, graphdef, _, _ = _setup(shape, batch, seq, remat)
    data = random_batch(spec.vocab_size, batch, seq, mesh)
    args, fn = _runner(name, spec, mesh, graphdef)
    for _ in range(steps):
        args = fn(args, data)
    jax.block_until_ready(args)
    return {"variant": name, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def peak_rss(shape: str, gammas, batch: int, seq: int, remat: bool, steps: int) -> dict:
    """Peak resident memory (MiB) of each variant run alone in a fresh process."""
    here = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH")) if p))
    out = {}
    for name in ("plain", "scalebio", *(f"scalebio_lisa_{g}" for g in gammas)):
        cmd = [sys.executable, here, "--worker", name, "--shape", shape, "--batch", str(batch), "--seq", str(seq),
               "--rss-steps", str(steps), *(["--remat"] if remat else [])]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return {name: {"peak_rss_mib": v, "vs_plain": v / out["plain"]} for name, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape_arguments(ap)
    ap.add_argument("--rss", action="store_true", help="also the peak RSS of each variant in its own process")
    ap.add_argument("--rss-steps", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.shape, args.batch, args.seq, args.remat, args.rss_steps)))
        return
    result = scalebio_memory(args.shape, args.gammas, args.batch, args.seq, args.remat)
    if args.time:
        result["step_time"] = step_times(args.shape, args.gammas, args.batch, args.seq, args.remat, args.rounds)
    if args.rss:
        result["peak_rss"] = peak_rss(args.shape, args.gammas, args.batch, args.seq, args.remat, args.rss_steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
