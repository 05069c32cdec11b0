"""A second training method plugs into the same loop, hooks and checkpoints (hbo_jax.algorithm).

The toy method here is plain fine-tuning on a fixed uniform mixture, with no mixer. It is
registered from the test, so nothing in the loop knows it: it trains, writes the usual
logs, checkpoints, resumes exactly after a stop, and is evaluated like any run.
"""

import json

import jax
import numpy as np
import pytest

from hbo_jax import algorithm
from hbo_jax.algorithm import Algorithm, RunContext
from hbo_jax.data.sampler import ProbabilitySchedule
from hbo_jax.distributed import StopRequest
from hbo_jax.step import init_train_state, make_optimizer, make_train_step, state_shardings
from hbo_jax.train import main, run
from hbo_jax.config import load_config

from conftest import tiny_overrides


class PlainFineTune(Algorithm):
    """Uniform batches, one AdamW step each, nothing learned about the mixture."""

    label = "plain"

    def __init__(self, ctx: RunContext):
        tc, d, k = ctx.cfg.train, len(ctx.data.names), ctx.data.num_buckets
        tx = make_optimizer(tc.learning_rate, tc.steps, tc.warmup_steps, tc.weight_decay, tc.grad_clip)
        self.train_state = init_train_state(ctx.params, tx, ctx.mesh)
        self._step = make_train_step(ctx.graphdef, tx, ctx.mesh, d * k, state_shardings(self.train_state))
        self.schedule = ProbabilitySchedule(np.full(d, 1 / d), np.full((d, k), 1 / k))
        self.steps_taken = 0  # host-side state, carried in meta

    def state(self):
        return {"train": self.train_state}

    def load_state(self, trees, meta):
        self.train_state = trees["train"]
        self.steps_taken = meta["steps_taken"]

    def meta(self):
        return {"steps_taken": self.steps_taken}

    def step(self, done, batch):
        self.train_state, metrics = self._step(self.train_state, batch)
        self.steps_taken += 1
        return dict(metrics), []

    def summary(self):
        return {"steps_taken": self.steps_taken}


@pytest.fixture(autouse=True)
def registered():
    algorithm.register("plain_test", PlainFineTune)
    yield
    algorithm._REGISTRY.pop("plain_test")


def _overrides(run_dir, cache, *extra):
    return tiny_overrides(run_dir, cache, "algorithm=plain_test", "train.steps=4", "train.checkpoint_every=2",
                          "eval.every=2", *extra)


def _params(run_dir):
    from hbo_jax.checkpoint import Checkpointer
    from hbo_jax.models.llama import LlamaSpec  # noqa: F401

    ckpt = Checkpointer(run_dir / "checkpoints", keep=10)
    out = ckpt.manager.restore(ckpt.latest_step())
    ckpt.close()
    return jax.tree.leaves(out["train"]["params"])


def test_toy_algorithm_trains_and_writes_the_usual_outputs(tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    assert main(_overrides(run_dir, shared_cache)) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "plain_test" and summary["steps_taken"] == 4
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [json.loads(l)["step"] for l in (run_dir / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]
    assert not (run_dir / "mixing.jsonl").exists()  # no records: nothing mixed
    assert json.loads((run_dir / "eval.json").read_text())["after"]["macro_avg"]["loss"] > 0


class _StopAfter(StopRequest):
    """A stop request that fires once `n` checks have been made (one per step)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def should_stop(self):
        self.n -= 1
        if self.n <= 0:
            self.signal_name = "test"
        return self.n <= 0


def test_toy_algorithm_resumes_exactly(tmp_path, shared_cache):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_overrides(whole, shared_cache)) == 0
    cfg = load_config(None, _overrides(split, shared_cache))
    out = run(cfg, _StopAfter(4))  # the first check is before training; stops after step 3
    assert out["stopped"] and out["step"] == 3
    run(cfg)
    for a, b in zip(_params(whole), _params(split)):
        np.testing.assert_array_equal(a, b)
    lines = lambda d: [{k: v for k, v in json.loads(l).items() if k not in ("loss_tokens_per_s", "mixing_share")}
                       for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert lines(whole) == lines(split)
    assert json.loads((split / "summary.json").read_text())["steps_taken"] == 4


def test_unknown_algorithm_is_a_config_error(tmp_path, shared_cache, capsys):
    assert main(tiny_overrides(tmp_path / "r", shared_cache, "algorithm=nope")) == 2
    assert "algorithm='nope' is not one of" in capsys.readouterr().err
