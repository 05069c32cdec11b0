"""Evaluation: held-out loss per subset and difficulty bucket, and task metrics.

`python -m hbo_jax.evaluate RUN_DIR [--model ...]` evaluates a model on a run's eval
data (the run's config decides tokenizer, sequence length and buckets):

  --model checkpoint   the run's latest checkpoint (default; `--step N` for another)
  --model base         the model the run started from (before training)
  --model hf:<dir>     an exported Hugging Face directory (e.g. `export_hf` of this run)
  --model gguf:<file>  a GGUF file; `--model smollm2` the packaged SmolLM2

`--config FILE [key=value ...]` instead of RUN_DIR evaluates on any configured mixture.
Results go to `<run_dir>/eval_<model>.json` (or `--out`) and a table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from hbo_jax import tasks
from hbo_jax.data.eval_sample import eval_sample
from hbo_jax.data.scoring import score_examples
from hbo_jax.records import dumps

log = logging.getLogger(__name__)
TASK_KEYS = ("acc", "acc_norm", "exact_match")
nan = float("nan")  # a subset without eval examples has no loss


def bucket_losses(nll: np.ndarray, tokens: np.ndarray, buckets: np.ndarray, k: int) -> list[float | None]:
    """Token-weighted mean NLL per bucket (None for a bucket with no eval examples)."""
    out = []
    for j in range(k):
        sel = buckets == j
        out.append(float((nll[sel] * tokens[sel]).sum() / tokens[sel].sum()) if tokens[sel].sum() else None)
    return out


def heldout_loss(nll_fn, params, stores: Sequence, names: Sequence[str], mesh, seq_len: int,
                 pad_id: int, max_per_subset: int, batch_size: int,
                 buckets: Sequence[np.ndarray] | None = None, num_buckets: int = 0) -> dict[str, dict]:
    """Token-weighted response NLL and perplexity on each subset's eval split.

    With `buckets` (each eval example's difficulty bucket) the loss per bucket is added as
    `bucket_loss`, and the capped rows are a sample stratified by bucket (`eval_sample`).
    `examples` is how many rows the loss used, `eval_rows` how many the subset has.
    """
    out = {}
    for i, (name, store) in enumerate(zip(names, stores)):
        if len(store) == 0:
            continue
        strata = np.asarray(buckets[i]) if buckets is not None else np.zeros(len(store), np.int32)
        rows = eval_sample(strata, max_per_subset, name)
        exs = [store[int(j)] for j in rows]
        nll = score_examples(exs, nll_fn, params, mesh, seq_len, pad_id, batch_size)
        tokens = np.array([m[1:].sum() for _, m in exs], np.float64)
        loss = float((nll * tokens).sum() / tokens.sum())
        out[name] = {"loss": loss, "ppl": math.exp(loss), "examples": len(rows), "eval_rows": len(store)}
        if buckets is not None:
            out[name]["bucket_loss"] = bucket_losses(nll, tokens, strata[rows], num_buckets)
    return out


def macro_average(results: dict[str, dict]) -> dict:
    """Each metric averaged over the subsets that have it (equal weight per subset)."""
    subsets = [v for k, v in results.items() if k != "macro_avg"]
    macro: dict = {}
    for key in ("loss",) + TASK_KEYS:
        vals = [v[key] for v in subsets if v.get(key) is not None]
        if vals:
            macro[key] = float(np.mean(vals))
            macro[f"{key}_subsets"] = len(vals)
    if "loss" in macro:
        macro["ppl"] = math.exp(macro["loss"])
    macro["examples"] = int(sum(v.get("examples", 0) for v in subsets))
    return macro


def make_logprob_fn(graphdef, params, mesh, pad_id: int, batch_size: int):
    """`f([[(ids, mask), ...] per question]) -> per question, each option's summed log-probability of its
    masked tokens`; the options' shared prompt runs once (`hbo_jax.models.continuations`)."""
    from hbo_jax.models.continuations import continuation_logprobs

    def f(groups: list) -> list[np.ndarray]:
        return continuation_logprobs(graphdef, params, groups, mesh=mesh, pad_id=pad_id, batch_size=batch_size)
    return f


def make_generate_fn(graphdef, params, mesh, tokenizer, pad_id: int, max_new_tokens: int, batch_size: int):
    """`f([prompt ids, ...]) -> [greedy answer ids, ...]` through the KV-cache decoder."""
    from hbo_jax.models.generate import generate

    def f(prompts: list) -> list:
        return generate(graphdef, params, prompts, mesh=mesh, max_new_tokens=max_new_tokens,
                        eos_ids=tasks.eos_ids(tokenizer), pad_id=pad_id, batch_size=batch_size)
    return f


def task_metrics(graphdef, params, data, cfg, mesh, max_per_subset: int) -> dict[str, dict]:
    """Multiple-choice accuracy or exact match per subset, as `cfg.eval` chooses."""
    seq_len, bs = cfg.data.seq_len, cfg.scorer.score_batch_size
    option_logprob = make_logprob_fn(graphdef, params, mesh, data.pad_id, bs)
    generate_fn = make_generate_fn(graphdef, params, mesh, data.tokenizer, data.pad_id,
                                   cfg.eval.max_new_tokens, bs)
    out = {}
    for src in data.manifest["sources"]:
        name = src["name"]
        items = _task_items(data, src, max_per_subset)
        requested = cfg.eval.metrics.get(name, "auto")
        metric = tasks.choose_metric(requested, items, cfg.eval.exact_match_max_chars)
        t0 = time.perf_counter()
        if metric == "mc":
            out[name] = tasks.score_mc(items, data.tokenizer, seq_len, option_logprob)
        elif metric == "exact_match":
            max_prompt = max(seq_len - cfg.eval.max_new_tokens, 1)
            out[name] = tasks.score_exact_match(items, data.tokenizer, generate_fn, max_prompt)
            note = tasks.letter_answers_note(items)
            if note:
                log.warning("subset %r: %s", name, note)
        else:
            out[name] = {"metric": "none"}
        if metric in ("mc", "exact_match"):  # where an evaluation's time goes (compiles included)
            log.info("eval: %s on %d rows of %r in %.1fs", metric, len(items), name, time.perf_counter() - t0)
        if "unavailable" in out[name]:
            log.warning("%s: no %s for subset %r: %s", f"eval.metrics.{name}={requested}" if requested != "auto"
                        else "eval", metric, name, out[name]["unavailable"])
    return out


def _task_items(data, src: dict, cap: int) -> list:
    """A subset's capped eval rows as task items: the rows its held-out loss uses, when they line up.

    The items are read from the eval inputs again; they line up with the prepared eval
    examples (and their buckets) unless preparation dropped rows (too long, no response
    tokens), in which case the sample is drawn without strata.
    """
    if not src["eval"]:
        return []
    items = tasks.read_eval_items(src["eval"], src.get("format", "auto"))
    i = data.names.index(src["name"])
    aligned = len(items) == len(data.eval[i])
    strata = np.asarray(data.eval_buckets[i]) if aligned else np.zeros(len(items), np.int32)
    return [items[int(j)] for j in eval_sample(strata, cap, src["name"])]


def merge_task_result(entry: dict, res: dict) -> None:
    """Adds a task metric's result to a subset's entry; its row count goes to `task_examples`.

    `examples` stays the held-out loss's count: the two may differ (rows without a usable
    answer or options), and a metric that could not be computed must not erase it.
    """
    res = dict(res)
    if "examples" in res:
        res["task_examples"] = res.pop("examples")
    entry.update(res)


def evaluate_model(graphdef, params, data, cfg, mesh, nll_fn, *, max_per_subset: int,
                   with_tasks: bool, desc: str = "") -> dict[str, dict]:
    """Held-out loss (per subset and bucket) plus, optionally, task metrics; with `macro_avg`."""
    bar = f"evaluating {desc}" if desc else ""
    if bar:
        log.info("%s (at most %d eval examples per subset, a stratified sample fixed per subset)", bar,
                 max_per_subset)
    t0 = time.perf_counter()
    out = heldout_loss(nll_fn, params, data.eval, data.names, mesh, cfg.data.seq_len, data.pad_id,
                       max_per_subset, cfg.scorer.score_batch_size, data.eval_buckets, data.num_buckets)
    if bar:  # a full evaluation (the periodic one is unnamed and frequent)
        log.info("eval: held-out loss of %d subsets in %.1fs", len(out), time.perf_counter() - t0)
    if with_tasks:
        for name, res in task_metrics(graphdef, params, data, cfg, mesh, max_per_subset).items():
            merge_task_result(out.setdefault(name, {}), res)
    out["macro_avg"] = macro_average(out)
    return out


def _start_eval_key(cfg, mesh) -> str:
    """What the starting model's evaluation depends on besides the prepared data, hashed.

    The model settings (and train.seed for a randomly initialised model), the evaluation
    settings, the batch and mesh shapes and the platform (they round differently), and
    the package's code: an upgrade evaluates afresh. Not the mixing strategy or the data
    seed, which act only once training starts.
    """
    code = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        code.update(f.read_bytes())
    ev = dataclasses.asdict(cfg.eval)
    for k in ("every", "periodic_max_per_subset"):
        ev.pop(k)
    settings = {"code": code.hexdigest(), "algorithm": cfg.algorithm, "model": dataclasses.asdict(cfg.model),
                "seed": cfg.train.seed if cfg.model.init == "random" else None, "eval": ev,
                "cap": cfg.data.max_eval_per_subset, "batch": cfg.scorer.score_batch_size,
                "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": str(mesh.devices.flat[0].device_kind),
                "jax": jax.__version__}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def starting_evaluation(cfg, data, mesh, evaluate: Callable[[], dict]) -> tuple[dict, Path | None]:
    """The starting model's evaluation, computed once per prepared data and settings.

    Runs that start from the same model on the same data (the seeds and strategies of a
    comparison: a strategy and the data seed act only once training starts) share it, so
    only the first one evaluates before its first step. Kept in the prepared directory;
    one process only (another host might not see the cache).

    Args:
        evaluate: Evaluates the starting model (called on a miss).

    Returns:
        (the evaluation, the file it was read from or None when it was just computed).
    """
    if jax.process_count() > 1:
        return evaluate(), None
    path = data.root / "start_eval" / f"{_start_eval_key(cfg, mesh)}.json"
    try:
        return json.loads(path.read_text()), path
    except (OSError, ValueError):
        pass  # not there yet (or torn by a crash: evaluated again)
    res = evaluate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(res))
    os.replace(tmp, path)  # concurrent runs never read a half-written file
    return res, None


