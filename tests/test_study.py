"""The study command (benchmarks/study.py): arms x seeds, never rerunning finished work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402
import study_tables  # noqa: E402

TINY = ["data.vocab_size=384", "data.seq_len=32", "data.num_buckets=2", "data.max_eval_per_subset=4",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "scorer.warmup_steps=2", "scorer.batch_size=8", "scorer.score_batch_size=16",
        "train.batch_size=8", "train.steps=2", "train.log_every=1", "train.warmup_steps=1", "eval.every=0",
        "tracking.tensorboard=false"]


def _fake(arm: str, seed: int, after: dict[str, float], acc: float = 0.5) -> dict:
    before = {"a": {"loss": 2.0, "metric": "mc", "acc": 0.25, "chance": 0.25, "majority": 0.5, "pred_share": 1.0},
              "b": {"loss": 1.0}, "macro_avg": {"loss": 1.5, "acc": 0.25}}
    aft = {"a": {"loss": after["a"], "metric": "mc", "acc": acc, "pred_share": 0.5}, "b": {"loss": after["b"]},
           "macro_avg": {"loss": (after["a"] + after["b"]) / 2, "acc": acc}}
    return {"study": "t", "arm": arm, "seed": seed, "before": before, "after": aft,
            "seconds": {"train_loop_seconds": 10.0, "study_wall": 12.0},
            "mixing": {"step": [0, 10], "p_global": [[0.5, 0.5], [0.7, 0.3]] if arm == "hbo" else [[0.5, 0.5]] * 2,
                       "p_local": [None, None]}}


def _study_file(tmp_path: Path, arms: dict, seeds=(0, 1)) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "seeds": list(seeds), "arms": arms, "static_arms": ["uniform"]}))
    return path


def _write_results(results: Path, runs: dict) -> None:
    for (arm, seed), after in runs.items():
        (results / arm).mkdir(parents=True, exist_ok=True)
        (results / arm / f"seed{seed}.json").write_text(json.dumps(_fake(arm, seed, after)))


def test_relative_loss_reduction_weighs_every_subset_equally():
    m = study_tables.metrics(_fake("u", 0, {"a": 1.0, "b": 0.5}))
    assert m["rel_reduction"] == pytest.approx(0.5) and m["loss"] == pytest.approx(0.75)


def test_an_arm_ahead_on_every_seed_by_more_than_the_spread_beats_the_best_static():
    per_arm = {"uniform": {0: {"rel_reduction": 0.10}, 1: {"rel_reduction": 0.11}},
               "hbo": {0: {"rel_reduction": 0.15}, 1: {"rel_reduction": 0.17}}}
    _, verdicts = study_tables.paired_rows(per_arm, "uniform", set())
    assert verdicts["hbo"][2].startswith("**beats it**")


def test_an_arm_ahead_on_average_but_not_on_every_seed_is_within_the_spread():
    per_arm = {"uniform": {0: {"rel_reduction": 0.10}, 1: {"rel_reduction": 0.20}},
               "hbo": {0: {"rel_reduction": 0.09}, 1: {"rel_reduction": 0.40}}}
    _, verdicts = study_tables.paired_rows(per_arm, "uniform", set())
    assert verdicts["hbo"][2].startswith("within the seed spread (per seed: -0.0100, +0.2000)")


def test_the_per_subset_differences_are_paired_by_seed_and_a_merge_is_set_against_the_mean():
    table = {"uniform": {0: _fake("uniform", 0, {"a": 1.0, "b": 0.5}), 1: _fake("uniform", 1, {"a": 1.2, "b": 0.5})},
             "hbo": {1: _fake("hbo", 1, {"a": 1.0, "b": 0.6}), 2: _fake("hbo", 2, {"a": 0.2, "b": 0.2})},
             "merged": {0: _fake("merged", 0, {"a": 0.9, "b": 0.5})}}
    diffs = study_tables.paired_differences(table, "uniform", ["a", "b"], {"merged"})
    assert diffs["hbo"][0] == "paired seed 1"  # seed 2 has no uniform run to pair with
    assert diffs["hbo"][1] == [pytest.approx([0.1, -0.1, 0.0])]  # a: 0.5 - 0.4, b: 0.4 - 0.5, macro
    assert diffs["merged"][0].startswith("unpaired") and diffs["merged"][1] == [pytest.approx([0.1, 0.0, 0.05])]


def test_a_finished_arm_and_seed_is_not_run_again(tmp_path, monkeypatch):
    spec = _study_file(tmp_path, {"uniform": {}})
    results = tmp_path / "results"
    _write_results(results, {("uniform", 0): {"a": 1.5, "b": 0.9}, ("uniform", 1): {"a": 1.6, "b": 0.9}})
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a finished run was started again"))
    docs = tmp_path / "results.md"
    assert study.main(["--study", str(spec), "--results", str(results), "--runs", str(tmp_path / "runs"),
                       "--docs", str(docs)]) == 0
    assert "| uniform | 0,1 |" in docs.read_text()


def test_the_docs_section_is_rewritten_in_place_and_the_rest_kept(tmp_path):
    spec = _study_file(tmp_path, {"uniform": {}, "hbo": {}})
    results = tmp_path / "results"
    _write_results(results, {("uniform", 0): {"a": 1.5, "b": 0.9}, ("hbo", 0): {"a": 1.4, "b": 0.9}})
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nwritten by hand\n")
    args = ["--study", str(spec), "--results", str(results), "--docs", str(docs), "--report-only"]
    study.main(args)
    first = docs.read_text()
    study.main(args)
    assert docs.read_text() == first and first.startswith("# Results\n\nwritten by hand\n")
    assert first.count("<!-- study:t:begin -->") == 1 and (tmp_path / "study_t_p_global.png").is_file()
    assert "![study_t_paired](study_t_paired.png)" in first and (tmp_path / "study_t_paired.png").is_file()


def test_a_user_mixture_goes_after_the_study_configs_and_before_the_arm(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "arm.yaml").write_text("mixing: {strategy: uniform}\n")
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "configs": ["base.yaml"], "arms": {"u": {"configs": ["arm.yaml"]}}}))
    s = study.load_study(spec, [str(tmp_path / "mine.yaml")])
    cmd = study.train_command(s, s.arms[0], 1, tmp_path / "r")
    configs = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--config"]
    assert [Path(c).name for c in configs] == ["base.yaml", "mine.yaml", "arm.yaml"]
    assert cmd[-2:] == ["train.data_seed=1", f"run_dir={tmp_path / 'r'}"]


def test_a_study_on_a_user_mixture_trains_merges_and_then_reruns_without_training(tmp_path, monkeypatch,
                                                                                   shared_cache):
    mine = tmp_path / "mine.yaml"  # a user's mixture: a folder of subsets, tiny model
    mine.write_text(yaml.safe_dump({"data": {"source_dir": str(FIXTURE), "cache_dir": str(shared_cache)}}))
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "overrides": TINY, "seeds": [0, 1], "static_arms": ["uniform"],
                                    "arms": {"uniform": {"overrides": ["mixing.strategy=uniform"]},
                                             "merged": {"merge": {"of": "uniform", "replica_seeds": [0, 1]}}}}))
    results, docs = tmp_path / "results", tmp_path / "results.md"
    args = ["--study", str(spec), "--mixture", str(mine), "--results", str(results), "--runs",
            str(tmp_path / "runs"), "--docs", str(docs), "--seeds", "0", "1"]
    assert study.main(args) == 0
    got = sorted(p.relative_to(results).as_posix() for p in results.glob("*/*.json"))
    assert got == ["merged/seed0.json", "merged/seed1.json", "uniform/seed0.json", "uniform/seed1.json"]
    text = docs.read_text()
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a finished run was started again"))
    assert study.main(args) == 0 and docs.read_text() == text


def test_trained_arms_run_seed_major_and_an_average_merge_only_at_its_own_seed():
    s = study.Study("t", [], [], [0, 1], [study.Arm("a"), study.Arm("b"),
                                          study.Arm("avg", merge={"of": "a", "method": "average", "seeds": [0]})],
                    ["a"])
    assert study.run_order(s, ["a", "b", "avg"], None) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("avg", 0)]


def test_a_merge_is_set_against_the_mean_of_the_replicas_it_merged():
    s = study.Study("t", [], [], [0, 1], [study.Arm("uniform"), study.Arm(
        "merged", merge={"of": "uniform", "replica_seeds": [0, 1], "method": "average"})], ["uniform"])
    per_arm = {"uniform": {0: study_tables.metrics(_fake("uniform", 0, {"a": 1.0, "b": 0.5})),  # rel. 0.5
                           1: study_tables.metrics(_fake("uniform", 1, {"a": 1.0, "b": 0.7}))},  # rel. 0.4
               "merged": {0: study_tables.metrics(_fake("merged", 0, {"a": 0.8, "b": 0.5}))}}  # rel. 0.55
    row = study_tables.merge_rows(s, per_arm)[-1].split(" | ")
    assert row[1] == "average" and row[4] == "0.5000" and row[6] == "+0.1000"


def test_a_merge_above_every_seed_of_the_best_static_arm_is_called_so_and_not_a_win_over_seeds():
    per_arm = {"uniform": {0: {"rel_reduction": 0.10}, 1: {"rel_reduction": 0.11}},
               "merged_uniform": {0: {"rel_reduction": 0.15}}}
    _, verdicts = study_tables.paired_rows(per_arm, "uniform", {"merged_uniform"})
    assert verdicts["merged_uniform"][2] == ("above every seed of uniform by more than the seed spread "
                                             "(one set of replicas, unpaired)")


def test_a_merge_inside_the_best_static_arms_seeds_is_within_the_spread():
    per_arm = {"uniform": {0: {"rel_reduction": 0.10}, 1: {"rel_reduction": 0.20}},
               "merged_uniform": {0: {"rel_reduction": 0.16}, 1: {"rel_reduction": 0.21}}}
    _, verdicts = study_tables.paired_rows(per_arm, "uniform", {"merged_uniform"})
    assert verdicts["merged_uniform"][2] == "within the seed spread (unpaired)"


def test_a_static_arm_with_one_seed_is_not_the_best_while_another_has_two():
    table = {"uniform": {0: {"rel_reduction": 0.50}, 1: {"rel_reduction": 0.52}},
             "temperature": {0: {"rel_reduction": 0.53}}}
    assert study_tables.best_static(table, ["uniform", "temperature"]) == "uniform"
    table["temperature"][1] = {"rel_reduction": 0.52}
    assert study_tables.best_static(table, ["uniform", "temperature"]) == "temperature"


def test_the_best_static_arm_is_judged_on_the_seeds_the_candidates_share():
    # uniform's third seed is low; on seeds 0 and 1, which both arms ran, uniform is ahead
    table = {"uniform": {0: {"rel_reduction": 0.513}, 1: {"rel_reduction": 0.515}, 2: {"rel_reduction": 0.508}},
             "temperature": {0: {"rel_reduction": 0.515}, 1: {"rel_reduction": 0.511}}}
    assert study_tables.best_static(table, ["uniform", "temperature"]) == "uniform"


def test_the_time_per_run_leaves_out_the_one_off_data_preparation():
    # the first run on a machine prepares the data (here 1,000 s); its arm is not the slower for it
    runs = {0: {"seconds": {"train_loop_seconds": 600.0, "wall_seconds": 1000.0, "prepare_seconds": 2.0}},
            1: {"seconds": {"train_loop_seconds": 600.0, "wall_seconds": 2000.0, "prepare_seconds": 1000.0}}}
    rows = study_tables.time_rows({"hbo": runs})
    assert rows[2] == "| hbo | 600 | 999 |"
    assert "hbo seed 1: 1000 s" in rows[-1]
