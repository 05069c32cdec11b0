"""One prepared accelerator run: every measurement that needs a GPU, in one command.

    python benchmarks/accelerator_run.py [--smoke] [--out DIR] [--budget-s 470]
    python benchmarks/accelerator_run.py --render RESULT.json   # the docs block again, no run
    python benchmarks/accelerator_run.py --only scalebio_1b     # env and the named phases only

Phases, run one after another, each in its own process with its own time budget (a slow
compile or an out-of-memory error costs that phase only; the whole run stays under
--budget-s, 8 minutes by default, whatever one phase does):

  env             device kind and count, JAX version, the peak dense bf16 TFLOP/s of the chip
  train_smollm2   train-step tokens/s and MFU at SmolLM2-135M's shape (bf16 compute, fp32
  train_1b        master weights, cuDNN attention on a GPU) and at a ~1B (Llama-3.2-1B) shape
  sampler         the hierarchical sampler + batch iterator + host->device copy at 64 x 2048,
                  against the examples/s the SmolLM2 train step consumes
  mixing          HBO's mixing overhead (probes + actor updates) as a share of wall clock at
                  update intervals 50 and 200
  lisa_scalebio   memory of ScaleBiO / LISA runs (memory planner) once those modules exist;
                  "not available" before
  scalebio_1b     step time and the device's peak memory of plain fine-tuning, full ScaleBiO
                  and LISA ScaleBiO (gamma 2, 4) at the ~1B shape, each alone in its own
                  process (`benchmarks/scalebio_step.py`); full ScaleBiO does not fit a 24 GiB host
  merge           `python -m hbo_jax.merge` (select + resample, K = 3, SmolLM2-135M's shape) on the
                  machine's CPU cores and disk, against the disk's read rate
  study           the SmolLM2 study (benchmarks/study.py) at a GPU budget in the time the
                  others left; its results go to DIR/study and a rerun continues them

`--smoke` runs the very same code paths on the CPU with tiny shapes in well under a
minute (CI runs it); its numbers mean nothing. Output (format: docs/accelerator.md):
DIR/accelerator.json and DIR/accelerator.md; a full run also replaces the generated
block of docs/accelerator.md. DIR defaults to benchmarks/results/accelerator/<device>
(a full run) or a new temporary directory (--smoke).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the sibling benchmark modules and this checkout's hbo_jax

from train_step_cpu import SHAPES, jax_spec, model_flops_per_token, run_jax  # noqa: E402 (no JAX import)

DOCS = ROOT / "docs" / "accelerator.md"
BEGIN, END = "<!-- accelerator_run:begin -->", "<!-- accelerator_run:end -->"
FORMAT_VERSION = 1

# Peak dense bf16 TFLOP/s per chip, matched against jax.devices()[0].device_kind in order
# (vendor data sheets; sparsity excluded). H200 has H100's compute dies: the same 989.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L4", 121.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
                    ("TPU v5p", 459.0), ("TPU v4", 275.0), ("TPU v6", 918.0))

# name -> (budget in seconds on an accelerator, with --smoke). The order is the run order:
# the cheaper and more important measurements first, the study last.
# The smoke budgets are loose: they guard against a hang, not a slow shared CI machine.
PHASES = {"env": (30, 60), "train_smollm2": (100, 90), "train_1b": (120, 90), "sampler": (45, 60),
          "mixing": (120, 120), "lisa_scalebio": (45, 180), "scalebio_1b": (150, 180), "merge": (60, 60),
          "study": (0, 0)}
SAMPLER_BATCH, SAMPLER_SEQ = 64, 2048
# --smoke's model (hidden, layers, heads, kv heads, intermediate, vocab, tied): one small
# block, so that the compiles, not the shapes, are what the smoke run exercises.
SMOKE_SHAPE = (32, 1, 2, 1, 64, 512, True)
MIX_INTERVALS = (50, 200)
SCALEBIO_STEPS = 3  # per variant of `scalebio_1b`: the first compiles, the median of the others is its step time
# LISA inside ScaleBiO (two stacked-block models, optimizer state for the active blocks
# only); `scalebio.lisa_layers` is added per shape (at most its layer count).
# ScaleBiO as configs/scalebio.yaml runs it on the embedded mixture (the planner reads no data).
SCALEBIO_OVERRIDES: tuple[str, ...] = ("algorithm=scalebio", "scalebio.validation_subsets=[math_word]")
LISA_OVERRIDES: tuple[str, ...] = (*SCALEBIO_OVERRIDES, "model.scan_layers=true")
LISA_LAYERS = 2


def peak_tflops(device_kind: str) -> float | None:
    """The table's dense bf16 peak for a device kind, or None for an unknown chip."""
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def _accelerator() -> bool:
    import jax

    return jax.devices()[0].platform != "cpu"


