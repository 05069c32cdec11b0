"""train.seed vs train.data_seed: data-order replicas share prepared data and starting model.

`train.seed` initialises the model and warms up the scorer (so it decides the prepared
data); `train.data_seed` (-1 = train.seed) decides the batch order and the probes.
"""

import inspect
import json
import logging
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from hbo_jax.config import load_config
from hbo_jax.rng import Stream, generator
from hbo_jax.train import main

from conftest import tiny_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_pinned_runs import FILES, pinned_outputs  # noqa: E402


def test_rng_streams_equal_the_literal_seed_sequences_they_replace():
    # The numbers sampler.py and rewards.py used before the streams had names.
    for stream, keys, literal in ((Stream.SAMPLER, (7,), [5, 0, 7]), (Stream.LEAF_PERMUTATION, (3, 2), [5, 1, 3, 2]),
                                  (Stream.GLOBAL_PROBES, (4,), [5, 2, 4]), (Stream.LOCAL_PROBES, (1, 0), [5, 3, 1, 0]),
                                  (Stream.DEV_PROBES, (2,), [5, 4, 2])):
        got = generator(5, stream, *(np.int64(k) for k in keys)).random(8)
        np.testing.assert_array_equal(got, np.random.default_rng(literal).random(8), err_msg=stream.name)


def test_data_seed_minus_one_resolves_to_train_seed():
    assert load_config(None, ["train.seed=3"]).train.resolved_data_seed == 3
    assert load_config(None, ["train.seed=3", "train.data_seed=0"]).train.resolved_data_seed == 0


def test_the_prepared_key_holds_train_seed_but_not_data_seed(tmp_path):
    from hbo_jax.data.prepare import prepared_key

    def key(*extra):
        cfg = load_config(None, tiny_overrides(tmp_path / "run", tmp_path / "cache", *extra))
        return prepared_key(cfg)

    assert key("train.data_seed=0") == key("train.data_seed=1") == key()
    assert key("train.seed=1") != key()


def test_data_seeds_start_from_bitwise_equal_parameters(tmp_path):
    """data_seed=0 prepares (scorer kept in memory); data_seed=1 finds it and reads the scorer file."""
    from hbo_jax.scorer import prepare
    from hbo_jax.models.base import base_model
    from hbo_jax.parallel import make_mesh

    params = []
    for ds in (0, 1):
        cfg = load_config(None, tiny_overrides(tmp_path / "run", tmp_path / "cache", f"train.data_seed={ds}"))
        mesh = make_mesh(cfg.mesh)
        data = prepare(cfg, mesh)
        assert (data.scorer_model is not None) == (ds == 0)  # the second one reused the preparation
        params.append([np.asarray(x) for x in jax.device_get(jax.tree.leaves(base_model(cfg, mesh, data)[1]))])
    assert len(params[0]) == len(params[1])
    for a, b in zip(*params):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A data-seed sweep on a fresh cache: data_seed=0, then 1, at train.seed=0 (2 steps each)."""
    root = tmp_path_factory.mktemp("sweep")
    logger = logging.getLogger("hbo_jax")
    out = {}
    for ds in (0, 1):
        handler = _Messages()
        logger.addHandler(handler)  # survives setup_logging, which replaces the root's handlers
        try:
            assert main(tiny_overrides(root / f"d{ds}", root / "cache", f"train.data_seed={ds}",
                                       "distributed.trace=true")) == 0
        finally:
            logger.removeHandler(handler)
        out[ds] = (root / f"d{ds}", handler.lines)
    return root / "cache", out


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_data_seed_sweep_uses_one_prepared_directory(sweep):
    cache, runs = sweep
    prepared = {_summary(run_dir)["prepared"] for run_dir, _ in runs.values()}
    assert prepared == {str(p) for p in (cache / "prepared").iterdir()} and len(prepared) == 1


def test_the_second_data_seed_finds_the_prepared_data(sweep):
    _, runs = sweep
    found = [[l for l in lines if l.startswith("prepared data found in")] for _, lines in runs.values()]
    assert found[0] == []  # the first run prepared it (tokenizer, scorer warm-up, scoring)
    prepared = _summary(runs[1][0])["prepared"]
    assert found[1] == [f"prepared data found in {prepared}: no tokenizing, scorer warm-up or scoring"]


def test_data_seeds_draw_different_batches(sweep):
    _, runs = sweep

    def first_batch(run_dir):
        rows = [json.loads(l) for l in (run_dir / "trace" / "process_0.jsonl").read_text().splitlines()]
        return next(r["digest"] for r in rows if r["kind"] == "batch" and r["step"] == 1)

    assert first_batch(runs[0][0]) != first_batch(runs[1][0])


@pytest.mark.parametrize("strategy, spied", [("hbo", ("draw_global_probes", "fixed_local_probes")),
                                             ("multidds", ("dev_probes",))])
def test_the_probes_are_drawn_with_the_data_seed(tmp_path, shared_cache, monkeypatch, strategy, spied):
    from hbo_jax.mixing import rewards

    seeds = {name: [] for name in spied}

    def spy(name):
        real = getattr(rewards, name)

        def call(*args, **kwargs):
            seeds[name].append(inspect.signature(real).bind(*args, **kwargs).arguments["seed"])
            return real(*args, **kwargs)
        return call

    for name in spied:
        monkeypatch.setattr(rewards, name, spy(name))
    assert main(tiny_overrides(tmp_path / "run", shared_cache, "train.seed=0", "train.data_seed=7",
                               f"mixing.strategy={strategy}")) == 0
    assert {name: set(s) for name, s in seeds.items()} == {name: {7} for name in spied}


def test_data_seed_equal_to_train_seed_reproduces_the_run_without_one(tmp_path, shared_cache):
    # The pinned configuration with data_seed unset (-1) and set to the train seed, on this host: to the bit
    unset = pinned_outputs("hbo", tmp_path / "unset", shared_cache)
    outputs = pinned_outputs("hbo", tmp_path / "run", shared_cache, ("train.data_seed=0",))
    for f in FILES:
        assert outputs[f] == unset[f], f


def test_with_a_pretrained_model_train_seed_leaves_the_prepared_key_alone(tmp_path):
    from hbo_jax.data.prepare import prepared_key

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")

    def key(seed):
        cfg = load_config(None, tiny_overrides(tmp_path / "run", tmp_path / "cache", f"model.init=hf:{tmp_path}/base",
                                               f"train.seed={seed}"))
        return prepared_key(cfg)

    assert key(0) == key(1)  # nothing is warmed up, so nothing the seed decides is prepared


def test_another_train_seed_is_told_how_to_reuse_the_prepared_data(sweep):
    from hbo_jax.data.prepare import _hash, _key_settings, _other_seeds, mixture

    cache, runs = sweep
    prepared = Path(_summary(runs[0][0])["prepared"])
    cfg = load_config(None, tiny_overrides(cache / "run", cache, "train.seed=1"))
    settings = _key_settings(cfg, mixture(cfg))
    seedless = _hash({k: v for k, v in settings.items() if k != "seed"})
    assert _other_seeds(cache / "prepared" / _hash(settings), seedless) == [prepared.name]
