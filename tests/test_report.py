"""Reports: figures + report.md for one run, seed-grouped comparison for several."""

import json
import math
import re

import numpy as np
import pytest
import yaml

from hbo_jax.report import FIGURES, main, write_report

from conftest import tiny_overrides

NAMES = ["chat", "math", "qa"]
K = 2


def write_run(run_dir, strategy="hbo", seed=0, losses=(2.0, 1.0, 3.0), rewards=True, new_logs=True, lr=1e-3):
    """A synthetic run directory in the train.py log schema (new_logs: drawn + eval.jsonl)."""
    run_dir.mkdir(parents=True)
    cfg = {"run_dir": str(run_dir), "mixing": {"strategy": strategy, "global_every": 5},
           "train": {"steps": 20, "seed": seed, "learning_rate": lr},
           "data": {"num_buckets": K, "max_eval_per_subset": 4}, "eval": {"periodic_max_per_subset": 2}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    d = len(NAMES)
    pg0, pl0 = [1 / d] * d, [[1 / K] * K] * d
    (run_dir / "probabilities_start.json").write_text(json.dumps({"step": 0, "p_global": pg0, "p_local": pl0}))
    with open(run_dir / "mixing.jsonl", "w") as f:
        for s in (5, 10, 15):
            rec = {"step": s, "from_step": s, "p_global": [0.2, 0.3, 0.5], "p_local": [[0.4, 0.6]] * d, "seconds": 0.1}
            if rewards:
                rec.update(reward_global=[1.0, s / 10, 0.5], reward_local=[[0.1, -0.1]] * d)
            f.write(json.dumps(rec) + "\n")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in (10, 20):
            rec = {"step": s, "loss": 2.0, "mixing_share": 0.1, **{f"loss/{n}": 1.5 for n in NAMES}}
            if new_logs:
                rec["drawn"] = [[s, 2 * s]] * d
            f.write(json.dumps(rec) + "\n")

    def ev(scale):
        e = {n: {"loss": scale * l, "ppl": math.exp(scale * l), "examples": 4, "bucket_loss": [l, l]}
             for n, l in zip(NAMES, losses)}
        e["math"].update(acc=0.25 * scale, metric="mc")
        e["qa"].update(exact_match=0.5 * scale, metric="exact_match")
        e["chat"]["metric"] = "none"
        e["macro_avg"] = {"loss": float(np.mean([v["loss"] for n, v in e.items()])), "ppl": 1.0,
                          "acc": 0.25 * scale, "exact_match": 0.5 * scale}
        return e
    if new_logs:
        with open(run_dir / "eval.jsonl", "w") as f:
            for s, scale in ((0, 1.0), (10, 0.9), (20, 0.8)):
                f.write(json.dumps({"step": s, "eval": ev(scale)}) + "\n")
    (run_dir / "eval.json").write_text(json.dumps({"before": ev(1.0), "after": ev(0.8)}))
    (run_dir / "summary.json").write_text(json.dumps({"strategy": strategy, "steps": 20, "subsets": NAMES,
                                                      "mixing_share": 0.1, "mixing_seconds": 1.0,
                                                      "train_loop_seconds": 10.0 + seed, "prepare_seconds": 30.0,
                                                      "wall_seconds": 45.0 + seed}))
    return run_dir


def md_table(text: str, first_header: str) -> list[dict]:
    """The markdown table whose header starts with `| first_header |`, as a list of row dicts."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.fixture(scope="module")
def hbo_report(tmp_path_factory):
    run_dir = write_run(tmp_path_factory.mktemp("runs") / "hbo")
    return run_dir, write_report(run_dir)


@pytest.mark.parametrize("name", [f"{f}.png" for f in FIGURES] + ["report.md"])
def test_single_run_writes_every_file(hbo_report, name):
    run_dir, _ = hbo_report
    assert (run_dir / "report" / name).stat().st_size > 0


def test_report_table_equals_eval_json(hbo_report):
    run_dir, _ = hbo_report
    ev = json.loads((run_dir / "eval.json").read_text())
    rows = md_table((run_dir / "report" / "report.md").read_text(), "subset")
    assert [r["subset"] for r in rows] == [*NAMES, "macro_avg"]
    for row in rows:
        for col, cell in row.items():
            m = re.fullmatch(r"(loss|ppl|acc|acc_norm|exact_match) (before|after)", col)
            if m:
                want = ev[m.group(2)][row["subset"]].get(m.group(1))
                assert (cell == "—") if want is None else float(cell) == pytest.approx(want, abs=5e-5), (row, col)
        assert row["metric"] == ev["after"][row["subset"]].get("metric", row["metric"])


def test_fixed_schedule_skips_rewards_and_says_so(tmp_path):
    run_dir = write_run(tmp_path / "uniform", strategy="uniform", rewards=False)
    result = write_report(run_dir)
    assert "rewards" in result["skipped"] and not (run_dir / "report" / "rewards.png").exists()
    assert "rewards.png skipped" in (run_dir / "report" / "report.md").read_text()


def test_older_run_without_new_logs_still_reports(tmp_path):
    run_dir = write_run(tmp_path / "old", new_logs=False)
    (run_dir / "summary.json").unlink()
    result = write_report(run_dir)
    assert set(result["skipped"]) == {"drawn"}
    assert (run_dir / "report" / "eval.png").is_file()


def test_compare_groups_seeds_with_numpy_mean_std_and_n(tmp_path):
    rng = np.random.default_rng(0)
    want, dirs = {}, []
    for lr, n in ((1e-3, 3), (3e-3, 2)):
        losses = rng.uniform(1, 3, (n, len(NAMES)))
        for seed in range(n):
            dirs.append(str(write_run(tmp_path / f"lr{lr}_s{seed}", seed=seed, lr=lr, losses=losses[seed])))
        after = losses * 0.8
        want[f"learning_rate={lr}"] = (n, after, after.mean(1))
    assert main([*dirs, "--out", str(tmp_path / "cmp")]) == 0
    rows = md_table((tmp_path / "cmp" / "compare.md").read_text(), "group")
    assert [r["group"] for r in rows] == list(want)
    for row in rows:
        n, after, macro = want[row["group"]]
        assert int(row["n"]) == n
        for col, vals in [*zip(NAMES, after.T), ("macro", macro)]:
            mean, std = (float(x) for x in row[col].split("±"))
            assert mean == pytest.approx(vals.mean(), abs=5e-5) and std == pytest.approx(vals.std(ddof=1), abs=5e-5)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_not_a_run_dir_exits_2_naming_the_path(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_real_tiny_run_report(tmp_path, shared_cache):
    from hbo_jax.config import load_config
    from hbo_jax.train import run

    run_dir = tmp_path / "real"
    run(load_config(None, tiny_overrides(run_dir, shared_cache, "train.steps=3")))
    result = write_report(run_dir)
    for fig in ("p_global", "p_local", "rewards", "eval"):
        assert fig in result["figures"], result["skipped"]
    rows = md_table((run_dir / "report" / "report.md").read_text(), "subset")
    after = json.loads((run_dir / "eval.json").read_text())["after"]
    assert {r["subset"] for r in rows} == set(after)


def test_bookkeeping_keys_do_not_split_a_group(tmp_path):
    from hbo_jax.compare import group_runs
    from hbo_jax.run_files import load_run

    runs = []
    for seed, extra in ((0, {"eval": {"every": 50}, "train": {"log_every": 5}}),
                        (1, {"eval": {"every": 100}, "tracking": {"tensorboard": False}}),
                        (2, {"mixing": {"strategy": "uniform"}})):
        run_dir = write_run(tmp_path / f"s{seed}", seed=seed)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        for section, values in extra.items():
            cfg.setdefault(section, {}).update(values)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        runs.append(load_run(run_dir))
    assert [[r.path.name for r in g] for g in group_runs(runs)] == [["s0", "s1"], ["s2"]]


def _replica(tmp_path, name, seed, data_seed, lr=1e-3):
    run_dir = write_run(tmp_path / name, seed=seed, lr=lr)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["train"]["data_seed"] = data_seed
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def test_seed_and_data_seed_replicas_form_one_group(tmp_path):
    from hbo_jax.compare import group_runs
    from hbo_jax.run_files import load_run

    runs = [load_run(_replica(tmp_path, n, s, d, lr)) for n, s, d, lr in
            (("d0", 0, 0, 1e-3), ("d1", 0, 1, 1e-3), ("s1", 1, -1, 1e-3), ("lr", 0, 2, 3e-3))]
    assert [[r.path.name for r in g] for g in group_runs(runs)] == [["d0", "d1", "s1"], ["lr"]]


def test_compare_names_each_runs_seed_and_data_seed(tmp_path):
    from hbo_jax.compare import compare
    from hbo_jax.run_files import load_run

    runs = [load_run(_replica(tmp_path, n, s, d)) for n, s, d in (("d0", 0, 0), ("d1", 0, 1), ("s1", 1, -1))]
    compare(runs, tmp_path / "cmp", "loss")  # without each run's own report: seconds
    rows = md_table((tmp_path / "cmp" / "compare.md").read_text(), "group")
    assert [r["seeds"] for r in rows] == ["0/0,0/1,1"]


def _mixing_run(tmp_path, name, seed, **mixing):
    run_dir = write_run(tmp_path / name, seed=seed, strategy=mixing.get("strategy", "hbo"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["mixing"].update(mixing)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """hbo x2 seeds, uniform x2 (one with the key it never reads, one with its raw defaults),
    hbo with the global reward from training batches; compared as `report` does with no
    --metric (`compare` alone: the runs' own reports are tested above)."""
    from hbo_jax.compare import compare
    from hbo_jax.run_files import load_run

    tmp = tmp_path_factory.mktemp("cmp")
    dirs = [_mixing_run(tmp, "hbo0", 0), _mixing_run(tmp, "hbo1", 1),
            _mixing_run(tmp, "uni0", 0, strategy="uniform", ema=0.5),
            _mixing_run(tmp, "uni1", 1, strategy="uniform", temperature=0.0, global_source="probes"),
            _mixing_run(tmp, "hbo_tr", 0, global_source="train")]
    compare([load_run(d) for d in dirs], tmp / "out")
    return tmp / "out"


def test_settings_a_strategy_never_reads_do_not_split_its_group(comparison):
    groups = json.loads((comparison / "compare.json").read_text())["groups"]
    assert [[p.rsplit("/", 1)[-1] for p in g["runs"]] for g in groups] == [["hbo0", "hbo1"], ["uni0", "uni1"],
                                                                          ["hbo_tr"]]


def test_labels_name_only_the_keys_that_differ_and_matter(comparison):
    groups = json.loads((comparison / "compare.json").read_text())["groups"]
    assert [g["label"] for g in groups] == ["hbo, global_reward=gradnorm, global_source=probes", "uniform",
                                            "hbo, global_reward=gradnorm_per_example, global_source=train"]


def test_strategy_defaults_are_not_named_but_a_changed_one_is(tmp_path):
    from hbo_jax.compare import group_labels, group_runs
    from hbo_jax.run_files import load_run

    def labels(*runs):
        return group_labels(group_runs([load_run(_mixing_run(tmp_path / str(len(list(tmp_path.iterdir()))),
                                                             "r", 0, **m)) for m in runs]))
    assert labels({}, {"strategy": "temperature"}) == ["hbo", "temperature"]  # T=1 and T=10: their defaults
    assert labels({"temperature": 2.0}, {"strategy": "temperature"}) == ["hbo, temperature=2.0",
                                                                         "temperature, temperature=10.0"]


def test_one_report_call_compares_the_loss_and_each_task_metric(comparison):
    result = json.loads((comparison / "compare.json").read_text())
    assert result["metrics"] == ["loss", "acc", "exact_match"]
    text = (comparison / "compare.md").read_text()
    assert all(f"## {m} after training" in text for m in result["metrics"])
    assert result["groups"][0]["stats"]["acc"]["math"]["mean"] == pytest.approx(0.25 * 0.8)
    assert "math" not in result["groups"][0]["stats"]["exact_match"]  # a subset without the metric


def test_comparison_times_the_training_loop_apart_from_preparation(comparison):
    rows = md_table((comparison / "compare.md").read_text(), "group")  # the first table: loss
    assert [r["group"] for r in rows][0].startswith("hbo")
    lines = (comparison / "compare.md").read_text().splitlines()
    time_rows = md_table("\n".join(lines[lines.index("## Time"):]), "group")
    assert time_rows[0]["training loop s"] == "10.5000 ± 0.7071"  # seeds 0 and 1: 10 s and 11 s
    assert time_rows[0]["data preparation s"] == "30.0000 ± 0.0000"


def test_comparison_says_which_eval_set_tables_and_curves_use(comparison):
    text = (comparison / "compare.md").read_text()
    assert "full eval set (eval.json; at most data.max_eval_per_subset = 4 rows per subset)" in text
    assert "periodic eval set (eval.jsonl; at most eval.periodic_max_per_subset = 2 rows per subset)" in text


def _figures(monkeypatch):
    from hbo_jax import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figs.append(fig) or out)
    return plots, figs


def test_eval_png_titles_name_each_panels_eval_set(hbo_report, monkeypatch):
    from hbo_jax.run_files import load_run

    plots, figs = _figures(monkeypatch)
    plots.plot_eval(load_run(hbo_report[0]), hbo_report[0] / "x.png")
    curves, bars = (ax.get_title() for ax in figs[0].axes[:2])
    assert "periodic eval set\nat most 2 per subset (eval.periodic_max_per_subset)" in curves
    assert "full eval set\nat most 4 per subset (data.max_eval_per_subset)" in bars


def test_compare_png_titles_name_each_eval_set(comparison, monkeypatch):
    plots, figs = _figures(monkeypatch)
    result = json.loads((comparison / "compare.json").read_text())
    plots.plot_compare(result["groups"], result["subsets"], result["metrics"], comparison / "x.png",
                       eval_sets=("A", "B"))
    titles = [ax.get_title() for ax in figs[0].axes]
    assert all("full eval set (eval.json); A" in t for t in titles[:-1])
    assert "periodic eval set (eval.jsonl); B" in titles[-1]


def test_run_report_says_which_eval_set_the_table_uses(hbo_report):
    text = (hbo_report[0] / "report" / "report.md").read_text()
    assert "On the full eval set, at most 4 per subset (data.max_eval_per_subset)." in text
    assert "eval.png use the periodic eval set, at most 2 per subset (eval.periodic_max_per_subset)" in text


def test_run_report_gives_loop_and_preparation_time_apart(hbo_report):
    text = (hbo_report[0] / "report" / "report.md").read_text()
    assert all(line in text for line in ("- **training loop**: 10.0s", "- **data preparation**: 30.0s",
                                         "- **wall time**: 45.0s"))


def test_local_heatmap_scale_is_centred_on_uniform_and_spans_the_data(hbo_report, monkeypatch):
    from hbo_jax.run_files import load_run

    plots, figs = _figures(monkeypatch)
    plots.plot_p_local(load_run(hbo_report[0]), hbo_report[0] / "x.png")
    norm = figs[0].axes[0].collections[0].norm
    assert float(norm(1 / K)) == pytest.approx(0.5)  # the logged p_local: 0.5 (uniform), then 0.4 / 0.6
    assert float(norm(0.4)) == pytest.approx(0.0) and float(norm(0.6)) == pytest.approx(1.0)


def test_each_algorithm_is_grouped_by_its_own_section_only(tmp_path):
    from hbo_jax.compare import group_runs
    from hbo_jax.run_files import load_run

    def run(name, seed, algorithm, section, values):
        run_dir = write_run(tmp_path / name, seed=seed)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        cfg["algorithm"] = algorithm
        cfg.setdefault(section, {}).update(values)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        return load_run(run_dir)

    runs = [run("sb0", 0, "scalebio", "mixing", {"strategy": "uniform"}),  # mixing.* unread by ScaleBiO
            run("sb1", 1, "scalebio", "mixing", {"strategy": "hbo"}),
            run("sb_a", 0, "scalebio", "scalebio", {"alpha": 10.0}),
            run("hbo0", 0, "sampling", "scalebio", {"alpha": 10.0}),  # scalebio.* unread by sampling
            run("hbo1", 1, "sampling", "scalebio", {"alpha": 1.0})]
    assert [[r.path.name for r in g] for g in group_runs(runs)] == [["sb0", "sb1"], ["sb_a"], ["hbo0", "hbo1"]]


def test_scalebio_runs_with_local_actors_are_also_grouped_by_the_mixing_keys_the_actors_read(tmp_path):
    from hbo_jax.compare import group_runs
    from hbo_jax.run_files import load_run

    def run(name, seed, mixing):
        run_dir = write_run(tmp_path / name, seed=seed)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        cfg.update(algorithm="scalebio", scalebio={"local_actors": True})
        cfg.setdefault("mixing", {}).update(mixing)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        return load_run(run_dir)

    runs = [run("a0", 0, {"actor_lr": 0.1, "strategy": "uniform"}), run("a1", 1, {"actor_lr": 0.1, "strategy": "hbo"}),
            run("b0", 0, {"actor_lr": 0.2})]
    assert [[r.path.name for r in g] for g in group_runs(runs)] == [["a0", "a1"], ["b0"]]