# --- phases: each runs in a worker process and returns a JSON-able dict ------------------

def phase_env(smoke: bool) -> dict:
    import jax

    dev = jax.devices()[0]
    kind = dev.device_kind
    return {"device_kind": kind, "platform": dev.platform, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "peak_bf16_tflops": peak_tflops(kind)}


def _train(shape_name: str, smoke: bool, batch: int, seq: int, loss_chunk: int = 0) -> dict:
    """Median train-step time of `train_step_cpu.run_jax` at bf16, with cuDNN attention on a
    GPU when it compiles there (else XLA's), as tokens/s, model TFLOP/s and MFU."""
    import statistics

    import jax

    shape = SMOKE_SHAPE if smoke else SHAPES[shape_name]
    if smoke:  # loss chunking is the test suite's to check; here both phases share one program
        shape_name, batch, seq, loss_chunk = "smoke", 2, 64, 0
    tries = ["cudnn", "xla"] if jax.devices()[0].platform == "gpu" else ["xla"]
    errors = {}
    for attention in tries:
        try:
            times = run_jax(shape, batch, seq, steps=2 if smoke else 6, warmup=1 if smoke else 2, dtype="bfloat16",
                            attention=attention, loss_chunk=loss_chunk)
            break
        except Exception as e:  # noqa: BLE001 -- cuDNN may refuse a shape: fall back, say why
            errors[attention] = f"{type(e).__name__}: {str(e)[:300]}"
    else:
        raise RuntimeError(f"every attention implementation failed: {errors}")
    med = statistics.median(times)
    tokens, flops = batch * seq, model_flops_per_token(shape, seq) * batch * seq
    peak = peak_tflops(jax.devices()[0].device_kind)
    out = {"shape": shape_name, "batch": batch, "seq": seq, "dtype": "bfloat16", "attention": attention,
           "loss_chunk": loss_chunk, "median_s_per_step": med, "tokens_per_s": tokens / med,
           "examples_per_s": batch / med, "model_tflops_per_s": flops / med / 1e12,
           "mfu": flops / med / 1e12 / peak if peak else None, "steps_timed": len(times)}
    if errors:
        out["attention_fallback"] = errors
    return out


def phase_train_smollm2(smoke: bool) -> dict:
    return _train("smollm2_135m", smoke, batch=16, seq=SAMPLER_SEQ)


def phase_train_1b(smoke: bool) -> dict:
    # 128k-row vocabulary: the loss unembeds 512 positions at a time, as a real run would.
    return _train("llama_1b", smoke, batch=8, seq=SAMPLER_SEQ, loss_chunk=512)


