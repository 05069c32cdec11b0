"""`python -m hbo_jax.train [--config FILE] [key=value ...]`: fine-tune on a mixture.

With no arguments it runs the default demo: the embedded real-data mixture, a tiny
Llama warmed up as the scoring/base model, and HBO choosing what to sample.

Run directory outputs: config.yaml (resolved), metrics.jsonl (training metrics and the
examples drawn per subset and bucket), mixing.jsonl (every actor update: probabilities,
rewards, seconds), eval.jsonl (periodic held-out loss), eval.json (loss per subset and
bucket and task metrics, before and after), summary.json, schedule.json, report/ (PNGs and
report.md), tb/ (TensorBoard), checkpoints/ (Orbax).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hbo_jax.algorithm import Algorithm, RunContext, algorithm_class
from hbo_jax.checkpoint import Checkpointer, check_resume_config
from hbo_jax.cli import USER_ERRORS, add_config_arguments, setup_logging, use_compile_cache
from hbo_jax.config import Config, resolve_config, to_dict, to_yaml
from hbo_jax.config_sources import ConfigSources
from hbo_jax.data.packing import default_pack_rows
from hbo_jax.data.prepare import PreparedData, check_min_prob, counted_cuts, data_notes, prepared_key
from hbo_jax.data.sampler import HierarchicalSampler, batch_iterator
from hbo_jax.distributed import StopRequest, Trace, initialize as init_distributed
from hbo_jax.errors import ConfigError
from hbo_jax.evaluate import format_table, starting_evaluation
from hbo_jax.hooks import Checkpointing, MetricsLog, MixingLog, ProgressBar, RunLogs
from hbo_jax.mixing.strategies import save_schedule
from hbo_jax.models.base import base_model
from hbo_jax.nonfinite import NonFiniteGuard
from hbo_jax.parallel import batch_divisor, check_batch_size, global_batch_from_host, host_slice, make_mesh
from hbo_jax.records import dumps
from hbo_jax.report import write_report
from hbo_jax.rundir import UntilTraining
from hbo_jax.runlock import hold as hold_run_dir
from hbo_jax.scorer import prepare
from hbo_jax.step import make_example_nll_fn, total_nonfinite
from hbo_jax.tracking import eval_scalars
from hbo_jax.trainer import Trainer

log = logging.getLogger("hbo_jax")


def _start(cfg: Config, run_dir: Path, sources: ConfigSources | None):
    """(mesh, checkpointer, checkpoint to resume or None), checked before anything expensive."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    log.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    check_batch_size("train.batch_size", cfg.train.batch_size, mesh)
    check_batch_size("scorer.batch_size", cfg.scorer.batch_size, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    found = ckpt.find_resumable()
    if found is not None:
        saved_key = found[1].get("prepared_key")  # None: a checkpoint from before the key was stored
        same_inputs = (lambda: prepared_key(cfg) == saved_key) if saved_key else None  # noqa: E731
        for note in check_resume_config(found[1].get("config", {}), to_dict(cfg), cfg.train.allow_config_change,
                                        f"the checkpoint at step {found[0]}", same_inputs):
            log.warning("resume: %s", note)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg, sources))
    return mesh, ckpt, found


def _prepare(cfg: Config, mesh) -> tuple[PreparedData, int]:
    """The prepared mixture and the rows of a packed batch (0 without packing)."""
    data = prepare(cfg, mesh)
    m = data.manifest
    log.info("data: %d subsets, %d train examples, K=%d %s buckets (prepared in %s)",
             len(data.names), sum(data.sizes), data.num_buckets, m["difficulty"], data.root)
    for note in data_notes(m):  # skips by reason with their first positions, cut examples per subset
        log.warning("data: %s", note)
    if not cfg.data.packing:
        return data, 0
    # Rows are sharded like batch rows; each host packs its own slice.
    slots = np.minimum(np.concatenate([s.lengths for s in data.train]), cfg.data.seq_len + 1) - 1
    pack_rows = cfg.data.pack_rows or default_pack_rows(cfg.train.batch_size, float(np.mean(slots)),
                                                        cfg.data.seq_len, batch_divisor(mesh))
    check_batch_size("data.pack_rows", pack_rows, mesh)
    if pack_rows % jax.process_count():
        raise ConfigError(f"data.pack_rows={pack_rows} not divisible by {jax.process_count()} processes")
    log.info("packing: %d examples a step into %d rows of %d tokens (mean example %.1f tokens)",
             cfg.train.batch_size, pack_rows, cfg.data.seq_len, float(np.mean(slots)))
    return data, pack_rows


