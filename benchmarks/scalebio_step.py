"""Memory and step time of ScaleBiO (full, and with LISA) against plain fine-tuning.

    python benchmarks/scalebio_step.py --shape smollm2_135m --gammas 2 4 --time --rss
    python benchmarks/scalebio_step.py --shape llama_1b --gammas 2 4            # memory only
    python benchmarks/scalebio_step.py --shape llama_1b --batch 1 --seq 128 --param-dtype bfloat16 --dtype bfloat16
        --rss --rss-steps 4 --only plain     # (one command) one variant alone, in bf16

Variants, all on one device with stacked blocks (`model.scan_layers`), from the shapes of
`benchmarks/train_step_cpu.py`:

- `plain`: one model, AdamW over every parameter (`hbo_jax.step.make_train_step`);
- `scalebio`: u, w and lambda, AdamW over every parameter of u and of w
  (`hbo_jax.mixing.scalebio_step.make_scalebio_step`, three forward+backward passes);
- `scalebio_lisa_<g>`: the same with `scalebio.lisa_layers=g` (moments of the view only).

Memory is XLA's buffer assignment of the compiled step, as `python -m hbo_jax.memory`
reports it (`scalebio_memory`, also what an accelerator run calls). `--time` runs the steps
on random weights, the variants taking turns step by step in one process, and reports
medians. `--rss` runs each variant alone in a fresh process for `--rss-steps` steps and
reports its peak resident memory (VmHWM: the host's view, which on CPU includes the
device buffers; on an accelerator also the device allocator's own peak) and its median
step time after the first (which compiles): the timing for shapes whose variants do not
fit in one process together. A variant whose compiled peak
does not fit the host's available memory is not run, and a running one is killed when the
available memory runs low (and is the kernel's first choice if memory runs out).

`--param-dtype bfloat16` stores the parameters, and so AdamW's moments, in bf16 for every
variant alike: `optax.scale_by_adam` makes mu in `mu_dtype` (default None: the parameter's
dtype) and nu always in the parameter's dtype, and LISA's moments are zeros like the view.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lisa_step import shape_arguments  # noqa: E402
from train_step_cpu import SHAPES, jax_spec, random_batch  # noqa: E402

NUM_SOURCES = 10  # the reference's v2 math setup


@dataclasses.dataclass(frozen=True)
class Setting:
    """The model and batch every variant of one comparison runs at."""

    shape: str = "smollm2_135m"
    batch: int = 4
    seq: int = 256
    remat: bool = False
    param_dtype: str = "float32"  # the parameters' and (optax's default) AdamW moments' dtype
    dtype: str = "float32"  # the compute dtype

    def argv(self) -> list[str]:
        """This setting as command-line arguments (for a worker process)."""
        return ["--shape", self.shape, "--batch", str(self.batch), "--seq", str(self.seq),
                "--param-dtype", self.param_dtype, "--dtype", self.dtype, *(["--remat"] if self.remat else [])]


def variants(gammas) -> tuple[str, ...]:
    return ("plain", "scalebio", *(f"scalebio_lisa_{g}" for g in gammas))


def _setup(setting: Setting):
    import jax
    import jax.numpy as jnp

    from hbo_jax.config import MeshConfig
    from hbo_jax.models.llama import abstract_model
    from hbo_jax.parallel import batch_sharding, make_mesh, tree_shardings

    batch, seq = setting.batch, setting.seq
    spec = dataclasses.replace(jax_spec(SHAPES[setting.shape], setting.dtype, remat=setting.remat),
                               scan_layers=True, param_dtype=setting.param_dtype)
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
                    remat: bool = False, param_dtype: str = "float32", dtype: str = "float32") -> dict:
    """Compiled memory (MiB) of plain fine-tuning, full ScaleBiO and LISA ScaleBiO at a shape.

    Returns:
        {"shape", "batch", "seq", "remat", "param_dtype", "dtype", "params_m", "memory_mib":
        {variant: {"arguments", "held", "scratch", "peak", "peak_vs_plain", "largest"}},
        "programs_mib": {variant: {program: {...}}}}.
    """
    from hbo_jax.memory import ProgramMemory

    setting = Setting(shape, batch, seq, remat, param_dtype, dtype)
    spec, mesh, graphdef, params, shaped = _setup(setting)
    val = {k: shaped[k] for k in ("input_ids", "targets", "loss_mask")}
    rows, parts = {}, {}
    for name in variants(gammas):
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
    return {**dataclasses.asdict(setting), "params_m": spec.num_params() / 1e6,
            "memory_mib": {n: {**row(m), "largest": m.name} for n, m in rows.items()},
            "programs_mib": {n: {m.name: row(m) for m in ms} for n, ms in parts.items()}}


def _runner(name: str, spec, mesh, graphdef):
    from hbo_jax.models.llama import init_params

    _, params = init_params(spec, mesh, 0)
    out = _variant(name, graphdef, params, mesh, real=True)
    return out[1], out[2]


def _timed_step(fn, args, data):
    """(new args, seconds) of one step, waited for."""
    import jax

    t0 = time.perf_counter()
    args = fn(args, data)
    jax.block_until_ready(args)
    return args, time.perf_counter() - t0


def step_times(setting: Setting, gammas, rounds: int) -> dict:
    """Median seconds a step of each variant, the variants taking turns in one process (round 0 compiles)."""
    spec, mesh, graphdef, _, _ = _setup(setting)
    data = random_batch(spec.vocab_size, setting.batch, setting.seq, mesh)
    runs = {name: _runner(name, spec, mesh, graphdef) for name in variants(gammas)}
    times = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, (args, fn) in runs.items():
            args, seconds = _timed_step(fn, args, data)
            runs[name] = (args, fn)
            if r:
                times[name].append(seconds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {name: {"seconds": s, "vs_plain": s / med["plain"]} for name, s in med.items()}


def _worker(name: str, setting: Setting, steps: int) -> None:
    """One variant alone: `steps` steps, the first compiling; prints a JSON line per step
    (its seconds, the peak RSS so far), so that a run killed midway still tells what it did."""
    # If the host runs out of memory, the kernel is to kill this process rather than another job's.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    import jax

    spec, mesh, graphdef, _, _ = _setup(setting)
    data = random_batch(spec.vocab_size, setting.batch, setting.seq, mesh)
    args, fn = _runner(name, spec, mesh, graphdef)
    for i in range(steps):
        args, seconds = _timed_step(fn, args, data)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would
        # report the parent's peak (the planner's compiles) when that is the larger.
        # An accelerator's own peak comes from its allocator (None on CPU: there RSS is it).
        stats = jax.local_devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        print(json.dumps({"step": i, "seconds": seconds, "peak_rss_mib": _meminfo_mib("/proc/self/status", "VmHWM"),
                          "device_peak_mib": None if peak is None else peak / 2**20}), flush=True)


def _meminfo_mib(path: str, key: str) -> float:
    """A `key: N kB` line of a /proc file, in MiB (0 when the file is gone)."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0.0


