"""Mixing overhead of HBO: probe and actor-update cost against the train step, one process.

Measures on random-token data with the demo model (or --hidden/--layers), at the
reference code's probe counts (global 8 examples per (dataset, bucket)
with a backward pass, local 16 per (dataset, bucket) forward only):

  step      one train step at --batch x --seq (the static-sampling run's cost per step)
  batched   our jitted, batched probes: global grad norms (lax.map over datasets) and
            local per-example NLL, plus the jitted actor updates
  train     as batched, but the local reward from training-batch statistics (no local probes)
  zero      no probes at all: the local reward from training-batch statistics and the global
            reward from per-example gradient norms of the last M training steps before each
            update (mixing.global_source=train); its cost is M x (ghost step - plain step),
            timed alternately in one loop, plus the actor updates
  ref       the reference code's schedule: one example per call, global fwd+bwd, local fwd
            (jitted per example here, so this understates the reference's Python overhead)

and reports, for update intervals F, the share of wall clock spent on mixing:
    share(F) = update_seconds / (F * step_seconds + update_seconds).
(The zero mode's M = --global-train-steps, capped at F.)
Every number is measured in this run; the shares are computed from those measurements.

Usage: python benchmarks/mixing_overhead.py [--datasets 8] [--buckets 4] [--batch 64] [--seq 128]
       python benchmarks/mixing_overhead.py --scaling   # cost vs number of datasets / buckets
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from hbo_jax.config import MeshConfig, MixingConfig, ModelConfig
from hbo_jax.mixing import actors, global_rewards, rewards
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import batch_divisor, global_batch_from_host, make_mesh, replicated
from hbo_jax.step import (init_train_state, make_example_nll_fn, make_optimizer, make_train_step,
                          state_shardings)

GLOBAL_PER_BUCKET, LOCAL_PER_GROUP = 8, 16  # reference code: 4x2 and 8x2


def _rows(n: int, seq: int, vocab: int, rng) -> dict:
    mask = np.zeros((n, seq), np.float32)
    mask[:, seq // 2:] = 1.0  # second half is the "response"
    return {"input_ids": rng.integers(0, vocab, (n, seq)).astype(np.int32),
            "targets": rng.integers(0, vocab, (n, seq)).astype(np.int32), "loss_mask": mask}


def _time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _alternate(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed in turns so they share the machine's load."""
    for fn in fns.values():
        fn()  # compile / warm up
    times: dict = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def measure(d: int, k: int, batch: int, seq: int, spec: LlamaSpec, mesh, repeats: int, ref: bool) -> dict:
    rng = np.random.default_rng(0)
    graphdef, params = init_params(spec, mesh, 0)
    tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
    state = init_train_state(jax.tree.map(lambda x: x.copy(), params), tx, mesh)
    g = d * k
    step = make_train_step(graphdef, tx, mesh, g, state_shardings(state), ref_nll=True)
    ghost_step = make_train_step(graphdef, tx, mesh, g, state_shardings(state), ref_nll=True, example_gradnorm=True)
    b = _rows(batch, seq, spec.vocab_size, rng)
    b["group_id"] = rng.integers(0, g, batch).astype(np.int32)
    b["ref_nll"] = np.full(batch, 5.0, np.float32)
    gb = global_batch_from_host(b, mesh)
    holder = {"state": state}

    def train_once(fn=step):
        holder["state"], m = fn(holder["state"], gb)
        jax.block_until_ready(m)

    # Enough turns for a stable median; a ghost step is one train step plus its norms.
    steps = _alternate({"step_s": train_once, "ghost_step_s": lambda: train_once(ghost_step)}, 3 * repeats)
    out = {"datasets": d, "buckets": k, **steps}

    mc = MixingConfig()
    mstate = jax.device_put(actors.init_mixer(np.ones(d) / d, k, LOCAL_PER_GROUP, mc.actor_lr), replicated(mesh))
    gradnorm = global_rewards.make_gradnorm_fn(graphdef, mesh, d)
    nll_fn = make_example_nll_fn(graphdef, mesh)
    gprobe = rewards.pad_per_dataset(_rows(d * k * GLOBAL_PER_BUCKET, seq, spec.vocab_size, rng), d, mesh)
    lprobe = _rows(g * LOCAL_PER_GROUP, seq, spec.vocab_size, rng)
    chunk = min(len(lprobe["input_ids"]), max(batch, 1))

    def global_update():
        r = gradnorm(params, *rewards.to_device(gprobe, mesh))
        s, _ = actors.update_global(mstate, r, lr=mc.actor_lr, inner_steps=mc.inner_steps, ema=0.0)
        jax.block_until_ready(s)

    def local_probe_update():
        nll = rewards.batched_example_nll(nll_fn, params, lprobe, chunk, mesh)
        rel = rewards.relative(np.exp(nll.reshape(d, k, -1) - 5.0).mean(-1))
        jax.block_until_ready(actors.update_local(mstate, jax.device_put(rel.astype(np.float32), replicated(mesh)),
                                                  lr=mc.actor_lr, inner_steps=mc.inner_steps))

    def local_train_update():
        ratio = rewards.train_ppl_ratio(np.ones((d, k)) * 3.0, np.full((d, k), 3))
        rel = rewards.relative(ratio)
        jax.block_until_ready(actors.update_local(mstate, jax.device_put(rel.astype(np.float32), replicated(mesh)),
                                                  lr=mc.actor_lr, inner_steps=mc.inner_steps))

    def global_train_update():  # the reward is already on the host: the actor update only
        r = jax.device_put(np.linspace(1.0, 2.0, d).astype(np.float32), replicated(mesh))
        s, _ = actors.update_global(mstate, r, lr=mc.actor_lr, inner_steps=mc.inner_steps, ema=0.0)
        jax.block_until_ready(s)

    out["global_s"] = _time(global_update, repeats)
    out["global_train_actor_s"] = _time(global_train_update, repeats)
    out["local_probes_s"] = _time(local_probe_update, repeats)
    out["local_train_s"] = _time(local_train_update, repeats)
    out["batched_update_s"] = out["global_s"] + out["local_probes_s"]
    out["train_update_s"] = out["global_s"] + out["local_train_s"]
    out["ghost_extra_s"] = max(out["ghost_step_s"] - out["step_s"], 0.0)
    out["zero_actors_s"] = out["global_train_actor_s"] + out["local_train_s"]
    if ref and batch_divisor(mesh) > 1:
        print("skipping the one-example-per-call mode: it needs a mesh whose batch axes are 1")
    elif ref:
        one = lambda x, i: {key: v[i:i + 1] for key, v in x.items()}
        g1 = global_rewards.make_gradnorm_fn(graphdef, mesh, 1)

        def ref_update():  # one example per call, as in the reference code
            for i in range(d * k * GLOBAL_PER_BUCKET):
                jax.block_until_ready(g1(params, *(jax.numpy.asarray(v) for v in one(gprobe, i).values())))
            for i in range(g * LOCAL_PER_GROUP):
                jax.block_until_ready(nll_fn(params, *(jax.numpy.asarray(v) for v in one(lprobe, i).values())))

        out["ref_update_s"] = _time(ref_update, 1)
    return out


