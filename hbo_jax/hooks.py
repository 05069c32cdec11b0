"""The periodic work of a run, as hooks for `hbo_jax.trainer.Trainer.add_hook`.

Each class here owns one output of the run directory: the metrics log, the mixing log,
the periodic evaluation, the checkpoints, the progress bar. `hbo_jax.train` adds them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax

from hbo_jax.algorithm import Algorithm
from hbo_jax.config import to_dict
from hbo_jax.evaluate import evaluate_model
from hbo_jax.parallel import sums_from_json, sums_to_json
from hbo_jax.progress import progress
from hbo_jax.records import JsonlWriter
from hbo_jax.tracking import Tracker, eval_scalars, metrics_scalars, mixing_scalars
from hbo_jax.trainer import StepInfo


class ProgressBar:
    """The run's steps (process 0): a bar on a terminal, periodic lines in a log; with the
    metrics log's loss."""

    def __init__(self, start: int, total: int, label: str):
        self.bar = progress(desc=f"train [{label}]", total=total, initial=start, leave=True,
                            disable=jax.process_index() != 0)

    def __call__(self, info: StepInfo) -> None:
        self.bar.update(1)

    def show(self, **fields) -> None:
        self.bar.set_postfix(**fields)

    def close(self) -> None:
        self.bar.close()


class MetricsLog:
    """Sums every step's metrics on device; every `log_every` steps writes one line.

    The line (`metrics.jsonl`) has the mean loss and gradient norm, loss tokens/s, the
    share of time spent on mixing, the per-subset loss and the examples drawn per subset
    and bucket. The partial sums between two lines travel with a checkpoint (`state`).
    """

    def __init__(self, writer: JsonlWriter, log_every: int, names: list[str], num_buckets: int,
                 algorithm: Algorithm, on_line: Callable[[dict], None] = lambda line: None):
        self.writer, self.log_every = writer, log_every
        self.names, self.k, self.algorithm, self.on_line = names, num_buckets, algorithm, on_line
        self.acc = None
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t, self.mixing_before = time.perf_counter(), self.algorithm.mixing_seconds

    def observe(self, info: StepInfo) -> None:
        acc = dict(self.acc or {})
        for key, v in info.metrics.items():  # key-wise: a stop's saved sums may predate a metric
            acc[key] = v if key not in acc else acc[key] + v
        self.acc = acc

    def write(self, info: StepInfo) -> None:
        host = jax.device_get(self.acc)
        done, every = info.step, self.log_every
        dt = time.perf_counter() - self.t
        nsteps = every if done % every == 0 else done % every
        d = len(self.names)
        line = {"step": done, "loss": float(host["loss"] / nsteps), "grad_norm": float(host["grad_norm"] / nsteps),
                "loss_tokens_per_s": float(host["tokens"] / dt), "examples": int(host["group_examples"].sum()),
                "mixing_share": (self.algorithm.mixing_seconds - self.mixing_before) / dt,
                "nonfinite_skipped": int(host.get("nonfinite", 0))}
        tok = host["group_token_nll"].reshape(d, self.k).sum(1)
        cnt = host["group_tokens"].reshape(d, self.k).sum(1)
        line.update({f"loss/{n}": float(t / c) for n, t, c in zip(self.names, tok, cnt) if c > 0})
        line["drawn"] = host["group_examples"].reshape(d, self.k).astype(int).tolist()
        self.writer.write(line)
        self.last_line, self.last_span = line, f"steps {done - nsteps + 1}-{done}"
        self.on_line(line)
        self.acc = None
        self.restart_clock()

    def state(self) -> dict | None:
        return sums_to_json(self.acc)

    def load_state(self, saved: dict | None, mesh) -> None:
        self.acc = sums_from_json(saved, mesh)