def _global_batches(cfg: Config, data: PreparedData, sampler, algo: Algorithm, mesh, pack_rows: int,
                    pack_stats: dict, trace: Trace, start: int):
    """Global batches for steps start+1, ...: this host's rows, traced, then assembled over the mesh."""
    host_rows = host_slice(cfg.train.batch_size)
    batches = batch_iterator(sampler, data.train, cfg.data.seq_len, data.pad_id, host_rows,
                             ref_nll=data.nll0 if "ref_nll" in algo.batch_fields else None,
                             pack_rows=pack_rows // jax.process_count(), pack_stats=pack_stats)
    s = start
    while True:
        host_batch = next(batches)
        s += 1
        trace.batch(s, host_batch)
        yield global_batch_from_host(host_batch, mesh)


def run(cfg: Config, stop: StopRequest | None = None, sources: ConfigSources | None = None) -> dict:
    """Runs (or resumes) one training job; returns the summary it also writes.

    With a `StopRequest` that fires (SIGTERM/SIGINT), the run saves a checkpoint at the
    next step boundary and returns `{"stopped": <signal>, "step": <step>}` instead.
    The run directory is locked for the whole run (`hbo_jax.runlock`): a second run on it
    raises `RunLocked` before any other work. A run that fails before its first step
    removes what it wrote there (`hbo_jax.rundir`). `sources` (which config files were
    merged) heads the run's config.yaml.
    """
    t_start = time.perf_counter()
    check_min_prob(cfg)  # needs the mixture's size, so not in load_config; reads no data
    until_training = UntilTraining(cfg.run_dir)  # before the lock: a directory the run creates is new
    with hold_run_dir(cfg.run_dir), until_training:
        return _run(cfg, stop or StopRequest(), t_start, sources, until_training)


def _run(cfg: Config, stop: StopRequest, t_start: float, sources: ConfigSources | None,
         until_training: UntilTraining) -> dict:
    tc, run_dir = cfg.train, Path(cfg.run_dir)
    mesh, ckpt, found = _start(cfg, run_dir, sources)
    t_prepare = time.perf_counter()
    data, pack_rows = _prepare(cfg, mesh)
    prepare_seconds = time.perf_counter() - t_prepare
    graphdef, params, _ = base_model(cfg, mesh, data)
    algo = algorithm_class(cfg.algorithm)(RunContext(cfg, mesh, data, graphdef, params, pack_rows))
    # The data seed, not train.seed: data-order replicas share the prepared data and starting model.
    sampler = HierarchicalSampler(data.leaves(), tc.batch_size, tc.resolved_data_seed, algo.schedule)
    logs = RunLogs(cfg, data, graphdef, mesh, make_example_nll_fn(graphdef, mesh))
    start = found[0] if found else 0
    metrics_log = MetricsLog(logs.writers["metrics.jsonl"], tc.log_every, data.names, data.num_buckets, algo,
                             on_line=lambda line: (logs.metrics_line(line), bar.show(
                                 loss=f"{line['loss']:.3f}", mix=f"{100 * line['mixing_share']:.1f}%")))
    # Too many non-finite updates in a row: close and raise, saving nothing (the newest checkpoint stays).
    guard = NonFiniteGuard(tc.max_nonfinite_steps, str(ckpt.directory),
                           on_stop=lambda: (bar.close(), ckpt.close(), logs.tracker.close()))
    meta = lambda: {"eval_before": before, "config": to_dict(cfg), "log_acc": metrics_log.state(),  # noqa: E731
                    "prepared_key": data.root.name, **algo.meta()}
    checkpoints = Checkpointing(ckpt, algo, sampler, meta, before_save=guard.check)
    logs.restart(start)
    if found:
        restored = checkpoints.restore(start, mesh)
        before = restored["eval_before"]
        metrics_log.load_state(restored.get("log_acc"), mesh)  # a stop between log lines
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        before, found_at = starting_evaluation(cfg, data, mesh,
                                               lambda: logs.evaluate(0, algo.params, "the starting model"))
        if found_at is not None:
            log.info("the starting model's evaluation found in %s: not evaluated again", found_at)
            logs.tracker.log(0, eval_scalars(before, prefix="eval_full"))
        if cfg.eval.every:
            logs.periodic_eval(0, algo.params)
        algo.start()
        _write_json(run_dir / "probabilities_start.json",
                    dict(zip(("step", "p_global", "p_local"), (0, *(p.tolist() for p in algo.start_probabilities())))))
    for record in algo.resumed(start):
        logs.writers["mixing.jsonl"].write(record)

    pack_stats: dict = {}
    trace = Trace(run_dir, cfg.distributed.trace, host_slice(tc.batch_size), start)
    batches = _global_batches(cfg, data, sampler, algo, mesh, pack_rows, pack_stats, trace, start)
    # One process: a free check every step; several: a collective every stop_check_every steps.
    every = 1 if jax.process_count() == 1 else cfg.distributed.stop_check_every
    trainer = Trainer(algo, batches, start, tc.steps, should_stop=lambda done: done % every == 0 and stop.should_stop())
    bar = ProgressBar(start, tc.steps, algo.label)  # here: its clock times the loop alone
    trainer.add_hook(bar)
    trainer.add_hook(lambda info: guard.observe(info.metrics))  # takes out the streak before sums are made
    trainer.add_hook(metrics_log.observe)
    trainer.add_hook(MixingLog(logs.writers["mixing.jsonl"], algo, trace, logs.mixing_record))
    trainer.add_hook(metrics_log.write, every=tc.log_every, at_end=True)
    trainer.add_hook(lambda info: guard.check(info.step, metrics_log.last_line["nonfinite_skipped"],
                                              metrics_log.last_span), every=tc.log_every, at_end=True)
    trainer.add_hook(lambda info: logs.periodic_eval(info.step, algo.params), every=cfg.eval.every)
    trainer.add_hook(checkpoints, every=tc.checkpoint_every)
    until_training.training()
    log.info("training from step %d, %.1fs after the run started", start, time.perf_counter() - t_start)
    t_loop = time.perf_counter()
    metrics_log.restart_clock()
    signalled = start < tc.steps and stop.should_stop()  # while preparing: stop before training
    stopped_at = start if signalled else trainer.train()
    loop_seconds = time.perf_counter() - t_loop
    bar.close()
    if stopped_at is not None:
        return _stopped(stopped_at, tc.steps, checkpoints, logs, stop)
    return _finish(cfg, data, algo, checkpoints, logs, sampler, before, pack_rows, pack_stats,
                   {"prepare": prepare_seconds, "loop": loop_seconds, "start": t_start})


def _write_json(path: Path, obj) -> None:
    if jax.process_index() == 0:  # one writer on a shared run directory
        path.write_text(dumps(obj))


def _stopped(done: int, total: int, checkpoints: Checkpointing, logs: RunLogs, stop: StopRequest) -> dict:
    """SIGTERM/SIGINT: save at this step boundary and return cleanly."""
    ckpt = checkpoints.ckpt
    if done not in ckpt.all_steps():
        log.info("checkpoint at step %d saved in %.2fs", done, checkpoints.save(done))
    ckpt.close()
    logs.tracker.close()
    log.warning("stopped by %s at step %d of %d, %.1fs after the signal; run the same command again to resume",
                stop.signal_name or "a signal to another process", done, total, stop.seconds_since())
    return {"stopped": stop.signal_name or "another process", "step": done}


def _finish(cfg: Config, data: PreparedData, algo: Algorithm, checkpoints: Checkpointing, logs: RunLogs,
            sampler, before: dict, pack_rows: int, pack_stats: dict, times: dict) -> dict:
    """The final checkpoint, evaluation, summary, report and printed table.

    `times`: the seconds of data preparation ("prepare") and of the training loop
    ("loop"), and the `perf_counter` at the start ("start").
    """
    loop_seconds = times["loop"]
    tc, run_dir, ckpt = cfg.train, Path(cfg.run_dir), checkpoints.ckpt
    if ckpt.latest_step() != tc.steps:  # a finished run that is relaunched has it already
        checkpoints.save(tc.steps)
    ckpt.close()
    after = logs.evaluate(tc.steps, algo.params, "the trained model")
    logs.tracker.close()
    pg, pl = sampler.schedule.at(tc.steps)
    m = data.manifest
    summary = {
        "algorithm": cfg.algorithm, "steps": tc.steps, "subsets": data.names,
        "eval_before": before, "eval_after": after,
        "p_global_final": dict(zip(data.names, pg.tolist())),
        "mixing_seconds": algo.mixing_seconds, "train_loop_seconds": loop_seconds,
        "mixing_share": algo.mixing_seconds / max(loop_seconds, 1e-9), **algo.summary(),
        "nonfinite_skipped": total_nonfinite(algo.state()["train"].opt_state),
        "data_skipped": m["skipped"]["total"], "prepared": str(data.root),
        "data_truncated": {s["name"]: counted_cuts(s) for s in m["subsets"]},  # None: not counted
        # Strategies compare on the loop's time: preparing (tokenizing, the scorer's warm-up,
        # scoring) happens once per mixture and is near zero when the prepared data is reused.
        "prepare_seconds": times["prepare"],
        "wall_seconds": time.perf_counter() - times["start"],  # everything, preparation included
    }
    if pack_rows:  # this host's packing since (re)start: fill and examples cut at seq_len
        summary["packing"] = {"rows": pack_rows, **pack_stats,
                              "padding_fraction": 1 - pack_stats.get("tokens", 0) / max(pack_stats.get("slots", 0), 1)}
        log.info("packing: %s", summary["packing"])
        if pack_stats.get("overflow_steps"):
            log.warning("packing: %d of %d steps did not fit in data.pack_rows=%d and ran with one row per "
                        "example; a larger data.pack_rows avoids that", pack_stats["overflow_steps"],
                        pack_stats["steps"], pack_rows)
    if jax.process_index() == 0:
        (run_dir / "eval.json").write_text(dumps({"before": before, "after": after}, indent=2))
        save_schedule(run_dir / "schedule.json", sampler.schedule, data.names)
        summary["report"] = str(run_dir / "report" / "report.md")
        (run_dir / "summary.json").write_text(dumps(summary, indent=2))
        write_report(run_dir)  # reads the logs and summary.json written above
        print("\nHeld-out response loss / perplexity and task metric per subset:")
        print(format_table(before, after))
        print("\nfinal p_global: " + ", ".join(f"{n} {p:.3f}" for n, p in summary["p_global_final"].items()))
        print(f"mixing overhead: {100 * summary['mixing_share']:.1f}% of the training loop "
              f"({algo.mixing_seconds:.1f}s of {loop_seconds:.1f}s)")
        print(f"time: data preparation {times['prepare']:.1f}s, training loop {loop_seconds:.1f}s, "
              f"wall {summary['wall_seconds']:.1f}s")
        print(f"run directory: {run_dir} (report: {summary['report']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbo_jax.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg, sources = resolve_config(args.config, args.overrides)
        for line in sources.lines() if args.config else ():
            log.info("config: %s", line)
        init_distributed(cfg.distributed)  # here, not at import (grain#802)
        use_compile_cache(cfg)
        with StopRequest() as stop:
            run(cfg, stop, sources)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
