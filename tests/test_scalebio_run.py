"""`algorithm=scalebio` from the command line: the usual outputs, exact resume, a validation
set that never reaches training, the draw command, the memory planner and config errors."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from hbo_jax import lisa
from hbo_jax.config import MeshConfig, load_config
from hbo_jax.data import prepare as prepare_lib
from hbo_jax.data.store import collate
from hbo_jax.data.validation import validation_examples
from hbo_jax.distributed import _digest
from hbo_jax.errors import ConfigError, DataError
from hbo_jax.evaluate import eval_sample
from hbo_jax.memory import model_spec, plan
from hbo_jax.mixing.scalebio import ScaleBiOLisa
from hbo_jax.mixing.scalebio_step import make_optimizers
from hbo_jax.models.llama import abstract_model
from hbo_jax.data import tokenizer as tok_lib
from hbo_jax.data.formats import to_conversation
from hbo_jax.mixing.draw import main as draw_main, row_buckets, split_by_buckets, usable_rows
from hbo_jax.mixing.strategies import load_schedule
from hbo_jax.parallel import make_mesh
from hbo_jax.train import main

from conftest import FIXTURE, tiny_overrides
from test_resilience import rows, saved

# sampling=weights: the sampler follows p, so a resume must restore the schedule too (the
# reference's uniform batches run in tests/test_multihost.py and tests/test_scalebio_step.py).
# LISA with host-kept moments, one of two stacked blocks redrawn every 2 steps: the resume at
# step 2 is a switch, so it needs the checkpointed host moments (the model is conftest's
# SCANNED_RUN's, whose prepared data the session shares). HBO's local actors choose the
# buckets (scalebio.local_actors), updated after step 3: the resume at step 2 needs their
# checkpointed state and the reward sums of steps 1-2.
LOCAL = ("scalebio.local_actors=true", "mixing.local_every=3")
LISA = ("model.scan_layers=true", "model.num_layers=2", "scalebio.lisa_layers=1", "scalebio.lisa_interval=2",
        "scalebio.lisa_moments=host")
EXTRA = ("algorithm=scalebio", "scalebio.validation_subsets=[arithmetic]", "scalebio.sampling=weights", "train.steps=4",
         "train.checkpoint_every=2", "eval.every=0", "eval.tasks=false", "tracking.tensorboard=false",
         "distributed.trace=true", *LISA, *LOCAL)
ITEMS = ("train", "u", "lambda", "lisa_host_u", "lisa_host_w", "mixer")


def _overrides(run_dir, cache, *extra):
    return tiny_overrides(run_dir, cache, *EXTRA, *extra)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, shared_cache):
    run_dir = tmp_path_factory.mktemp("scalebio") / "whole"
    assert main(_overrides(run_dir, shared_cache)) == 0
    return run_dir


def _lines(run_dir, name):
    return [json.loads(l) for l in (run_dir / name).read_text().splitlines()]


def test_a_run_writes_the_usual_outputs_and_the_learned_weights(whole):
    metrics, mixing = _lines(whole, "metrics.jsonl"), _lines(whole, "mixing.jsonl")
    assert [m["step"] for m in metrics] == [r["step"] for r in mixing] == [1, 2, 3, 4]
    for m in metrics:
        assert {"L1", "L2_w", "L2_u", "gap", "grad_norm_u", "loss"} <= m.keys()
    for r in mixing:
        assert math.isclose(sum(r["p_global"]), 1.0) and len(r["lambda"]) == 5 and len(r["p_local"][0]) == 2
    assert mixing[-1]["lambda"] != [0.0] * 5
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["strategy"] == "scalebio" and summary["p_global_final"] == summary["scalebio_weights"]
    assert list(summary["scalebio_weights"].values()) == mixing[-1]["p_global"]
    start = json.loads((whole / "probabilities_start.json").read_text())
    assert start["p_global"] == [0.2] * 5  # lambda = 0
    for f in ("eval.json", "report/report.md", "report/p_global.png", "schedule.json"):
        assert (whole / f).is_file(), f
    assert set(ITEMS) <= {p.name for p in (whole / "checkpoints" / "4").iterdir()}
    # sampling=weights: the batch of step s + 1 was drawn with the p that step s left.
    entries = json.loads((whole / "schedule.json").read_text())["entries"]
    assert [e["from_step"] for e in entries] == [0, 1, 2, 3]
    for e, r in zip(entries[1:], mixing):
        np.testing.assert_allclose(e["p_global"], r["p_global"], rtol=1e-12)
    # The weights as a static mixture that a later run replays (mixing.replay_from).
    sched = load_schedule(summary["scalebio_weights_file"], summary["subsets"], 2)
    np.testing.assert_allclose(sched.at(0)[0], mixing[-1]["p_global"], rtol=1e-12)  # renormalised on load
    assert len(sched.entries) == 1


def test_resume_across_a_switch_and_a_local_update_is_exact(whole, tmp_path, shared_cache):
    """A copy of the finished run, its step-4 checkpoint removed, resumes from step 2 (where u
    and w draw new blocks and take their host-kept moments back, and the local actors' reward
    sums of steps 1-2 feed their update after step 3) into the same state and logs."""
    cut = Path(shutil.copytree(whole, tmp_path / "cut"))
    shutil.rmtree(cut / "checkpoints" / "4")
    assert main(_overrides(cut, shared_cache)) == 0
    a, b = saved(whole, 4, ITEMS), saved(cut, 4, ITEMS)
    for item in ITEMS:
        for x, y in zip(jax.tree.leaves(a[item]), jax.tree.leaves(b[item]), strict=True):
            np.testing.assert_array_equal(x, y)
    assert rows(whole, "mixing.jsonl") == rows(cut, "mixing.jsonl")
    assert rows(whole, "metrics.jsonl") == rows(cut, "metrics.jsonl")


def test_local_actors_move_p_local_from_their_start_and_every_output_records_it(whole):
    """Uniform over the buckets until the update after step 3; then the learned p_local
    reaches the sampler (schedule.json), mixing.jsonl and scalebio_weights.json."""
    mixing = _lines(whole, "mixing.jsonl")
    start = json.loads((whole / "probabilities_start.json").read_text())["p_local"]
    assert start == [[0.5, 0.5]] * 5
    assert [r["p_local"] for r in mixing[:2]] == [start] * 2
    learned = np.asarray(mixing[2]["p_local"])
    assert np.abs(learned - 0.5).max() > 1e-3 and mixing[3]["p_local"] == mixing[2]["p_local"]
    np.testing.assert_allclose(learned.sum(1), 1.0, rtol=1e-6)  # a float32 softmax
    assert [len(r.get("reward_local", [])) for r in mixing] == [0, 0, 5, 0]  # logged with the update
    entries = json.loads((whole / "schedule.json").read_text())["entries"]
    assert [e["p_local"] for e in entries[:3]] == [start] * 3  # the sampler renormalises in float64:
    np.testing.assert_allclose(entries[3]["p_local"], learned, rtol=1e-6)
    weights = json.loads((whole / "scalebio_weights.json").read_text())["entries"]
    np.testing.assert_allclose(weights[0]["p_local"], learned, rtol=1e-6)
    assert json.loads((whole / "summary.json").read_text())["local_actor_updates"] == 1


def test_without_local_actors_p_local_stays_proportional_to_the_bucket_sizes(tmp_path, shared_cache):
    run_dir = tmp_path / "fixed"
    # Every parameter trained (the module's other runs use LISA): one more set of compiled programs.
    assert main(_overrides(run_dir, shared_cache, "scalebio.local_actors=false", "scalebio.lisa_layers=0",
                           "train.steps=3", "distributed.trace=false")) == 0
    start = json.loads((run_dir / "probabilities_start.json").read_text())["p_local"]
    mixing = _lines(run_dir, "mixing.jsonl")
    assert [r["p_local"] for r in mixing] == [start] * 3 and mixing[-1]["p_global"] != [0.2] * 5
    assert all(e["p_local"] == start for e in json.loads((run_dir / "schedule.json").read_text())["entries"])
    cfg = load_config(None, _overrides(run_dir, shared_cache))
    data = prepare_lib.load(Path(json.loads((run_dir / "summary.json").read_text())["prepared"]), cfg)
    sizes = np.array([[len(leaf) for leaf in row] for row in data.leaves()], np.float64)
    np.testing.assert_allclose(start, sizes / sizes.sum(1, keepdims=True), rtol=1e-12)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_lisa_trains_only_the_drawn_blocks_and_holds_moments_for_them_only(whole):
    """Steps 2-3 (one draw): between the checkpoints of steps 2 and 4, u's and w's stacked
    blocks change at their own drawn layer only, the outer parameters change, and each
    optimizer holds float moments for the view only (one block + embeddings and norm)."""
    cfg = load_config(None, _overrides(whole, Path("unused")))
    a, b = saved(whole, 2, ("train", "u")), saved(whole, 4, ("train", "u"))
    for item, name in (("u", "u"), ("train", "w")):
        sc = dataclasses.replace(cfg.scalebio, lisa_moments="reset")  # the draws alone
        drawn = ScaleBiOLisa(sc, 2, cfg.train.resolved_data_seed, None, {"u": None, "w": None},
                             {}).schedules[name].active(2)
        before, after = _flat(a[item]["params"]), _flat(b[item]["params"])
        for key, x in before.items():
            if "['layers']" in key:
                changed = [not np.array_equal(x[i], after[key][i]) for i in range(2)]
                assert changed == [i in drawn for i in range(2)], (item, key)
            else:
                assert not np.array_equal(x, after[key]), (item, key)
        block = sum(x[0].nbytes for k, x in after.items() if "['layers']" in k)
        outer = sum(x.nbytes for k, x in after.items() if "['layers']" not in k)
        floats = sum(x.nbytes for x in _flat(b[item]["opt_state"]).values() if x.dtype == np.float32)
        assert floats == 2 * (block + outer)  # mu and nu of the view: not of the other block


def _digests(examples, seq_len, pad_id):
    batch = collate(examples, seq_len, pad_id)
    return {_digest(i, m) for i, m in zip(batch["input_ids"], batch["loss_mask"])}


def test_every_training_row_is_a_training_example_and_none_a_validation_example(whole, shared_cache):
    cfg = load_config(None, _overrides(whole, shared_cache))
    data = prepare_lib.load(Path(json.loads((whole / "summary.json").read_text())["prepared"]), cfg)
    seq, pad = cfg.data.seq_len, data.pad_id
    train = _digests([s[i] for s in data.train for i in range(len(s))], seq, pad)
    ev = data.eval[data.names.index("arithmetic")]
    val = _digests([ev[i] for i in range(len(ev))], seq, pad)
    assert val and not val & train
    drawn = {d for r in _lines(whole, "trace/process_0.jsonl") if r["kind"] == "batch" for d in r["digest"]}
    assert len(drawn) > 8 and drawn <= train


def test_validation_files_are_tokenized_like_the_mixture(whole, shared_cache):
    """A file of its own gives the same examples as the subset whose eval split it is."""
    eval_file = FIXTURE / "arithmetic.eval.jsonl"
    cfg = load_config(None, _overrides(whole, shared_cache, "scalebio.validation_subsets=[]",
                                       f"scalebio.validation_files=[{eval_file}]"))
    data = prepare_lib.load(Path(json.loads((whole / "summary.json").read_text())["prepared"]), cfg)
    got = validation_examples(cfg, data)
    ev = data.eval[data.names.index("arithmetic")]
    assert len(got) == len(ev) > 0
    for (ids, mask), i in zip(got, range(len(ev))):
        np.testing.assert_array_equal(ids, ev[i][0])
        np.testing.assert_array_equal(mask, ev[i][1])


def test_validation_subsets_take_the_eval_rows_the_run_is_not_evaluated_on(whole, shared_cache):
    cfg = load_config(None, _overrides(whole, shared_cache))
    data = prepare_lib.load(Path(json.loads((whole / "summary.json").read_text())["prepared"]), cfg)
    i = data.names.index("arithmetic")
    evaluated = set(eval_sample(data.eval_buckets[i], cfg.data.max_eval_per_subset, "arithmetic").tolist())
    rest = [data.eval[i][j][0].tobytes() for j in range(len(data.eval[i])) if j not in evaluated]
    assert 0 < len(evaluated) < len(data.eval[i])
    assert [ids.tobytes() for ids, _ in validation_examples(cfg, data)] == rest


def test_validation_subsets_all_evaluated_on_are_refused(whole, shared_cache):
    cfg = load_config(None, _overrides(whole, shared_cache, "data.max_eval_per_subset=100"))
    data = prepare_lib.load(Path(json.loads((whole / "summary.json").read_text())["prepared"]), cfg)
    with pytest.raises(DataError, match="data.max_eval_per_subset=100"):
        validation_examples(cfg, data)


def test_draw_takes_floor_n_p_rows_per_subset_and_the_validation_set_only_when_asked(whole, tmp_path):
    p = dict(zip(*(lambda s: (s["subsets"], s["entries"][0]["p_global"]))(
        json.loads((whole / "scalebio_weights.json").read_text()))))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    uniform = ["--run", str(whole), "--total", "30", "--within", "uniform"]
    assert draw_main([*uniform, "--out", str(a)]) == 0
    assert draw_main([*uniform, "--out", str(b)]) == 0
    assert draw_main([*uniform, "--out", str(c), "--include-validation"]) == 0
    for name, pi in p.items():
        got = (a / f"{name}.train.jsonl").read_text().splitlines()
        source = set((FIXTURE / f"{name}.train.jsonl").read_text().splitlines())
        assert len(got) == min(math.floor(30 * pi), len(source)) and len(set(got)) == len(got)
        assert {json.dumps(json.loads(l), ensure_ascii=False) for l in got} <= \
            {json.dumps(json.loads(l), ensure_ascii=False) for l in source}
        assert got == (b / f"{name}.train.jsonl").read_text().splitlines()  # seeded
    assert not (a / "validation.train.jsonl").exists()
    val = (c / "validation.train.jsonl").read_text().splitlines()
    assert len(val) == len((FIXTURE / "arithmetic.eval.jsonl").read_text().splitlines())


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("lisa_layers", [0, 1])
def test_the_memory_planner_counts_both_models_and_three_optimizers_in_every_scalebio_program(tmp_path, lisa_layers):
    """u-step, w's two programs and the lambda step: each one's inputs plus what it holds
    outside them are the run's whole state (u and w, with LISA optimizer states over one
    block's view, lambda, the batches) and the earlier programs' outputs still alive."""
    cfg = load_config(None, _overrides(tmp_path / "r", tmp_path / "cache", "scalebio.val_batch_size=16",
                                       f"scalebio.lisa_layers={lisa_layers}"))
    programs = {p.name.split(" [")[0]: p for p in plan(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]),
                                                         num_datasets=3)[1] if p.name.startswith("scalebio")}
    assert list(programs) == ["scalebio u-step", "scalebio w train gradient", "scalebio w-step (validation)",
                              "scalebio lambda step"]
    _, params = abstract_model(model_spec(cfg))
    txs = make_optimizers(cfg.scalebio, cfg.train.steps)
    trainable = jax.eval_shape(lisa.view, params, np.zeros(lisa_layers, np.int32)) if lisa_layers else params
    state = lambda tx: 4 + _nbytes(params) + _nbytes(jax.eval_shape(tx.init, trainable))  # step, params, moments
    logits = jax.ShapeDtypeStruct((3,), np.float32)
    lam = _nbytes(logits) + _nbytes(jax.eval_shape(txs.lam.init, logits))
    rows, val_rows, seq = cfg.train.batch_size, 16, cfg.data.seq_len
    # ids, targets, mask (+ group ids and, for the local actors, the starting NLLs)
    train, val = rows * seq * 4 * 3 + 2 * rows * 4, val_rows * seq * 4 * 3
    active = lisa_layers * 4  # one model's block indices
    run = state(txs.u) + state(txs.w) + lam + train + val + 2 * active
    u_step = programs["scalebio u-step"]
    assert u_step.arguments == state(txs.u) + _nbytes(logits) + train + active
    assert u_step.arguments + u_step.held == run
    w_step = programs["scalebio w-step (validation)"]  # takes the train gradient of the view as an input
    assert w_step.arguments == state(txs.w) + _nbytes(trainable) + val + active
    assert w_step.arguments + w_step.held > run + _nbytes(trainable)
    if lisa_layers:  # the moments cover the outer parameters and one of the two blocks
        assert _nbytes(jax.eval_shape(txs.u.init, trainable)) < 0.8 * _nbytes(jax.eval_shape(
            make_optimizers(dataclasses.replace(cfg.scalebio, lisa_layers=0), 4).u.init, params))


@pytest.mark.parametrize("extra,message", [
    ((), "needs a validation set"),
    (("scalebio.validation_subsets=[a]", "scalebio.validation_files=[x.jsonl]"), "exactly one"),
    (("scalebio.validation_subsets=[a]", "data.packing=true"), "data.packing=false"),
    (("scalebio.validation_subsets=[a]", "scalebio.sampling=p"), "scalebio.sampling"),
    (("scalebio.validation_subsets=[a]", "scalebio.lisa_layers=2"), "model.scan_layers=true"),
    (("scalebio.validation_subsets=[a]", "scalebio.lisa_layers=9", "model.scan_layers=true"), "model.num_layers"),
    (("scalebio.validation_subsets=[a]", "scalebio.lisa_moments=keep"), "scalebio.lisa_moments"),
    (("scalebio.validation_subsets=[a]", "scalebio.local_actors=true"),
     "scalebio.local_actors=true needs scalebio.sampling=weights"),
    (("scalebio.validation_subsets=[a]", "scalebio.local_actors=true", "scalebio.sampling=weights",
      "mixing.local_reward=ifd_ratio"), "set mixing.local_reward=ppl_ratio"),
    (("scalebio.validation_subsets=[a]", "scalebio.local_actors=true", "scalebio.sampling=weights",
      "model.init=random"), "scalebio.local_actors=true .*model.init=random"),
])
def test_config_errors_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"run_dir={tmp_path}", "algorithm=scalebio", *extra])


def test_draw_splits_each_subset_over_its_difficulty_buckets_by_the_learned_p_local(whole, tmp_path):
    assert draw_main(["--run", str(whole), "--total", "40", "--out", str(tmp_path / "d")]) == 0
    record = json.loads((tmp_path / "d" / "draw.json").read_text())
    schedule = json.loads((whole / "scalebio_weights.json").read_text())
    p, q = schedule["entries"][-1]["p_global"], schedule["entries"][-1]["p_local"]
    sizes = {s["name"]: s["bucket_sizes"] for s in json.loads(
        (Path(json.loads((whole / "summary.json").read_text())["prepared"]) / "manifest.json").read_text())["subsets"]}
    assert record["p_local_applied"] is True
    for i, name in enumerate(schedule["subsets"]):
        expected = split_by_buckets(math.floor(40 * p[i]), np.array(q[i]), np.array(sizes[name]))
        assert record["drawn_per_bucket"][name] == expected.tolist()
        assert len((tmp_path / "d" / f"{name}.train.jsonl").read_text().splitlines()) == expected.sum()


def test_each_input_row_maps_to_the_bucket_of_its_prepared_example(whole):
    # independently of the mapping: each row tokenized alone, looked up among the stored examples by its tokens
    cfg = load_config(whole / "config.yaml")
    data = prepare_lib.find_prepared(cfg)
    for i, subset in enumerate(prepare_lib.mixture(cfg)):
        rows = usable_rows(subset.train, subset.format)
        bucket = row_buckets(cfg, data, i, subset, len(rows))
        stored = {tuple(data.train[i][e][0].tolist()): int(b) for e, b in enumerate(data.buckets[i])}
        assert len(bucket) == len(rows) and (bucket >= 0).sum() == len(data.train[i])
        for row, b in zip(rows, bucket):
            ids, mask = tok_lib.encode(data.tokenizer, [to_conversation(row, subset.format)])[0]
            kept = tok_lib.truncate(ids, mask, cfg.data.seq_len + 1)
            assert stored.get(tuple(np.asarray(kept[0]).tolist()) if kept else None, -1) == b


def test_bucket_split_takes_largest_remainders_and_moves_a_full_buckets_excess_by_p_local():
    assert split_by_buckets(10, np.array([0.55, 0.45]), np.array([100, 100])).tolist() == [6, 4]
    assert split_by_buckets(10, np.array([0.2, 0.3, 0.5]), np.array([100, 1, 100])).tolist() == [3, 1, 6]
    assert split_by_buckets(10, np.array([1.0, 0.0]), np.array([4, 100])).tolist() == [4, 6]  # q = 0 takes the rest
    assert split_by_buckets(10, np.array([0.5, 0.5]), np.array([3, 2])).tolist() == [3, 2]  # all there is
