"""Task metrics per subset: multiple-choice accuracy and exact match.

Each eval row is a conversation whose last assistant turn is the reference answer; a
row may also carry `options` (the answer choices, the reference among them). A row
without them whose prompt lists lettered options (`A. ...` / `(B) ...` lines, or inline
`A) ... B) ...`) and whose answer is one of those letters is multiple choice too: its
options are the letters, written as the answer writes its letter (`[C]` -> `[A]`, `[B]`, ...).

  mc           log-likelihood of each option as the assistant's answer (the option's
               tokens and the end-of-turn marker); `acc` takes the most likely option,
               `acc_norm` divides by the option's length in characters first (the
               lm-evaluation-harness conventions).
  exact_match  greedy decoding through the KV cache; the first line of the answer and
               the reference are compared after `normalize_answer`.
  none         held-out loss only (long free-form answers such as summaries or chat).

`auto` (the default) picks mc when the subset's rows carry options, exact match when
its median reference is short (`eval.exact_match_max_chars`), none otherwise.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hbo_jax.data import tokenizer as tok_lib
from hbo_jax.data.formats import BadRow, iter_rows, to_conversation

_LETTER = re.compile(r"^(?:answer\s*[:：]?\s*)?[\[(]?\s*([A-J])\s*[\])]?[.:)]?$", re.IGNORECASE)
# A lettered option in a prompt: at a line start `A.`, `A)`, `(A)`, `[A]`, `A:`; inline only `A)`, `(A)`, `[A]`.
_LINE_OPTION = re.compile(r"^\s*[\[(]?([A-J])[\]).:]\s*\S", re.MULTILINE)
_INLINE_OPTION = re.compile(r"(?:^|\s)[\[(]?([A-J])[\])]\s*\S")
_NUMBER = re.compile(r"^[-+]?[$€£¥]?\s*[-+]?\d[\d,]*(?:\.\d+)?\s*%?$|^[-+]?\.\d+\s*%?$")


@dataclass
class EvalItem:
    """One eval row: the prompt turns, the reference answer and (for mc) its options."""

    prompt: list[dict]
    answer: str
    options: list[str] | None = None
    lettered: bool = False  # the options are letters found in the prompt (`lettered_options`)


def lettered_options(prompt: list[dict], answer: str) -> list[str] | None:
    """The letters a plain-chat multiple-choice row offers, written as its answer writes one; else None.

    The last prompt turn must list options lettered A, B, ... in order (two or more) and
    the answer must be one of those letters (`normalize_answer`'s letter forms). Other
    rows (a lone "(a)" in a sentence, an answer that is not a letter) give None.
    """
    gold = _LETTER.match(answer.strip())
    if not prompt or not gold:
        return None
    text = prompt[-1].get("content", "")
    for pattern in (_LINE_OPTION, _INLINE_OPTION):
        letters = [m.group(1).upper() for m in pattern.finditer(text)]
        n = 0
        while n < len(letters) and letters[n] == "ABCDEFGHIJ"[n]:
            n += 1
        if n >= 2 and gold.group(1).upper() in "ABCDEFGHIJ"[:n]:
            a, b = gold.span(1)
            ans = answer.strip()
            case = str.lower if ans[a:b].islower() else str.upper
            return [ans[:a] + case(c) + ans[b:] for c in "ABCDEFGHIJ"[:n]]
    return None


def read_eval_items(path, fmt: str = "auto") -> list[EvalItem]:
    """Eval rows of a subset's eval input(s): a path or spec (any input kind), or a list of them.

    Rows the data pipeline skips are skipped here too; `fmt` forces the row format as
    `data.subsets.<name>.format` does.
    """
    items = []
    for spec in ([path] if isinstance(path, (str, Path)) else path):
        for _, row in iter_rows(spec):
            if isinstance(row, BadRow):
                continue  # counted and reported when the mixture was prepared
            try:
                conv = to_conversation(row, fmt)
            except ValueError:
                continue
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            options, answer = row.get("options"), conv[last]["content"].strip()
            if not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
                options = None
            lettered = options is None and (options := lettered_options(conv[:last], answer)) is not None
            items.append(EvalItem(conv[:last], answer, options, lettered))
    return items


def choose_metric(requested: str, items: Sequence[EvalItem], max_chars: int) -> str:
    """Resolves `auto` for a subset from its rows; other choices pass through."""
    if requested != "auto":
        return requested
    if items and sum(it.options is not None for it in items) >= len(items) / 2:
        return "mc"
    if items and float(np.median([len(it.answer) for it in items])) <= max_chars:
        return "exact_match"
    return "none"


def normalize_answer(text: str) -> str:
    """Canonical form for exact match.

    Option letters (`[C]`, `(c)`, `C.`, `Answer: C`) become `[c]`; numbers lose
    thousands separators, currency signs, spacing before `%` and trailing zeros
    (`1,035.50 $` is not a number, `$1,035.50` is `1035.5`); other text is NFKC-folded,
    lower-cased, stripped of punctuation and of repeated whitespace.
    """
    text = unicodedata.normalize("NFKC", text).strip()
    letter = _LETTER.match(text)
    if letter:
        return f"[{letter.group(1).lower()}]"
    if _NUMBER.match(text):
        pct = text.endswith("%")
        digits = re.sub(r"[$€£¥,%\s]", "", text)
        try:
            value = Decimal(digits).normalize()
            canon = format(value, "f")
            if "." in canon:
                canon = canon.rstrip("0").rstrip(".")
            return canon + ("%" if pct else "")
        except InvalidOperation:
            pass
    text = "".join(c for c in text.casefold() if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def first_answer_line(text: str) -> str:
    """The part of a generated answer that is compared: its first non-empty line."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """1.0 where the normalised first line of the prediction equals the normalised reference."""
    return np.array([float(normalize_answer(first_answer_line(p)) == normalize_answer(r))
                     for p, r in zip(predictions, references)])


def mc_choices(option_logprobs: Sequence[np.ndarray], options: Sequence[Sequence[str]]):
    """(argmax index, length-normalised argmax index) per row of option log-likelihoods."""
    raw = np.array([int(np.argmax(lp)) for lp in option_logprobs])
    norm = np.array([int(np.argmax(np.asarray(lp) / np.array([max(len(o), 1) for o in opts])))
                     for lp, opts in zip(option_logprobs, options)])
    return raw, norm


def eos_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn for this tokenizer."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def encode_options(rows: Sequence[EvalItem], tokenizer, seq_len: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per row, each option as the assistant's answer, encoded as training encodes a conversation
    ((ids, loss mask)) and cut to seq_len + 1 tokens (the prompt from the left, as in training)."""
    convs = [it.prompt + [{"role": "assistant", "content": o}] for it in rows for o in it.options]
    encoded = []
    for ids, mask in tok_lib.encode(tokenizer, convs):
        kept = tok_lib.truncate(ids, mask, seq_len + 1)
        encoded.append(kept if kept is not None else (ids[-(seq_len + 1):], mask[-(seq_len + 1):]))
    bounds = np.cumsum([0] + [len(it.options) for it in rows])
    return [encoded[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def score_mc(items: Sequence[EvalItem], tokenizer, seq_len: int,
             option_logprob: Callable[[list], list[np.ndarray]]) -> dict[str, float]:
    """Multiple-choice accuracy of a model on the rows whose reference is one of their options.

    Args:
        items: Eval rows; rows without options, or whose reference is not an option, are not scored.
        tokenizer: Tokenizer with the chat template the model was trained with.
        seq_len: Sequence length (prompts are cut from the left to fit, as in training).
        option_logprob: Maps a list of rows, each the list of its options' (ids, loss mask)
            pairs, to each row's array of its options' summed log-probabilities of their
            masked tokens (`evaluate.make_logprob_fn`).
    """
    rows = [it for it in items if it.options and it.answer in it.options]
    if not rows:
        return {"metric": "mc", "examples": 0, "unavailable": (
            f"none of its {len(items)} eval rows is multiple choice: a row needs `options` (a list holding its "
            "answer), or options lettered A., B., ... in its prompt and a letter as its answer")}
    per_row = option_logprob(encode_options(rows, tokenizer, seq_len))
    raw, norm = mc_choices(per_row, [it.options for it in rows])
    gold = np.array([it.options.index(it.answer) for it in rows])
    return {"metric": "mc", "acc": float((raw == gold).mean()), "acc_norm": float((norm == gold).mean()),
            "examples": len(rows), **base_rates([it.options[i] for it, i in zip(rows, raw)],
                                                 [it.answer for it in rows],
                                                 chance=float(np.mean([1 / len(it.options) for it in rows])))}


def base_rates(predictions: Sequence[str], references: Sequence[str], chance: float | None = None) -> dict:
    """What a score means: the scores of answers that know nothing, and how varied the model's are.

    `majority`: the score of always giving the most common reference (for multiple choice,
    always picking the most common option); `chance`: of picking an option uniformly at
    random; `pred_share`: the share of rows given the model's most common answer (1.0: the
    same answer to every question, so its score is a base rate, not knowledge).
    """
    def top_share(xs):
        return max(xs.count(x) for x in set(xs)) / len(xs) if xs else 0.0
    out = {"majority": top_share(list(references)), "pred_share": top_share(list(predictions))}
    return out if chance is None else {**out, "chance": chance}


def generation_prompts(items: Sequence[EvalItem], tokenizer, max_len: int) -> list[list[int]]:
    """Chat-templated prompt ids ending with the assistant header, cut from the left to max_len."""
    texts = [tokenizer.apply_chat_template(it.prompt, tokenize=False, add_generation_prompt=True)
             for it in items]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(x[-max_len:]) for x in ids]


def letter_answers_note(items: Sequence[EvalItem]) -> str | None:
    """Why exact match misleads on letter answers whose options were not found, and what gives accuracy; else None."""
    letters = [it for it in items if it.options is None and _LETTER.match(it.answer)]
    if not items or len(letters) < len(items) / 2:
        return None
    return (f"{len(letters)} of {len(items)} answers are option letters but their prompts list no options lettered "
            "A., B., ... (one per line) and the rows carry no `options`, so exact match only counts how often the "
            "model's letter is right; give the rows `options` (or lettered option lines) for accuracy by "
            "option log-likelihood")


def score_exact_match(items: Sequence[EvalItem], tokenizer, generate_fn: Callable[[list], list],
                      max_prompt_len: int) -> dict:
    """Exact match of greedy answers; `generate_fn` maps prompt id lists to answer id lists."""
    if not items:
        return {"metric": "exact_match", "examples": 0, "unavailable": "the subset has no eval rows"}
    answers = generate_fn(generation_prompts(items, tokenizer, max_prompt_len))
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    em = exact_match(texts, [it.answer for it in items])
    samples = [{"reference": it.answer, "prediction": t} for it, t in list(zip(items, texts))[:3]]
    return {"metric": "exact_match", "exact_match": float(em.mean()), "examples": len(items),
            "samples": samples, **base_rates([normalize_answer(first_answer_line(t)) for t in texts],
                                             [normalize_answer(it.answer) for it in items])}