def _run_watched(cmd: list[str], env: dict, floor_mib: float, timeout_s: float | None = None) -> dict:
    """Runs `cmd`, killing it if the host's available memory falls below `floor_mib` (so that
    it, not another job, gives way) or after `timeout_s`. Returns its return code, stdout,
    stderr, the lowest available memory seen, its own peak RSS as last seen (VmHWM) and
    whether it ran out of time."""
    lowest = _meminfo_mib("/proc/meminfo", "MemAvailable")
    hwm = 0.0
    end = None if timeout_s is None else time.monotonic() + timeout_s
    timed_out = False
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out = []  # drained by a thread: a full pipe would block the worker
        reader = threading.Thread(target=lambda: out.append(proc.communicate()))
        reader.start()
        while proc.poll() is None:
            lowest = min(lowest, _meminfo_mib("/proc/meminfo", "MemAvailable"))
            hwm = max(hwm, _meminfo_mib(f"/proc/{proc.pid}/status", "VmHWM"))
            if end is not None and time.monotonic() > end and proc.poll() is None:
                timed_out = True
                proc.kill()
            if lowest < floor_mib:
                proc.kill()
            time.sleep(0.2)
        reader.join()
    return {"rc": proc.returncode, "stdout": out[0][0], "stderr": out[0][1], "lowest_available_mib": lowest,
            "watched_peak_rss_mib": hwm, "timed_out": timed_out}


