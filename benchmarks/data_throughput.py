"""Data pipeline throughput: the sampler against the train step, and difficulty scoring.

Measured in one process on synthetic token stores (random ids, random lengths up to
--seq + 1 tokens, a response mask on each example's second half):

  sampler   HierarchicalSampler plans (dataset ~ p_global, bucket ~ p_local, example
            without replacement), then the Grain batch iterator that gathers and pads
            the rows (`batch_iterator`), then the same plus the host->device copy the
            train loop does (`global_batch_from_host`): batches/s and examples/s at
            --batch x --seq.
  train     one jitted train step of the demo model (or --hidden/--layers) at
            --train-batch x --seq, as examples/s: what the trainer consumes. It is run at a
            smaller batch than the sampler (the attention scores of 64 x 2048 tokens do
            not fit this machine's memory comfortably); examples/s is per example, so the
            two compare directly.
  score     `hbo_jax.data.scoring.score_examples` (length-sorted, padded to power-of-two
            widths, jitted per-example NLL, results read back) against a plain jitted
            forward (logits, nothing read back) over the very same padded batches, already
            on the device: score throughput as a fraction of the plain forward's.

Usage: python benchmarks/data_throughput.py [--batch 64] [--seq 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.data.scoring import score_examples
from hbo_jax.data.sampler import HierarchicalSampler, ProbabilitySchedule, batch_iterator
from hbo_jax.data.store import TokenStore, collate
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import global_batch_from_host, make_mesh, round_up_rows
from hbo_jax.step import init_train_state, make_example_nll_fn, make_optimizer, make_train_step, state_shardings


def synthetic_examples(n: int, max_len: int, vocab: int, rng, min_len: int = 16) -> list:
    """(ids, mask) pairs with uniform random lengths; the second half of each is the response."""
    out = []
    for length in rng.integers(min_len, max_len + 1, n):
        mask = np.zeros(length, np.uint8)
        mask[length // 2:] = 1
        out.append((rng.integers(3, vocab, length).astype(np.int32), mask))
    return out


def _rate(fn, seconds: float, min_calls: int = 3) -> tuple[float, int]:
    """Calls per second of fn over at least `seconds` (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0), n


def bench_sampler(args, mesh, root: Path) -> dict:
    rng = np.random.default_rng(0)
    stores, leaves = [], []
    for d in range(args.datasets):
        examples = synthetic_examples(args.examples, args.seq + 1, args.vocab, rng)
        stores.append(TokenStore.write(root / f"d{d}", examples))
        bucket = rng.integers(0, args.buckets, args.examples)
        leaves.append([np.flatnonzero(bucket == j) for j in range(args.buckets)])
    sched = ProbabilitySchedule(rng.dirichlet(np.ones(args.datasets)),
                                rng.dirichlet(np.ones(args.buckets), args.datasets))
    plan_only = HierarchicalSampler(leaves, args.batch, 0, sched)
    plans, _ = _rate(plan_only.next_plan, args.seconds)
    it = batch_iterator(HierarchicalSampler(leaves, args.batch, 0, sched), stores, args.seq, 0, slice(None))
    batches, n = _rate(lambda: next(it), args.seconds)
    it2 = batch_iterator(HierarchicalSampler(leaves, args.batch, 0, sched), stores, args.seq, 0, slice(None))
    to_dev, _ = _rate(lambda: jax.block_until_ready(global_batch_from_host(next(it2), mesh)), args.seconds)
    return {"plans_per_s": plans, "batches_per_s": batches, "examples_per_s": batches * args.batch,
            "batches_per_s_to_device": to_dev, "examples_per_s_to_device": to_dev * args.batch,
            "timed_batches": n}


