"""Packing benchmark: the same sampler plans through the unpacked and the packed train step, one process.

    python benchmarks/packing.py BATCH SEQ_LEN TIMED_STEPS [PACK_ROWS] [CACHE_DIR]
    e.g. python benchmarks/packing.py 64 256 8     (results: docs/benchmarks.md)

Runs on the committed fixture (tests/fixtures/mixture) with the demo model shape.
"""
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hbo_jax.config import load_config
from hbo_jax.data.packing import default_pack_rows, first_fit_rows, packed_length
from hbo_jax.scorer import prepare
from hbo_jax.data.sampler import HierarchicalSampler, ProbabilitySchedule, batch_iterator
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import make_mesh, global_batch_from_host
from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings

B, T, STEPS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CACHE = sys.argv[5] if len(sys.argv) > 5 else "/tmp/hbo_jax_packing_bench"
cfg = load_config(None, [f"data.source_dir={ROOT / 'tests' / 'fixtures' / 'mixture'}", f"data.cache_dir={CACHE}",
                         f"data.seq_len={T}", "scorer.warmup_steps=20", "model.init=random", f"train.batch_size={B}"])
mesh = make_mesh(cfg.mesh)
data = prepare(cfg, mesh)
d, k = len(data.names), data.num_buckets
L = np.concatenate([s.lengths for s in data.train])
print("devices", jax.devices(), "examples", len(L),
      "ids per example pct 10/50/90/max", np.percentile(L, [10, 50, 90, 100]))
spec = LlamaSpec.from_config(cfg.model, vocab_size=len(data.tokenizer))
print("params", spec.num_params())
leaves = data.leaves()
uniform = lambda: ProbabilitySchedule(np.ones(d), np.ones((d, k)))
sp = HierarchicalSampler(leaves, B, 0, uniform())
need = []
for _ in range(1000):
    p = sp.next_plan()
    need.append(first_fit_rows([packed_length(len(data.train[ds][i][0]), T)
                                for ds, i in zip(p["dataset"], p["index"])], T))
ROWS = int(sys.argv[4]) if len(sys.argv) > 4 else default_pack_rows(B, float(np.mean(np.minimum(L, T + 1) - 1)), T, 1)
print("first-fit rows needed over 1000 steps: mean %.2f max %d; pack_rows %d overflows %d of them" % (
    np.mean(need), max(need), ROWS, sum(n > ROWS for n in need)))
for packing in (False, True):
    graphdef, params = init_params(spec, mesh, 0)
    tx = make_optimizer(1e-3, 100, 1, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, d * k, state_shardings(state), packing=packing)
    stats = {}
    it = batch_iterator(HierarchicalSampler(leaves, B, 0, uniform()), data.train, T, data.pad_id, slice(0, B),
                        pack_rows=ROWS if packing else 0, pack_stats=stats)
    batches = [next(it) for _ in range(STEPS + 2)][1:]  # the first step is the warm-up
    slots = sum(b["input_ids"].size for b in batches[1:])
    state, m = step(state, global_batch_from_host(batches[0], mesh))
    jax.block_until_ready(m)  # compile
    if packing:  # also compile the overflow shape (B rows), so the timed loop has no compile
        grown = {key: (np.pad(v, ((0, B - v.shape[0]), (0, 0))) if v.ndim == 2 else v)
                 for key, v in batches[0].items()}
        _, m = step(jax.tree.map(lambda x: x.copy(), state), global_batch_from_host(grown, mesh))
        jax.block_until_ready(m)
    tok, losses = 0.0, []
    t = time.perf_counter()
    for b in batches[1:]:
        state, m = step(state, global_batch_from_host(b, mesh))
        tok += float(m["tokens"])
        losses.append(float(m["loss"]))
    dt = time.perf_counter() - t
    print("packed" if packing else "unpacked",
          dict(rows=batches[1]["input_ids"].shape[0], s_per_step=round(dt / STEPS, 3),
               loss_tokens_per_s=round(tok / dt, 1), loss_tokens=tok, slots=slots, losses=losses,
               overflow=stats.get("overflow_steps")), flush=True)
# Padding: token slots not taken by any example (same plans, so the same occupied slots).
sp = HierarchicalSampler(leaves, B, 0, uniform())
sp.next_plan()
sp.next_plan()
occ = sum(packed_length(len(data.train[ds][i][0]), T) for _ in range(STEPS)
          for p in [sp.next_plan()] for ds, i in zip(p["dataset"], p["index"]))
print("occupied slots", occ,
      "padding unpacked %.3f packed %.3f" % (1 - occ / (STEPS * B * T), 1 - occ / (STEPS * ROWS * T)))