def alone(setting: Setting, names, steps: int, planned_mib: dict | None, margin_mib: float = 1536,
          floor_mib: float = 1024, budget_s: float | None = None) -> dict:
    """Each variant run alone in a fresh process, one after the other: peak RSS, the device's
    own peak (an accelerator's allocator; None on CPU) and median step time (of the steps
    after the first, which compiles).

    On the host (`planned_mib` given), a variant runs only if its compiled peak plus
    `margin_mib` (the runtime, compiling) fits in the host's available memory less
    `floor_mib`; while it runs, it is killed if the available memory falls below
    `floor_mib` (its row then says how far it got). `budget_s` shares a deadline among the
    variants: each gets an equal share of the time left when it starts.
    """
    here = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH")) if p))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # on a GPU: the allocator's peak is the variant's
    deadline = None if budget_s is None else time.monotonic() + budget_s
    out = {}
    for i, name in enumerate(names):
        available = _meminfo_mib("/proc/meminfo", "MemAvailable")
        row = {"available_mib": available, "load_before": os.getloadavg()}
        out[name] = row
        if planned_mib is not None:
            row["planned_peak_mib"] = planned_mib[name]
            if planned_mib[name] + margin_mib > available - floor_mib:
                row["skipped"] = "planned peak + margin over the available memory"
                continue
        share = None if deadline is None else (deadline - time.monotonic()) / (len(names) - i)
        if share is not None and share <= 0:
            row["skipped"] = "no time left"
            continue
        run = _run_watched([sys.executable, here, "--worker", name, *setting.argv(), "--rss-steps", str(steps)],
                           env, floor_mib, share)
        done = [json.loads(line) for line in run["stdout"].splitlines() if line.startswith("{")]
        times = [d["seconds"] for d in done[1:]]
        row.update(load_after=os.getloadavg(), lowest_available_mib=run["lowest_available_mib"],
                   watched_peak_rss_mib=run["watched_peak_rss_mib"], steps_done=len(done),
                   first_step_seconds=done[0]["seconds"] if done else None, step_seconds=times,
                   seconds=statistics.median(times) if times else None)
        if done:  # the peak over the steps that completed (all of them unless it failed)
            row["peak_rss_mib"] = done[-1]["peak_rss_mib"]
            row["device_peak_mib"] = done[-1].get("device_peak_mib")
        if run["rc"]:
            why = f"out of time ({share:.0f} s)" if run["timed_out"] else f"exit {run['rc']}"
            row.update(failed=f"{why} after {len(done)} of {steps} steps", stderr=run["stderr"][-2000:])
    plain = out.get("plain", {})
    for row in out.values():
        for key, ratio in (("peak_rss_mib", "rss_vs_plain"), ("device_peak_mib", "device_vs_plain")):
            if plain.get(key) and row.get(key):
                row[ratio] = row[key] / plain[key]
        if row.get("seconds") and plain.get("seconds"):
            row["time_vs_plain"] = row["seconds"] / plain["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape_arguments(ap)
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="parameters and AdamW moments (every variant alike)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--rss", action="store_true",
                    help="also each variant alone in its own process: peak RSS and step time")
    ap.add_argument("--rss-steps", type=int, default=2, help="steps of each process, the first compiling")
    ap.add_argument("--only", nargs="+", help="run only these variants alone (--rss), e.g. plain scalebio_lisa_2")
    ap.add_argument("--floor-mib", type=float, default=1024,
                    help="kill a variant's process when the host's available memory falls below this")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setting = Setting(args.shape, args.batch, args.seq, args.remat, args.param_dtype, args.dtype)
    if args.worker:
        _worker(args.worker, setting, args.rss_steps)
        return
    result = scalebio_memory(args.shape, args.gammas, args.batch, args.seq, args.remat, args.param_dtype, args.dtype)
    print(json.dumps(result, indent=2), flush=True)  # the plan first: running may take long
    if args.time:
        result["step_time"] = step_times(setting, args.gammas, args.rounds)
    if args.rss:
        planned = {name: row["peak"] for name, row in result["memory_mib"].items()}
        result["alone"] = alone(setting, args.only or variants(args.gammas), args.rss_steps, planned,
                                floor_mib=args.floor_mib)
    if args.time or args.rss:
        print(json.dumps({k: result[k] for k in ("step_time", "alone") if k in result}, indent=2))


if __name__ == "__main__":
    main()
