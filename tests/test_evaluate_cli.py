"""Evaluation inside a run and `python -m hbo_jax.evaluate` on the run afterwards."""

import json

import pytest

from hbo_jax import evaluate
from hbo_jax.train import main as train_main

from conftest import tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("evalrun") / "hbo"
    assert train_main(tiny_overrides(out, shared_cache, "train.steps=2", "eval.every=1")) == 0
    return out


def _eval(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def test_each_subset_gets_its_natural_metric(run_dir):
    after = _eval(run_dir)["after"]
    metrics = {name: r["metric"] for name, r in after.items() if name != "macro_avg"}
    assert metrics == {"chat": "none", "arithmetic": "exact_match", "hindi_qa": "exact_match",
                       "medical_sentiment": "mc", "proverbs_sw": "mc"}
    assert 0.0 <= after["medical_sentiment"]["acc"] <= 1.0 and after["proverbs_sw"]["examples"] == 4


def test_macro_average_is_the_mean_over_subsets(run_dir):
    after = _eval(run_dir)["after"]
    subsets = [r for n, r in after.items() if n != "macro_avg"]
    assert after["macro_avg"]["loss"] == pytest.approx(sum(r["loss"] for r in subsets) / len(subsets))
    mc = [r["acc"] for r in subsets if "acc" in r]
    assert after["macro_avg"]["acc"] == pytest.approx(sum(mc) / len(mc)) and after["macro_avg"]["acc_subsets"] == 2


def test_periodic_evaluation_is_logged_every_step(run_dir):
    rows = [json.loads(l) for l in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("macro_avg" in r["eval"] and "bucket_loss" in r["eval"]["chat"] for r in rows)


def test_examples_drawn_per_group_add_up_to_the_batches(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(sum(map(sum, r["drawn"])) == 8 == r["examples"] for r in rows)  # batch 8, logged every step
    assert all(len(r["drawn"]) == 5 and len(r["drawn"][0]) == 2 for r in rows)


@pytest.mark.parametrize("model,key", [("checkpoint", "after"), ("base", "before")])
def test_cli_reproduces_the_runs_own_evaluation(run_dir, tmp_path, model, key):
    out = tmp_path / f"{model}.json"
    assert evaluate.main([str(run_dir), "--model", model, "--out", str(out)]) == 0
    got, want = json.loads(out.read_text())["eval"], _eval(run_dir)[key]
    for name in want:
        assert got[name]["loss"] == pytest.approx(want[name]["loss"], rel=1e-6), name
        for metric in ("acc", "acc_norm", "exact_match"):
            assert got[name].get(metric) == want[name].get(metric), (name, metric)


def test_cli_evaluates_a_run_dir_that_a_run_holds(run_dir, tmp_path):
    from hbo_jax.runlock import RunLock

    with RunLock(run_dir):  # a training run on it: evaluation only reads, so it does not wait or fail
        assert evaluate.main([str(run_dir), "--no-tasks", "--out", str(tmp_path / "e.json")]) == 0


def test_cli_takes_overrides_after_a_config_file(run_dir, tmp_path):
    # no run directory: the first key=value is an override, not taken for one
    out = tmp_path / "e.json"
    argv = ["--config", str(run_dir / "config.yaml"), "--model", "base", "--no-tasks", "--out", str(out),
            "data.max_eval_per_subset=3"]
    assert evaluate.main(argv) == 0
    got = json.loads(out.read_text())["eval"]
    assert {v["examples"] for k, v in got.items() if k != "macro_avg"} == {3}


def test_cli_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_exported_hugging_face_directory_evaluates_like_the_checkpoint(run_dir, tmp_path):
    from hbo_jax.export import main as export_main

    hf_dir = tmp_path / "hf"
    assert export_main([str(run_dir), str(hf_dir)]) == 0
    out = tmp_path / "hf.json"
    assert evaluate.main([str(run_dir), "--model", f"hf:{hf_dir}", "--no-tasks", "--out", str(out)]) == 0
    got, want = json.loads(out.read_text())["eval"], _eval(run_dir)["after"]
    for name in want:
        assert got[name]["loss"] == pytest.approx(want[name]["loss"], rel=1e-5), name