class MixingLog:
    """Writes the algorithm's records (actor updates) to `mixing.jsonl`, the trace and trackers."""

    def __init__(self, writer: JsonlWriter, algorithm: Algorithm, trace, on_record: Callable[[int, dict], None]):
        self.writer, self.algorithm, self.trace, self.on_record = writer, algorithm, trace, on_record

    def __call__(self, info: StepInfo) -> None:
        for record in info.records:
            self.writer.write(record)
            state = {k: v for k, v in self.algorithm.state().items() if k != "train"}
            self.trace.mixer(info.step, state, self.algorithm.schedule.at(info.step))
            self.on_record(info.step, record)


class Checkpointing:
    """Saves the algorithm's state, the sampler and the run's metadata (`meta()`).

    `before_save(step)` runs first and may raise to refuse the save (the non-finite guard:
    a diverged state is never checkpointed over the last good one).
    """

    def __init__(self, ckpt, algorithm: Algorithm, sampler, meta: Callable[[], dict],
                 before_save: Callable[[int], None] = lambda step: None):
        self.ckpt, self.algorithm, self.sampler, self.meta = ckpt, algorithm, sampler, meta
        self.before_save = before_save

    def save(self, step: int) -> float:
        self.before_save(step)
        return self.ckpt.save(step, self.algorithm.state(), self.sampler.get_state(), self.meta())

    def __call__(self, info: StepInfo) -> None:
        self.save(info.step)

    def restore(self, step: int, mesh) -> dict:
        """Restores the algorithm's state (into its current shardings) and the sampler; returns meta."""
        restored = self.ckpt.restore(step, self.algorithm.state())
        meta = restored["meta"]
        self.algorithm.load_state(restored["trees"], meta)
        self.sampler.set_state(restored["sampler"])
        return meta


class RunLogs:
    """The run directory's logs, trackers and evaluations, as the loop and its hooks write them.

    Args:
        cfg: The run's config.
        data: The prepared mixture.
        graphdef: The model's graph.
        mesh: The device mesh.
        nll_fn: The jitted per-example NLL forward.
    """

    FILES = ("metrics.jsonl", "mixing.jsonl", "eval.jsonl")

    def __init__(self, cfg, data, graphdef, mesh, nll_fn):
        self.cfg, self.data, self.graphdef, self.mesh, self.nll_fn = cfg, data, graphdef, mesh, nll_fn
        run_dir = Path(cfg.run_dir)
        self.writers = {f: JsonlWriter(run_dir / f) for f in self.FILES}
        self.tracker = Tracker(cfg.tracking, run_dir, config=to_dict(cfg))

    def evaluate(self, step: int, params, desc: str) -> dict:
        """Full evaluation (task metrics too), before and after training; logged to the trackers."""
        cfg = self.cfg
        res = evaluate_model(self.graphdef, params, self.data, cfg, self.mesh, self.nll_fn,
                             max_per_subset=cfg.data.max_eval_per_subset, with_tasks=cfg.eval.tasks, desc=desc)
        self.tracker.log(step, eval_scalars(res, prefix="eval_full"))
        return res

    def periodic_eval(self, step: int, params) -> None:
        """Capped held-out loss for the curves (`eval.jsonl`)."""
        res = evaluate_model(self.graphdef, params, self.data, self.cfg, self.mesh, self.nll_fn, with_tasks=False,
                             max_per_subset=self.cfg.eval.periodic_max_per_subset)
        self.writers["eval.jsonl"].write({"step": step, "eval": res})
        self.tracker.log(step, eval_scalars(res))

    def restart(self, step: int) -> None:
        """Drops log records after `step` (a resume), or every record (a fresh start: step 0)."""
        for writer in self.writers.values():
            if step:
                writer.truncate(step)
            else:
                writer.path.unlink(missing_ok=True)

    def metrics_line(self, line: dict) -> None:
        self.tracker.log(line["step"], metrics_scalars(line, self.data.names))

    def mixing_record(self, step: int, record: dict) -> None:
        self.tracker.log(step, mixing_scalars(record, self.data.names))