def phase_sampler(smoke: bool) -> dict:
    """`data_throughput.bench_sampler` at 64 x 2048 on synthetic token stores (8 datasets x 4 buckets)."""
    from data_throughput import bench_sampler
    from hbo_jax.config import MeshConfig
    from hbo_jax.parallel import make_mesh

    args = argparse.Namespace(datasets=8, buckets=4, batch=SAMPLER_BATCH, seq=SAMPLER_SEQ, vocab=49152,
                              examples=2000, seconds=3.0)
    if smoke:
        args = argparse.Namespace(datasets=2, buckets=2, batch=8, seq=64, vocab=2048, examples=64, seconds=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        out = bench_sampler(args, make_mesh(MeshConfig(-1, 1, 1)), Path(tmp))
    return {"batch": args.batch, "seq": args.seq, "datasets": args.datasets, "buckets": args.buckets, **out}


def phase_mixing(smoke: bool) -> dict:
    """`mixing_overhead.measure` at SmolLM2-135M's shape (bf16), D=8 datasets x K=4 buckets,
    batch 64 x 512, the reference's probe counts; shares at update intervals 50 and 200."""
    from mixing_overhead import measure, shares
    from hbo_jax.config import MeshConfig
    from hbo_jax.parallel import make_mesh

    d, k, batch, seq, shape, repeats = 8, 4, 64, 512, "smollm2_135m", 3
    if smoke:
        d, k, batch, seq, shape, repeats = 2, 2, 8, 32, "smoke", 1
    attention = "cudnn" if _accelerator() and not smoke else "auto"
    spec = jax_spec(SMOKE_SHAPE if smoke else SHAPES[shape], "bfloat16", attention=attention)
    row = measure(d, k, batch, seq, spec, make_mesh(MeshConfig()), repeats, ref=False)
    row["share"] = {mode: {str(f): v for f, v in s.items()}
                    for mode, s in shares(row, global_train_steps=4, intervals=MIX_INTERVALS).items()}
    return {"shape": shape, "batch": batch, "seq": seq, "attention": attention, **row}


def phase_lisa_scalebio(smoke: bool) -> dict:
    """Per-program memory (`hbo_jax.memory.plan`) of ScaleBiO and LISA runs at the SmolLM2
    shape once those modules exist ("not available" before), beside the HBO run's own."""
    from hbo_jax import algorithm
    from hbo_jax.config import load_config
    from hbo_jax.memory import plan
    from hbo_jax.parallel import make_mesh

    wanted = {"hbo": ()}  # the baseline the others are read against (and, today, the code path)
    if "scalebio" in algorithm.names():
        wanted["scalebio"] = SCALEBIO_OVERRIDES
    d, layers, h, kv, f, v, _ = SMOKE_SHAPE if smoke else SHAPES["smollm2_135m"]
    if importlib.util.find_spec("hbo_jax.lisa") is not None and "scalebio" in wanted:
        wanted["lisa"] = (*LISA_OVERRIDES, f"scalebio.lisa_layers={min(LISA_LAYERS, layers)}")
    out = {name: {"status": "not available"} for name in ("scalebio", "lisa") if name not in wanted}
    shape = [f"model.hidden_size={d}", f"model.num_layers={layers}", f"model.num_heads={h}",
             f"model.num_kv_heads={kv}", f"model.intermediate_size={f}", f"data.vocab_size={v}",
             "model.dtype=bfloat16", f"data.seq_len={64 if smoke else SAMPLER_SEQ}",
             f"train.batch_size={8 if smoke else 16}"]
    for name, overrides in wanted.items():
        cfg = load_config(None, [*shape, *overrides])
        spec, programs = plan(cfg, make_mesh(cfg.mesh), num_datasets=8)
        out[name] = {"status": "ok", "overrides": list(overrides), "params": spec.num_params(),
                     "programs": {p.name: {"peak_bytes": p.peak, "scratch_bytes": p.scratch} for p in programs}}
    return out


def phase_scalebio_1b(smoke: bool) -> dict:
    """Step time and peak memory of plain fine-tuning, full ScaleBiO and LISA ScaleBiO (gamma 2, 4)
    at the ~1B shape (fp32 parameters and AdamW moments, bf16 compute, batch 4 x 256), each alone
    in a fresh process (`scalebio_step.alone`), the phase's budget shared among them; plain and
    full ScaleBiO first. On an accelerator `device_peak_mib` is its allocator's peak; --smoke: the
    4-layer "tiny" shape on the CPU, where the process's RSS is the measure."""
    from scalebio_step import Setting, alone

    setting = Setting("tiny" if smoke else "llama_1b", 2 if smoke else 4, 32 if smoke else 256,
                      param_dtype="float32", dtype="bfloat16")
    budget = float(os.environ.get("HBO_ACCEL_PHASE_BUDGET_S", "120")) - 5.0
    # --smoke: one LISA variant (the same code path as the other) and 2 steps, to stay well inside CI's minute or two
    names = ("plain", "scalebio", "scalebio_lisa_2") + (() if smoke else ("scalebio_lisa_4",))
    rows = alone(setting, names, 2 if smoke else SCALEBIO_STEPS, None, budget_s=budget)
    broken = {n: r.get("failed") or r.get("skipped") for n, r in rows.items() if "failed" in r or "skipped" in r}
    if smoke and broken:  # CI's check that the code path works: a variant that did not run fails the phase
        raise SystemExit(f"variants that did not run: {broken}\n" + "\n".join(
            r.get("stderr", "") for r in rows.values()))
    return {"status": "ok", "shape": setting.shape, "batch": setting.batch, "seq": setting.seq,
            "param_dtype": setting.param_dtype, "dtype": setting.dtype, "steps": 2 if smoke else SCALEBIO_STEPS,
            "variants": rows}


def phase_merge(smoke: bool) -> dict:
    """`merge_throughput.measure` on this machine's CPU cores and disk (a merge runs on the host; the
    accelerator machine has more cores than the 2-core one the merge was tuned on): K = 3 synthetic
    bf16 fine-tunes at SmolLM2-135M's shape, 3 rounds; --smoke: the tiny shape, 1 round."""
    import merge_throughput

    with tempfile.TemporaryDirectory(prefix="accelerator_merge_") as tmp:
        rows = merge_throughput.measure(Path(tmp), "tiny" if smoke else "smollm2_135m", [3], [ROOT],
                                        1 if smoke else 3)
    return {"cpu_count": os.cpu_count(), "rows": rows}


def phase_study(smoke: bool) -> dict:
    """`benchmarks/study.py` on SmolLM2-135M at the GPU budget of `benchmarks/studies/smollm2_135m_gpu.yaml`,
    for whatever time the other phases left; results under <out>/study (a rerun continues them).
    --smoke: one tiny arm and seed on the test fixture mixture (the same code path)."""
    import study
    import yaml

    out = os.environ.get("HBO_ACCEL_OUT") or (tempfile.mkdtemp(prefix="accelerator_study_") if smoke
                                               else ROOT / "benchmarks/results/accelerator")
    out = Path(out) / "study"
    budget = float(os.environ.get("HBO_ACCEL_PHASE_BUDGET_S", "0")) - 10.0  # 10 s to write the tables
    spec = ROOT / "benchmarks" / "studies" / "smollm2_135m_gpu.yaml"
    if smoke:
        out.mkdir(parents=True, exist_ok=True)
        spec = out / "smoke_study.yaml"
        tiny = [f"data.source_dir={ROOT / 'tests' / 'fixtures' / 'mixture'}", f"data.cache_dir={out / 'cache'}",
                "data.vocab_size=384", "data.seq_len=32", "data.num_buckets=2", "data.max_eval_per_subset=4",
                "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
                "model.intermediate_size=64", "scorer.warmup_steps=2", "train.batch_size=8", "train.steps=2",
                "eval.every=0", "eval.tasks=false", "tracking.tensorboard=false"]
        spec.write_text(yaml.safe_dump({"name": "smoke", "overrides": tiny, "seeds": [0],
                                        "arms": {"uniform": {"overrides": ["mixing.strategy=uniform"]}}}))
    rc = study.main(["--study", str(spec), "--results", str(out / "results"), "--runs", str(out / "runs"),
                     "--docs", str(out / "study.md"), "--budget-s", str(max(budget, 1.0))])
    done = sorted(p.relative_to(out).as_posix() for p in (out / "results").glob("*/seed*.json"))
    return {"status": "ok" if done else "no run finished in the time left", "exit": rc, "study": str(spec.name),
            "results": done, "docs": str(out / "study.md")}


# --- the driver -------------------------------------------------------------------------

def run_phase(name: str, smoke: bool, budget_s: float, env: dict | None = None) -> dict:
    """Runs one phase in a fresh process (its own device memory, killable at the budget)."""
    if budget_s <= 0:
        return {"status": "skipped", "reason": "no time left in the run's budget"}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--phase-out", str(result)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd + (["--smoke"] if smoke else []), capture_output=True, text=True,
                                  timeout=budget_s,
                                  env={**os.environ, **(env or {}), "HBO_ACCEL_PHASE_BUDGET_S": str(budget_s)})
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "budget_s": budget_s, "seconds": time.perf_counter() - t0}
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not result.is_file():
            return {"status": "failed", "seconds": seconds, "error": proc.stderr[-2000:]}
        return {"status": "ok", "seconds": seconds, "budget_s": budget_s, "result": json.loads(result.read_text())}


