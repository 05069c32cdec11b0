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
from tqdm.auto import tqdm

from hbo_jax.checkpoint import Checkpointer, check_resume_config
from hbo_jax.cli import USER_ERRORS, add_config_arguments, setup_logging
from hbo_jax.config import Config, ConfigError, load_config, to_dict, to_yaml
from hbo_jax.data.packing import default_pack_rows
from hbo_jax.data.prepare import data_notes, prepare
from hbo_jax.data.sampler import HierarchicalSampler, ProbabilitySchedule, batch_iterator
from hbo_jax.distributed import StopRequest, Trace, initialize as init_distributed
from hbo_jax.evaluate import evaluate_model, format_table
from hbo_jax.mixing.strategies import Mixer, load_schedule, resolve, save_schedule
from hbo_jax.models.base import base_model
from hbo_jax.nonfinite import NonFiniteGuard
from hbo_jax.parallel import (batch_divisor, check_batch_size, global_batch_from_host, host_slice, make_mesh,
                              replicated)
from hbo_jax.records import JsonlWriter, dumps
from hbo_jax.report import write_report
from hbo_jax.runlock import hold as hold_run_dir
from hbo_jax.step import (init_train_state, make_example_nll_fn, make_optimizer, make_train_step,
                          state_shardings, total_nonfinite)
from hbo_jax.tracking import Tracker, eval_scalars, metrics_scalars, mixing_scalars

log = logging.getLogger("hbo_jax")




_LOCAL_KEYS = ("group_ppl_ratio", "group_examples")  # local_source=train
_GLOBAL_KEYS = ("group_gradnorm", "gradnorm_examples")  # global_source=train


def _add(acc: dict | None, new: dict) -> dict:
    """Key-wise sum of reward statistics (keys absent from one side are taken as they are)."""
    acc = dict(acc or {})
    for key, v in new.items():
        acc[key] = v if key not in acc else acc[key] + v
    return acc


def _per_subset(acc: dict, names: list[str], k: int) -> dict[str, float]:
    tok = acc["group_token_nll"].reshape(len(names), k).sum(1)
    cnt = acc["group_tokens"].reshape(len(names), k).sum(1)
    return {f"loss/{n}": float(t / c) for n, t, c in zip(names, tok, cnt) if c > 0}


def _to_host(tree) -> dict | None:
    """Device sums -> JSON (value and dtype), so a checkpoint carries them exactly."""
    if tree is None:
        return None
    return {k: {"value": np.asarray(jax.device_get(v)).tolist(), "dtype": str(np.asarray(v).dtype)}
            for k, v in tree.items()}


def _from_host(d: dict | None, mesh):
    if not d:
        return None
    return jax.device_put({k: np.asarray(v["value"], v["dtype"]) for k, v in d.items()}, replicated(mesh))


def run(cfg: Config, stop: StopRequest | None = None) -> dict:
    """Runs (or resumes) one training job; returns the summary it also writes.

    With a `StopRequest` that fires (SIGTERM/SIGINT), the run saves a checkpoint at the
    next step boundary and returns `{"stopped": <signal>, "step": <step>}` instead.
    The run directory is locked for the whole run (`hbo_jax.runlock`): a second run on it
    raises `RunLocked` before any other work.
    """
    t_start = time.perf_counter()
    with hold_run_dir(cfg.run_dir):
        return _run(cfg, stop or StopRequest(), t_start)