def bench_train(args, mesh, spec: LlamaSpec) -> dict:
    rng = np.random.default_rng(1)
    graphdef, params = init_params(spec, mesh, 0)
    tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, args.datasets * args.buckets, state_shardings(state))
    ex = synthetic_examples(args.train_batch, args.seq + 1, spec.vocab_size, rng, min_len=args.seq + 1)
    batch = collate(ex, args.seq, 0)  # full-length rows: the worst case the sampler can hand over
    batch["group_id"] = rng.integers(0, args.datasets * args.buckets, args.train_batch).astype(np.int32)
    gb = global_batch_from_host(batch, mesh)
    holder = {"state": state}

    def once():
        holder["state"], m = step(holder["state"], gb)
        jax.block_until_ready(m)

    steps, n = _rate(once, 0.0, min_calls=args.train_steps)
    return {"train_batch": args.train_batch, "steps_per_s": steps, "examples_per_s": steps * args.train_batch,
            "tokens_per_s": steps * args.train_batch * args.seq, "timed_steps": n, "params": spec.num_params()}


def bench_score(args, mesh, spec: LlamaSpec) -> dict:
    rng = np.random.default_rng(2)
    graphdef, params = init_params(spec, mesh, 0)
    examples = synthetic_examples(args.score_examples, args.score_seq + 1, spec.vocab_size, rng, min_len=32)
    nll_fn = make_example_nll_fn(graphdef, mesh)
    bs = round_up_rows(args.score_batch, mesh)
    score = lambda: score_examples(examples, nll_fn, params, mesh, args.score_seq, 0, bs)

    # The same padded batches score_examples builds (length order, power-of-two widths).
    lengths = np.array([len(ids) for ids, _ in examples])
    order = np.argsort(lengths, kind="stable")
    batches = []
    for a in range(0, len(order), bs):
        idx = order[a:a + bs]
        width = int(min(args.score_seq, max(32, 2 ** int(np.ceil(np.log2(max(lengths[idx].max() - 1, 1)))))))
        chunk = [examples[i] for i in idx] + [examples[idx[0]]] * (bs - len(idx))
        batches.append(global_batch_from_host({"input_ids": collate(chunk, width, 0)["input_ids"]}, mesh)["input_ids"])
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def plain():
        for x in batches:
            jax.block_until_ready(forward(params, x))

    score(), plain()  # compile every width for both
    t_score = min(_timed(score) for _ in range(args.repeats))
    t_plain = min(_timed(plain) for _ in range(args.repeats))
    return {"examples": len(examples), "batch": bs, "seq": args.score_seq, "batches": len(batches),
            "score_s": t_score, "plain_forward_s": t_plain, "score_examples_per_s": len(examples) / t_score,
            "plain_examples_per_s": len(examples) / t_plain, "fraction_of_plain": t_plain / t_score}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="sampler batch (examples per step)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--examples", type=int, default=2000, help="synthetic examples per dataset")
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per sampler measurement")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--score-examples", type=int, default=512)
    ap.add_argument("--score-seq", type=int, default=512)
    ap.add_argument("--score-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sampler,train,score")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    mesh = make_mesh(MeshConfig(-1, 1, 1))
    spec = LlamaSpec.from_config(ModelConfig(hidden_size=args.hidden, num_layers=args.layers,
                                             intermediate_size=3 * args.hidden), vocab_size=args.vocab)
    out = {"devices": f"{len(jax.devices())} x {jax.devices()[0].platform}", "args": vars(args)}
    if "sampler" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            out["sampler"] = bench_sampler(args, mesh, Path(tmp))
        print("sampler", json.dumps(out["sampler"]), flush=True)
    if "train" not in skip:
        out["train"] = bench_train(args, mesh, spec)
        print("train", json.dumps(out["train"]), flush=True)
    if "sampler" in out and "train" in out:
        out["sampler_headroom"] = out["sampler"]["examples_per_s_to_device"] / out["train"]["examples_per_s"]
        print(f"sampler supplies {out['sampler_headroom']:.0f}x the examples/s the train step consumes")
    if "score" not in skip:
        out["score"] = bench_score(args, mesh, spec)
        print("score", json.dumps(out["score"]), flush=True)
        print(f"scoring runs at {out['score']['fraction_of_plain']:.2f} of the plain forward's throughput "
              "(target >= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