def shares(row: dict, global_train_steps: int, intervals=(50, 100, 200, 500)) -> dict:
    res = {}
    for mode in ("batched", "train", "ref"):
        key = f"{mode}_update_s"
        if key in row:
            res[mode] = {f: row[key] / (f * row["step_s"] + row[key]) for f in intervals}
    zero = {f: min(global_train_steps or f, f) * row["ghost_extra_s"] + row["zero_actors_s"] for f in intervals}
    res["zero"] = {f: zero[f] / (f * row["step_s"] + zero[f]) for f in intervals}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="training sequences per step (reference: 64)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--global-train-steps", type=int, default=4,
                    help="zero mode: training steps per update that compute per-example norms (0 = all)")
    ap.add_argument("--scaling", action="store_true", help="sweep datasets 2..64 and buckets 1..16")
    ap.add_argument("--no-ref", action="store_true", help="skip the slow one-example-per-call mode")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    spec = LlamaSpec.from_config(ModelConfig(hidden_size=args.hidden, num_layers=args.layers,
                                             intermediate_size=3 * args.hidden), vocab_size=args.vocab)
    mesh = make_mesh(MeshConfig())
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; model {spec.num_params() / 1e6:.2f}M "
          f"params; batch {args.batch} x {args.seq}")
    if args.scaling:
        grid = [(d, args.buckets) for d in (2, 8, 32, 64)] + [(args.datasets, k) for k in (1, 4, 16)]
    else:
        grid = [(args.datasets, args.buckets)]
    results = []
    for d, k in grid:
        row = measure(d, k, args.batch, args.seq, spec, mesh, args.repeats, ref=not args.no_ref and not args.scaling)
        row["share"] = shares(row, args.global_train_steps)
        results.append(row)
        line = " ".join(f"{m}@{f}={100 * v:.1f}%" for m, s in row["share"].items() for f, v in s.items())
        print(f"D={d:3d} K={k:2d} step {row['step_s']:.3f}s ghost step {row['ghost_step_s']:.3f}s "
              f"| global {row['global_s']:.2f}s "
              f"local(probes) {row['local_probes_s']:.2f}s local(train) {row['local_train_s']:.3f}s"
              + (f" ref {row['ref_update_s']:.1f}s" if "ref_update_s" in row else "") + f" | {line}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