def _cell(res: dict) -> str:
    metric = res.get("metric")
    if metric == "mc" and "acc" in res:
        return f"acc {res['acc']:.3f}"
    if metric == "exact_match" and "exact_match" in res:
        return f"em {res['exact_match']:.3f}"
    return "-"


def _rows(res: dict) -> str:
    """How many eval rows the loss used of the subset's, and the task metric's when it differs."""
    if "eval_rows" not in res:
        return str(res.get("examples", "-"))
    out = f"{res['examples']}/{res['eval_rows']}"
    task = res.get("task_examples")
    return out if task is None or task == res["examples"] else f"{out} task {task}"


def _macro_cell(res: dict) -> str:
    cells = [f"{short} {res[k]:.3f}" for k, short in (("acc", "acc"), ("exact_match", "em")) if k in res]
    return " ".join(cells) or "-"


def format_results(result: dict) -> str:
    """A plain-text table of one model's held-out loss, perplexity and task metric."""
    rows = [f"{'subset':<20} {'loss':>8} {'ppl':>9}  {'task':>18}  rows used"]
    for name, r in result.items():
        cell = _macro_cell(r) if name == "macro_avg" else _cell(r)
        rows.append(f"{name:<20} {r.get('loss', nan):>8.3f} {r.get('ppl', nan):>9.2f}  {cell:>18}  {_rows(r)}")
    return "\n".join(rows)


