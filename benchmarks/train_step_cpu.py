"""Train-step speed of hbo_jax against transformers + PyTorch on the same model and batch.

    python benchmarks/train_step_cpu.py --torch-python /path/to/venv-with-torch/bin/python

Both sides train the same Llama-shaped model from random weights (SmolLM2-135M's shape by
default) with AdamW, gradient clipping, a response-masked mean loss, the same batch and
sequence length, fp32. Each side runs in its own process (`--impl jax|torch`); the
driver alternates them for `--rounds` rounds so drift on a noisy machine hits both, and
reports median seconds per step, tokens per second, model FLOP/s and the ratio. On a
GPU, run `--impl jax` alone and pass the chip's peak (`--peak-tflops 989` for an H100's
dense bf16) for MFU; `--peak-tflops measure` uses the best square-matmul throughput this
device reaches in the compute dtype instead, which is the meaningful peak on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied
    "smollm2_135m": (576, 30, 9, 3, 1536, 49152, True),
    "llama_1b": (2048, 16, 32, 8, 8192, 128256, True),
    "tiny": (128, 4, 4, 2, 384, 2048, True),
}


def model_flops_per_token(shape, seq: int) -> float:
    """6 N (dense matmuls, forward + backward) + attention scores, per trained token."""
    d, layers, h, kv, f, v, tied = shape
    hd = d // h
    n = layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f) + v * d
    return 6.0 * n + 12.0 * layers * d * seq


def jax_spec(shape, dtype: str, loss_chunk: int = 0, remat: bool = False, attention: str = "auto"):
    """Our LlamaSpec of a SHAPES entry (fp32 parameters, compute in `dtype`)."""
    from hbo_jax.models.llama import LlamaSpec

    d, layers, h, kv, f, v, tied = shape
    return LlamaSpec(vocab_size=v, hidden_size=d, num_layers=layers, num_heads=h, num_kv_heads=kv,
                     head_dim=d // h, intermediate_size=f, rope_theta=1e4, rms_norm_eps=1e-5,
                     tie_embeddings=tied, qkv_bias=False, dtype=dtype, param_dtype="float32", remat=remat,
                     loss_chunk=loss_chunk, attention=attention)


def random_batch(vocab: int, batch: int, seq: int, mesh) -> dict:
    """A global batch of random tokens whose first quarter of each row is an unscored prompt."""
    import numpy as np

    from hbo_jax.parallel import global_batch_from_host

    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    mask = np.ones((batch, seq), np.float32)
    mask[:, : seq // 4] = 0.0
    return global_batch_from_host({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
                                   "group_id": np.zeros(batch, np.int32)}, mesh)


def compiled_cost(step, state, batch) -> dict:
    """XLA's FLOP count and scratch bytes of a compiled step: its work and memory, free of timing noise."""
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    return {"flops": float((cost[0] if isinstance(cost, list) else cost)["flops"]),
            "scratch_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def alternate(steps: dict, state, batch, rounds: int) -> tuple[dict, object]:
    """Times jitted `step(state, batch)` variants turn by turn in one process, after one
    compile/warm-up call each, so every variant sees the same machine load.

    Returns ({name: [seconds per call]}, the final state).
    """
    import jax

    def run(step) -> float:
        nonlocal state
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        return time.perf_counter() - t0

    for step in steps.values():
        run(step)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(run(step))
    return times, state


def run_jax(shape, batch: int, seq: int, steps: int, warmup: int, dtype: str, **spec_options) -> list[float]:
    """Seconds of each timed train step (after `warmup` untimed ones, the first compiles).

    `spec_options`: `jax_spec`'s keywords (loss_chunk, remat, attention).
    """
    import jax
    import numpy as np

    from hbo_jax.config import MeshConfig
    from hbo_jax.models.llama import init_params
    from hbo_jax.parallel import global_batch_from_host, make_mesh
    from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings

    spec, v = jax_spec(shape, dtype, **spec_options), shape[5]
    mesh = make_mesh(MeshConfig())
    graphdef, params = init_params(spec, mesh, 0)
    tx = make_optimizer(1e-4, 1000, 10, 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    step = make_train_step(graphdef, tx, mesh, 1, state_shardings(state))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, v, (batch, seq + 1)).astype(np.int32)
    host = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
            "group_id": np.zeros(batch, np.int32)}
    b = global_batch_from_host(host, mesh)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measured_peak_tflops(dtype: str) -> float:
    """Best throughput of a jitted square matmul (n = 1024, 2048, 4096) on the default device."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in (1024, 2048, 4096):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(5):
            f(a).block_until_ready()
        best = max(best, 2 * n**3 * 5 / (time.perf_counter() - t0) / 1e12)
    return best


def run_torch(shape, batch: int, seq: int, steps: int, warmup: int, dtype: str) -> list[float]:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d, layers, h, kv, f, v, tied = shape
    cfg = LlamaConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=h,
                      num_key_value_heads=kv, intermediate_size=f, tie_word_embeddings=tied,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, v, (batch, seq + 1)).astype(np.int64))
    x, y, mask = ids[:, :-1], ids[:, 1:], torch.ones(batch, seq)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, v), y.reshape(-1), reduction="none")
        loss = (nll * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=("jax", "torch", "compare"), default="compare")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one timed run, raw times out
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="compute dtype of the jax side (float32 | bfloat16)")
    ap.add_argument("--torch-python", default=sys.executable, help="python of a venv with torch + transformers")
    ap.add_argument("--peak-tflops", default="0",
                    help="device peak TFLOP/s for MFU: a number, 'measure' (best jitted matmul here), or 0 (none)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    if args.worker:
        fn = run_jax if args.impl == "jax" else run_torch
        print(json.dumps(fn(shape, args.batch, args.seq, args.steps, args.warmup, args.dtype)))
        return
    here = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(here)))
    common = ["--worker", "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype]
    impls = {"jax": sys.executable, "torch": args.torch_python}
    if args.impl != "compare":
        impls = {args.impl: impls[args.impl]}
    times = {impl: [] for impl in impls}
    for r in range(args.rounds):
        for impl, py in impls.items():
            out = subprocess.run([py, here, "--impl", impl, *common], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{impl} run failed:\n{out.stderr[-3000:]}")
            times[impl] += json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}: {impl} median {statistics.median(times[impl]):.3f} s/step", flush=True)
    peak = measured_peak_tflops(args.dtype) if args.peak_tflops == "measure" else float(args.peak_tflops)
    tokens = args.batch * args.seq
    flops = model_flops_per_token(shape, args.seq) * tokens
    result = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
              "model_gflop_per_step": flops / 1e9}
    if peak:
        result["peak_tflops"] = {"value": peak,
                                 "source": "measured matmul" if args.peak_tflops == "measure" else "given"}
    for impl, ts in times.items():
        med = statistics.median(ts)
        result[impl] = {"median_s_per_step": med, "tokens_per_s": tokens / med,
                        "model_tflops_per_s": flops / med / 1e12, "steps_timed": len(ts)}
        if peak:
            result[impl]["mfu"] = flops / med / 1e12 / peak
    if len(times) == 2:
        result["jax_speedup_over_torch"] = result["torch"]["median_s_per_step"] / result["jax"]["median_s_per_step"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

if __name__ == "__main__":
    main()