def _run(cfg: Config, stop: StopRequest, t_start: float) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    log.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    check_batch_size("train.batch_size", cfg.train.batch_size, mesh)
    check_batch_size("scorer.batch_size", cfg.scorer.batch_size, mesh)
    # Before anything expensive: the checkpoint to resume from, and whether it may be.
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    found = ckpt.find_resumable()
    if found is not None:
        notes = check_resume_config(found[1].get("config", {}), to_dict(cfg), cfg.train.allow_config_change,
                                    f"the checkpoint at step {found[0]}")
        for note in notes:
            log.warning("resume: %s", note)
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    data = prepare(cfg, mesh)
    m = data.manifest
    log.info("data: %d subsets, %d train examples, K=%d %s buckets (prepared in %s)",
             len(data.names), sum(data.sizes), data.num_buckets, m["difficulty"], data.root)
    for note in data_notes(m):  # skips by reason with their first positions, cut examples per subset
        log.warning("data: %s", note)

    pack_rows = 0
    if cfg.data.packing:  # rows are sharded like batch rows; each host packs its own slice
        slots = np.minimum(np.concatenate([s.lengths for s in data.train]), cfg.data.seq_len + 1) - 1
        pack_rows = cfg.data.pack_rows or default_pack_rows(cfg.train.batch_size, float(np.mean(slots)),
                                                            cfg.data.seq_len, batch_divisor(mesh))
        check_batch_size("data.pack_rows", pack_rows, mesh)
        if pack_rows % jax.process_count():
            raise ConfigError(f"data.pack_rows={pack_rows} not divisible by {jax.process_count()} processes")
        log.info("packing: %d examples a step into %d rows of %d tokens (mean example %.1f tokens)",
                 cfg.train.batch_size, pack_rows, cfg.data.seq_len, float(np.mean(slots)))
    graphdef, params, _ = base_model(cfg, mesh, data)
    tc = cfg.train
    tx = make_optimizer(tc.learning_rate, tc.steps, tc.warmup_steps, tc.weight_decay, tc.grad_clip)
    state = init_train_state(params, tx, mesh)
    k, d = data.num_buckets, len(data.names)
    nll_fn = make_example_nll_fn(graphdef, mesh)

    strategy = resolve(cfg.mixing)
    leaves = data.leaves()
    mixer = Mixer(strategy, cfg.mixing, data.sizes, leaves, data.train, graphdef, mesh,
                  cfg.data.seq_len, data.pad_id, tc.seed, dev_stores=data.eval, train_batch=tc.batch_size)
    # Only a reward taken from training batches needs each row's reference NLL in the step.
    use_ref = mixer.uses_train_stats
    step_args = (graphdef, tx, mesh, d * k, state_shardings(state))
    train_step = make_train_step(*step_args, ref_nll=use_ref, packing=bool(pack_rows))
    # The steps that feed a train-sourced global reward also return per-example gradient norms.
    gradnorm_step = (make_train_step(*step_args, ref_nll=use_ref, packing=bool(pack_rows), example_gradnorm=True)
                     if mixer.train_gradnorm else None)
    schedule = (load_schedule(cfg.mixing.replay_from, data.names, k) if strategy.name == "replay"
                else ProbabilitySchedule(*mixer.probabilities()))
    sampler = HierarchicalSampler(leaves, tc.batch_size, tc.seed, schedule)
    metrics_log, mixing_log = JsonlWriter(run_dir / "metrics.jsonl"), JsonlWriter(run_dir / "mixing.jsonl")
    eval_log = JsonlWriter(run_dir / "eval.jsonl")
    tracker = Tracker(cfg.tracking, run_dir, config=to_dict(cfg))

    def evaluate(p, desc: str) -> dict:  # full evaluation, with task metrics
        return evaluate_model(graphdef, p, data, cfg, mesh, nll_fn, max_per_subset=cfg.data.max_eval_per_subset,
                              with_tasks=cfg.eval.tasks, desc=desc)

    def periodic_eval(p, step: int) -> None:  # capped held-out loss for the curves
        res = evaluate_model(graphdef, p, data, cfg, mesh, nll_fn, with_tasks=False,
                             max_per_subset=cfg.eval.periodic_max_per_subset)
        eval_log.write({"step": step, "eval": res})
        tracker.log(step, eval_scalars(res))

    start, mix_acc, acc = (found[0] if found else None), None, None
    if start is not None:
        restored = ckpt.restore(start, state, mixer.state)
        state, mixer.state = restored["train"], restored["mixer"]
        sampler.set_state(restored["sampler"])
        before = restored["meta"]["eval_before"]
        if restored["meta"].get("mix_acc"):
            mix_acc = jax.device_put({k: np.asarray(v, np.float32) for k, v in restored["meta"]["mix_acc"].items()},
                                     replicated(mesh))
        acc = _from_host(restored["meta"].get("log_acc"), mesh)  # a stop between log lines
        for writer in (metrics_log, mixing_log, eval_log):
            writer.truncate(start)
        log.info("resumed from step %d in %s", start, ckpt.directory)
    else:
        start = 0
        for f in ("metrics.jsonl", "mixing.jsonl", "eval.jsonl"):
            (run_dir / f).unlink(missing_ok=True)
        before = evaluate(state.params, "the starting model")
        tracker.log(0, eval_scalars(before, prefix="eval_full"))
        if cfg.eval.every:
            periodic_eval(state.params, 0)
        mixer.start(state.params)
        pg, pl = sampler.schedule.at(0)
        if jax.process_index() == 0:
            (run_dir / "probabilities_start.json").write_text(dumps(
                {"step": 0, "p_global": pg.tolist(), "p_local": pl.tolist()}))

    for e in sampler.schedule.entries:  # a replayed schedule's future entries, logged like updates
        if e["from_step"] > start:
            mixing_log.write({"step": e["from_step"], "from_step": e["from_step"], "replayed": True,
                              "p_global": e["p_global"], "p_local": e["p_local"]})

    pack_stats: dict = {}
    batches = batch_iterator(sampler, data.train, cfg.data.seq_len, data.pad_id, host_slice(tc.batch_size),
                             ref_nll=data.nll0 if use_ref else None,
                             pack_rows=pack_rows // jax.process_count(), pack_stats=pack_stats)
    trace = Trace(run_dir, cfg.distributed.trace, host_slice(tc.batch_size), fresh=start == 0)
    t_log, mix_before = time.perf_counter(), mixer.seconds

    def meta() -> dict:
        # The local reward's partial-interval sums travel with the checkpoint (exact resume).
        acc_host = None if mix_acc is None else {k: np.asarray(jax.device_get(v)).tolist()
                                                 for k, v in mix_acc.items()}
        return {"eval_before": before, "config": to_dict(cfg), "mix_acc": acc_host, "log_acc": _to_host(acc)}
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=f"train [{strategy.name}]",
               disable=jax.process_index() != 0)

    def close() -> None:
        bar.close()
        ckpt.close()
        tracker.close()

    # Too many non-finite updates in a row: close and raise, saving nothing (the newest checkpoint stays).
    guard = NonFiniteGuard(tc.max_nonfinite_steps, str(ckpt.directory), on_stop=close)

    def stopped(done: int) -> dict:  # SIGTERM/SIGINT: save at this step boundary and exit cleanly
        guard.check(done)
        if done not in ckpt.all_steps():
            seconds = ckpt.save(done, state, mixer.state, sampler.get_state(), meta())
            log.info("checkpoint at step %d saved in %.2fs", done, seconds)
        close()
        log.warning("stopped by %s at step %d of %d, %.1fs after the signal; run the same command "
                    "again to resume", stop.signal_name or "a signal to another process", done, tc.steps,
                    stop.seconds_since())
        return {"stopped": stop.signal_name or "another process", "step": done}

    if start < tc.steps and stop.should_stop():  # signalled while preparing: stop before training
        return stopped(start)
    t_loop = time.perf_counter()
    for s in bar:
        host_batch = next(batches)
        trace.batch(s, host_batch)
        done = s + 1
        with_gradnorm = mixer.wants_example_gradnorm(done, tc.steps)
        mixer.time_norm_steps(done, state, after=False)
        state, metrics = (gradnorm_step if with_gradnorm else train_step)(state, global_batch_from_host(host_batch, mesh))
        if with_gradnorm:
            mixer.time_norm_steps(done, state, after=True)
        metrics = dict(metrics)
        gradnorm = metrics.pop("group_gradnorm", None)
        guard.observe(metrics)
        acc = _add(acc, metrics)  # key-wise: a stop's saved sums may predate a metric
        # Reward statistics since the last update, summed on device (no host sync).
        if use_ref:
            mix_acc = _add(mix_acc, {key: metrics[key] for key in _LOCAL_KEYS})
        if gradnorm is not None:
            mix_acc = _add(mix_acc, dict(zip(_GLOBAL_KEYS, (gradnorm, metrics["group_examples"]))))
        # No update after the last step: nothing would sample from it.
        record = mixer.update(done, state.params, mix_acc) if done < tc.steps else None
        if record is not None:  # the statistics the update consumed restart from zero
            used = (_LOCAL_KEYS if "ppl_ratio" in record else ()) + (
                _GLOBAL_KEYS if mixer.train_gradnorm and "reward_global" in record else ())
            mix_acc = {key: v for key, v in (mix_acc or {}).items() if key not in used} or None
        if record is not None:
            sampler.schedule.set(done, record["p_global"], record["p_local"])
            record["from_step"] = done
            mixing_log.write(record)
            trace.mixer(done, mixer.state, sampler.schedule.at(done))
            tracker.log(done, mixing_scalars(record, data.names))
        if done % tc.log_every == 0 or done == tc.steps:
            host = jax.device_get(acc)
            n = host["group_examples"].sum()
            dt = time.perf_counter() - t_log
            nsteps = tc.log_every if done % tc.log_every == 0 else done % tc.log_every
            line = {"step": done, "loss": float(host["loss"] / nsteps),
                    "grad_norm": float(host["grad_norm"] / nsteps),
                    "loss_tokens_per_s": float(host["tokens"] / dt), "examples": int(n),
                    "mixing_share": (mixer.seconds - mix_before) / dt, "nonfinite_skipped": int(host["nonfinite"])}
            line.update(_per_subset(host, data.names, k))
            line["drawn"] = host["group_examples"].reshape(d, k).astype(int).tolist()
            metrics_log.write(line)
            guard.check(done, line["nonfinite_skipped"], f"steps {done - nsteps + 1}-{done}")
            tracker.log(done, metrics_scalars(line, data.names))
            bar.set_postfix(loss=f"{line['loss']:.3f}", mix=f"{100 * line['mixing_share']:.1f}%")
            acc, t_log, mix_before = None, time.perf_counter(), mixer.seconds
        if cfg.eval.every and done % cfg.eval.every == 0:
            periodic_eval(state.params, done)
        if done % tc.checkpoint_every == 0 and done < tc.steps:
            guard.check(done)
            ckpt.save(done, state, mixer.state, sampler.get_state(), meta())
        # One process: a free check every step; several: a collective every stop_check_every steps.
        check = jax.process_count() == 1 or done % cfg.distributed.stop_check_every == 0
        if done < tc.steps and check and stop.should_stop():
            return stopped(done)
    loop_seconds = time.perf_counter() - t_loop
    bar.close()
    if ckpt.latest_step() != tc.steps:  # a finished run that is relaunched has it already
        ckpt.save(tc.steps, state, mixer.state, sampler.get_state(), meta())
    ckpt.close()

    after = evaluate(state.params, "the trained model")
    tracker.log(tc.steps, eval_scalars(after, prefix="eval_full"))
    tracker.close()
    pg, pl = sampler.schedule.at(tc.steps)
    summary = {
        "strategy": strategy.name, "steps": tc.steps, "subsets": data.names,
        "eval_before": before, "eval_after": after,
        "p_global_final": dict(zip(data.names, pg.tolist())),
        "mixing_seconds": mixer.seconds, "train_loop_seconds": loop_seconds,
        "mixing_share": mixer.seconds / max(loop_seconds, 1e-9),
        "estimated_probe_share": mixer.estimated_probe_share,
        "actor_updates": np.asarray(jax.device_get(mixer.state.num_updates)).tolist(),
        "skipped_updates": int(jax.device_get(mixer.state.num_skipped)),
        "nonfinite_skipped": total_nonfinite(state.opt_state),
        "data_skipped": m["skipped"]["total"], "prepared": str(data.root),
        "data_truncated": {s["name"]: s.get("truncated") for s in m["subsets"]},  # None: not counted
        "wall_seconds": time.perf_counter() - t_start,
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
        print("\nfinal p_global: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(data.names, pg)))
        print(f"mixing overhead: {100 * summary['mixing_share']:.1f}% of the training loop "
              f"({mixer.seconds:.1f}s of {loop_seconds:.1f}s)")
        print(f"run directory: {run_dir} (report: {summary['report']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbo_jax.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        init_distributed(cfg.distributed)  # here, not at import (grain#802)
        with StopRequest() as stop:
            run(cfg, stop)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