def format_table(before: dict, after: dict) -> str:
    """Held-out loss / perplexity and the task metric per subset, before and after training."""
    rows = [f"{'subset':<20} {'loss before':>11} {'loss after':>10} {'ppl before':>10} {'ppl after':>9}"
            f"  {'task before':>11} {'task after':>10}  rows used"]
    for name, a in after.items():
        b = before.get(name, {})
        cell = _macro_cell if name == "macro_avg" else _cell
        tb, ta = cell(b), cell(a)
        rows.append(f"{name:<20} {b.get('loss', nan):>11.3f} {a.get('loss', nan):>10.3f} "
                    f"{b.get('ppl', nan):>10.2f} {a.get('ppl', nan):>9.2f}  {tb:>11} {ta:>10}  {_rows(a)}")
    return "\n".join(rows)


def load_model(spec: str, cfg, data, mesh, run_dir: Path | None, step: int | None):
    """(graphdef, params) for `--model`: checkpoint | base | hf:<dir> | gguf:<file> | smollm2."""
    from hbo_jax.checkpoint import Checkpointer
    from hbo_jax.errors import ConfigError
    from hbo_jax.models.base import base_model
    from hbo_jax.models.pretrained import load_pretrained

    if spec not in ("checkpoint", "base"):
        graphdef, params, model_spec = load_pretrained(spec, mesh, cfg.model)
        if model_spec.vocab_size < len(data.tokenizer):
            raise ConfigError(f"--model {spec}: vocabulary {model_spec.vocab_size} is smaller than the "
                             f"run's tokenizer ({len(data.tokenizer)}); evaluate it with its own config")
        return graphdef, params
    if spec == "checkpoint" and run_dir is None:
        raise ConfigError("--model checkpoint needs a RUN_DIR")
    # A checkpoint is restored into the base model's shapes: its weights are not read.
    graphdef, params, _ = base_model(cfg, mesh, data, abstract=spec == "checkpoint")
    if spec == "checkpoint":
        ckpt = Checkpointer(run_dir / "checkpoints", keep=1000)
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            ckpt.close()
            raise ConfigError(f"{run_dir / 'checkpoints'}: no checkpoint found")
        params = ckpt.restore_params(step, params, mesh)
        ckpt.close()
    return graphdef, params