def derived(phases: dict) -> dict:
    """Figures that combine phases: the sampler's headroom over the SmolLM2 step."""
    out = {}
    sampler, step = phases.get("sampler", {}), phases.get("train_smollm2", {})
    if sampler.get("status") == "ok" and step.get("status") == "ok":
        supplied = sampler["result"]["examples_per_s_to_device"]
        consumed = step["result"]["examples_per_s"]
        out["sampler_headroom"] = {"sampler_examples_per_s": supplied, "step_examples_per_s": consumed,
                                   "ratio": supplied / consumed}
    return out


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _table(intro: str, header: str, align: str, rows: list[str]) -> list[str]:
    """A blank line, the intro, a blank line, then the markdown table: the docs block's lines of one phase."""
    return ["", intro, "", header, align, *rows]


def render(res: dict) -> str:
    """The markdown block docs/accelerator.md holds between its markers."""
    ph = res["phases"]
    env = ph["env"].get("result", {})
    lines = [BEGIN, "", f"Generated by `python benchmarks/accelerator_run.py{' --smoke' if res['smoke'] else ''}` "
             f"on {res['started']} ({res['total_seconds']:.0f} s of a {res['budget_s']:.0f} s budget); raw: "
             f"`{res['json']}`.", "",
             f"Device: {env.get('device_count', '?')} x {env.get('device_kind', '?')} ({env.get('platform', '?')}), "
             f"JAX {env.get('jax_version', '?')}, peak dense bf16 {_fmt(env.get('peak_bf16_tflops'))} TFLOP/s"
             " (the table in the script; — : unknown chip, no MFU).", "",
             "| phase | status | seconds |", "|---|---|---|"]
    for name, p in ph.items():
        inner = p.get("result", {}).get("status")  # a hook's own word: "not wired", "not available"
        status = p["status"] + (f" ({inner})" if isinstance(inner, str) else "")
        lines.append(f"| {name} | {status} | {_fmt(p.get('seconds'), '.0f')} |")
    trained = [name for name in ("train_smollm2", "train_1b") if ph.get(name, {}).get("status") == "ok"]
    if trained:
        lines += ["", "Train step (bf16 compute, fp32 master weights, AdamW):", "",
                  "| shape | batch x seq | attention | s/step | tokens/s | model TFLOP/s | MFU |", "|---" * 7 + "|"]
    for name in trained:
        r = ph[name]["result"]
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['attention']} "
                     f"| {r['median_s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} "
                     f"| {mfu} |")
    head = res["derived"].get("sampler_headroom")
    if head:
        s = ph["sampler"]["result"]
        lines += ["", f"Sampler at {s['batch']} x {s['seq']} ({s['datasets']} datasets x {s['buckets']} buckets): "
                  f"{head['sampler_examples_per_s']:,.0f} examples/s onto the device against "
                  f"{head['step_examples_per_s']:,.1f} examples/s the SmolLM2 step consumes: "
                  f"**{head['ratio']:.0f}x** headroom."]
    if ph.get("mixing", {}).get("status") == "ok":
        m = ph["mixing"]["result"]
        lines += ["", f"Mixing overhead ({m['shape']}, {m['datasets']} datasets x {m['buckets']} buckets, batch "
                  f"{m['batch']} x {m['seq']}; step {m['step_s']:.4f} s): share of wall clock on mixing", "",
                  "| reward source | " + " | ".join(f"every {f} steps" for f in MIX_INTERVALS) + " |",
                  "|---|" + "---|" * len(MIX_INTERVALS)]
        for mode, by_f in m["share"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{100 * by_f[str(f)]:.2f}%" for f in MIX_INTERVALS) + " |")
    mem = ph.get("lisa_scalebio", {}).get("result", {})
    for name, r in mem.items():
        if r["status"] == "ok":
            lines.append(f"\n{name} memory: " + ", ".join(f"{p} {v['peak_bytes'] / 2**30:.2f} GiB"
                                                            for p, v in r["programs"].items()))
        else:
            lines.append(f"\n{name} memory: {r['status']}.")
    sb = ph.get("scalebio_1b", {})
    if sb.get("status") == "ok":
        r = sb["result"]
        gib = lambda x: "—" if x is None else f"{x / 1024:.2f} GiB"  # noqa: E731
        lines += _table(
            f"ScaleBiO at the {r['shape']} shape ({r['param_dtype']} parameters and AdamW moments, {r['dtype']} "
            f"compute, batch {r['batch']} x {r['seq']}), each variant alone, {r['steps']} steps (the first compiles):",
            "| variant | device peak | vs plain | peak RSS | vs plain | s/step | vs plain | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            [f"| {name} | {gib(v.get('device_peak_mib'))} | {_fmt(v.get('device_vs_plain'), '.2f')} "
             f"| {gib(v.get('peak_rss_mib'))} | {_fmt(v.get('rss_vs_plain'), '.2f')} "
             f"| {_fmt(v.get('seconds'), '.4f')} | {_fmt(v.get('time_vs_plain'), '.2f')} "
             f"| {v.get('failed') or v.get('skipped') or ''} |" for name, v in r["variants"].items()])
    mg = ph.get("merge", {})
    if mg.get("status") == "ok":
        r = mg["result"]
        lines += _table(
            f"Merge (`python -m hbo_jax.merge --method select --resample`, K = 3, {r['rows'][0]['shape']} shape, "
            f"{r['cpu_count']} CPU cores; medians of {r['rows'][0]['merges']} merges against the best of the disk's "
            "reads of one input):",
            "| page cache | input GB | merge s | merge GB/s | CPU ns / element | disk GB/s: cold / O_DIRECT "
            "| merge / disk: cold, O_DIRECT | peak RSS GB |", "|---|---:|---:|---:|---:|---|---|---:|",
            [f"| {m['cache']} | {m['input_GB']:.2f} | {m['seconds']:.2f} | {m['GB_per_s']:.2f} "
             f"| {m['cpu_ns_per_element']:.1f} | {m['disk_cold_GB_per_s']:.2f} / {m['disk_direct_GB_per_s']:.2f} "
             f"| {m['vs_cold_disk']:.2f}, {m['vs_direct_disk']:.2f} | {m['peak_rss_GB']:.2f} |" for m in r["rows"]])
    st = ph.get("study", {}).get("result", {})
    if st.get("results"):
        lines.append(f"\nStudy ({st['study']}): {len(st['results'])} arm-seed results; tables in `{st['docs']}`.")
    lines += ["", END]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as the docs show it: relative to the checkout when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_docs(block: str, path: Path) -> None:
    """Replaces the generated block between the markers of `path` (appends one if absent)."""
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny shapes (CI)")
    ap.add_argument("--out", help="output directory (default: see the module docstring)")
    ap.add_argument("--budget-s", type=float, help="the whole run's wall-clock budget (default 470; --smoke 400)")
    ap.add_argument("--docs", default=str(DOCS), help="markdown file whose generated block a full run replaces")
    ap.add_argument("--render", metavar="JSON", help="only regenerate the docs block from a result file")
    ap.add_argument("--only", nargs="+", choices=[p for p in PHASES if p != "env"], metavar="PHASE",
                    help="run env and these phases only; writes accelerator_only.json/.md, not the docs")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = globals()[f"phase_{args.phase}"](args.smoke)
        Path(args.phase_out).write_text(json.dumps(result, indent=1))
        return 0
    if args.render:
        write_docs(render(json.loads(Path(args.render).read_text())), Path(args.docs))
        return 0
    if args.budget_s is None:
        args.budget_s = 400.0 if args.smoke else 470.0
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    phases: dict = {}
    env = {}
    if args.smoke and not args.out:  # one temporary folder for everything the smoke writes, named at the end
        args.out = tempfile.mkdtemp(prefix="accelerator_smoke_")
    if args.out:
        env["HBO_ACCEL_OUT"] = str(Path(args.out).resolve())
    if args.smoke:  # the smoke's two train phases compile the same program: compile it once
        cache = tempfile.mkdtemp(prefix="accelerator_smoke_xla_")
        env |= {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    for name, (budget, smoke_budget) in PHASES.items():
        if args.only and name != "env" and name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - t0) - 5.0  # 5 s to write the outputs
        budget_s = min(smoke_budget if args.smoke else budget, left)
        if name == "study" or (args.only and name != "env"):  # whatever time the others left
            budget_s = left
        phases[name] = run_phase(name, args.smoke, budget_s, env)
        print(f"{name}: {phases[name]['status']} ({phases[name].get('seconds', 0):.1f} s)", flush=True)
        if phases[name]["status"] == "failed":
            print(phases[name]["error"], file=sys.stderr)
    kind = phases["env"].get("result", {}).get("device_kind", "unknown")
    if args.out:
        out = Path(args.out)
    else:
        out = ROOT / "benchmarks" / "results" / "accelerator" / re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_").lower()
    out.mkdir(parents=True, exist_ok=True)
    stem = "accelerator_only" if args.only else "accelerator"  # a partial run leaves the full run's files
    res = {"format": FORMAT_VERSION, "smoke": args.smoke, "started": started, "budget_s": args.budget_s,
           "total_seconds": time.perf_counter() - t0, "json": _shown(out / f"{stem}.json"), "phases": phases}
    res["derived"] = derived(phases)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    block = render(res)
    (out / f"{stem}.md").write_text(block + "\n")
    if args.smoke:
        shutil.rmtree(env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    elif not args.only:
        write_docs(block, Path(args.docs))
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'} in {res['total_seconds']:.0f} s")
    bad = [n for n, p in phases.items() if p["status"] in ("failed", "timeout")]
    # A smoke run must pass every phase (it is CI's check that the code paths work).
    if bad:
        print(f"phases that did not finish: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
