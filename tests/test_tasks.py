"""Task metric building blocks: answer normalisation, exact match, option choice, metric choice."""

import json

import numpy as np
import pytest

from hbo_jax import tasks


@pytest.mark.parametrize("a,b", [
    ("1035", "1,035"), ("35 %", "35%"), ("3.50", "3.5"), ("$12", "12"), ("100", "100.0"),
    ("[C]", "C"), ("(c)", "[C]"), ("Answer: B", "[b]"), ("C.", "[C]"),
    ("Positive.", "positive"), ("  The   good die young ", "the good die young"),
    ("ＡＢＣ", "abc"),  # NFKC folds full-width letters
])
def test_normalize_answer_equates_equivalent_answers(a, b):
    assert tasks.normalize_answer(a) == tasks.normalize_answer(b)


@pytest.mark.parametrize("a,b", [("35", "36"), ("[C]", "[D]"), ("positive", "negative"), ("1.5", "15"),
                                 ("35%", "35")])
def test_normalize_answer_keeps_different_answers_apart(a, b):
    assert tasks.normalize_answer(a) != tasks.normalize_answer(b)


def test_exact_match_compares_the_first_line_of_the_prediction():
    em = tasks.exact_match(["1,035\nbecause 741 + 294", "\n\n[B]", "36"], ["1035", "B", "35"])
    np.testing.assert_array_equal(em, [1.0, 1.0, 0.0])


def test_mc_choices_raw_and_length_normalised():
    # Option 1 has the higher total log-likelihood, option 0 the higher per character.
    raw, norm = tasks.mc_choices([np.array([-2.0, -1.5])], [["ab", "a"]])
    assert raw.tolist() == [1] and norm.tolist() == [0]
    raw, norm = tasks.mc_choices([np.array([-1.0, -3.0])], [["a", "aaaaaa"]])
    assert raw.tolist() == [0] and norm.tolist() == [1]


def _items(answers, options=None):
    return [tasks.EvalItem([{"role": "user", "content": "q"}], a, options) for a in answers]


def test_choose_metric_auto():
    assert tasks.choose_metric("auto", _items(["x", "y"], ["x", "y"]), 40) == "mc"
    assert tasks.choose_metric("auto", _items(["12", "7", "a long answer " * 10]), 40) == "exact_match"
    assert tasks.choose_metric("auto", _items(["a long answer " * 10] * 2), 40) == "none"
    assert tasks.choose_metric("exact_match", _items(["x"], ["x", "y"]), 40) == "exact_match"


def test_read_eval_items_keeps_prompt_answer_and_options(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": " B "}], "options": ["A", "B"]},
            {"instruction": "add", "input": "1+1", "output": "2"},
            {"bad": 1}]
    path = tmp_path / "x.eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = tasks.read_eval_items(path)
    assert len(items) == 2
    assert [m["role"] for m in items[0].prompt] == ["system", "user"]
    assert items[0].answer == "B" and items[0].options == ["A", "B"]
    assert items[1].answer == "2" and items[1].options is None