def main(argv: list[str] | None = None) -> int:
    from hbo_jax.cli import USER_ERRORS, setup_logging, use_compile_cache
    from hbo_jax.config import load_config
    from hbo_jax.errors import ConfigError
    from hbo_jax.parallel import make_mesh
    from hbo_jax.scorer import prepare
    from hbo_jax.step import make_example_nll_fn

    ap = argparse.ArgumentParser(prog="python -m hbo_jax.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a run directory (its config.yaml and checkpoints)")
    ap.add_argument("--config", action="append", help="YAML config(s) instead of a run directory (later files win)")
    ap.add_argument("--model", default="checkpoint", help="checkpoint | base | hf:<dir> | gguf:<file> | smollm2")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--max-per-subset", type=int, help="eval examples per subset (default: data.max_eval_per_subset)")
    ap.add_argument("--no-tasks", action="store_true", help="held-out loss only")
    ap.add_argument("--out", help="output JSON (default: <run_dir>/eval_<model>.json)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    if args.run_dir and "=" in args.run_dir and not Path(args.run_dir).exists():
        args.overrides.insert(0, args.run_dir)  # `--config FILE key=value ...`: no run directory, an override
        args.run_dir = None
    setup_logging()
    try:
        run_dir = Path(args.run_dir) if args.run_dir else None
        if run_dir is not None and not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
        if run_dir is None and not args.config:
            raise ConfigError("give a RUN_DIR or --config FILE")
        from hbo_jax.distributed import FRESH_LAUNCH, initialize

        cfg = (load_config(run_dir / "config.yaml", [*FRESH_LAUNCH, *args.overrides], paths_from_file=False)
               if run_dir else load_config(args.config, args.overrides))
        initialize(cfg.distributed)  # every host runs the command on a multi-host cluster
        use_compile_cache(cfg)
        mesh = make_mesh(cfg.mesh)
        data = prepare(cfg, mesh)
        model = args.model if run_dir is not None or args.model != "checkpoint" else "base"
        graphdef, params = load_model(model, cfg, data, mesh, run_dir, args.step)
        nll_fn = make_example_nll_fn(graphdef, mesh)
        cap = args.max_per_subset or cfg.data.max_eval_per_subset
        result = evaluate_model(graphdef, params, data, cfg, mesh, nll_fn, max_per_subset=cap,
                                with_tasks=not args.no_tasks, desc=model)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tag = "".join(c if c.isalnum() else "_" for c in model.split("/")[-1])
    out = Path(args.out) if args.out else (run_dir or Path(cfg.run_dir)) / f"eval_{tag}.json"
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps({"model": model, "step": args.step, "eval": result}, indent=2))
        print(format_results(result))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
