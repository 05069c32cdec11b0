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


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("prompt,answer,options", [
    ("Q?\nA. red\nB. green\nC. blue\nAnswer:", "[B]", ["[A]", "[B]", "[C]"]),
    ("Q? (A) 21 (B) 22", "(b)", ["(a)", "(b)"]),
    ("Q? A) 21 B) 22 C) 23 D) 24", "D", ["A", "B", "C", "D"]),
])
def test_lettered_options_in_the_prompt_become_the_options(prompt, answer, options):
    assert tasks.lettered_options(_user(prompt), answer) == options


@pytest.mark.parametrize("prompt,answer", [
    ("I (a) think so", "A"),  # one letter is no list of options
    ("Q?\nA. red\nB. green", "C"),  # the answer is not among them
    ("Q?\nA. red\nB. green", "green"),  # the answer is not a letter
    ("Q?\nB. red\nC. green", "B"),  # not lettered from A
])
def test_other_rows_are_not_taken_for_multiple_choice(prompt, answer):
    assert tasks.lettered_options(_user(prompt), answer) is None


def test_mc_on_rows_without_options_says_why():
    res = tasks.score_mc(_items(["x", "y"]), None, 32, lambda encoded: None)
    assert res["examples"] == 0 and "none of its 2 eval rows is multiple choice" in res["unavailable"]


def test_letter_answers_without_options_tell_how_to_get_accuracy():
    note = tasks.letter_answers_note(_items(["A", "C", "B"]))
    assert note.startswith("3 of 3 answers are option letters") and "`options`" in note
    assert tasks.letter_answers_note(_items(["12", "7"])) is None


def test_base_rates_flag_a_model_that_gives_one_answer_to_everything():
    refs = ["A", "B", "A", "C"]
    rates = tasks.base_rates(["A"] * 4, refs, chance=0.25)
    assert rates == {"majority": 0.5, "pred_share": 1.0, "chance": 0.25}  # its score (0.5) is the majority rate


def test_base_rates_of_varied_answers():
    assert tasks.base_rates(["1", "2", "3", "3"], ["1", "2", "3", "4"]) == {"majority": 0.25, "pred_share": 0.5}
