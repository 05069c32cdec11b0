"""The embedded default mixture: real multitask, multilingual data from PyPI packages.

Sources are BIG-bench task files (the `bigbench` sdist) and OpenAI evals registry data
(the `evals` wheel): two archives pinned by SHA-256, fetched from the user's package
index into the cache (`hbo_jax.data.fetch`; no package code is built or run) and read
straight from the archives.
Each subset becomes chat conversations in `<subset>.train.jsonl` / `<subset>.eval.jsonl`
(OpenAI `messages` format), split deterministically by a hash of the prompt. The build
is keyed by `RECIPE_VERSION` and the recipe table: it reruns only when they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hbo_jax.data.atomic import private_tmp, publish
from hbo_jax.data.fetch import BIGBENCH_SDIST, EVALS_WHEEL, fetch

log = logging.getLogger(__name__)

RECIPE_VERSION = "2"  # 2: multiple-choice rows carry `options`
# The exact files read are pinned in hbo_jax.data.fetch (BIGBENCH_SDIST, EVALS_WHEEL).
BIGBENCH = "bigbench==1.0.0"
EVALS = "evals==3.0.1.post1"
EVAL_FRACTION_MOD = 10  # 1 in 10 prompts (by hash) is held out
MAX_EVAL = 200
MAX_PROMPT_CHARS = 2000

Record = dict  # {"messages": [...], "lang": str, optional "options": [str, ...]}


@dataclass(frozen=True)
class Subset:
    name: str
    source: str  # "bigbench" | "evals"
    members: tuple[str, ...]  # task directories (bigbench) or registry data dirs (evals)
    convert: str  # name of the converter below
    max_train: int
    langs: str
    license: str


def _bb_answer(ex: dict) -> str | None:
    if "target" in ex:
        t = ex["target"]
        return t[0] if isinstance(t, list) else t
    scores = ex.get("target_scores") or {}
    return max(scores, key=scores.get) if scores else None


def _with_options(rec: Record, ex: dict) -> Record:
    """Adds the task's answer options (BIG-bench `target_scores`) for multiple-choice scoring."""
    rec["options"] = [o.strip() for o in ex["target_scores"]]
    return rec


def _conv_plain(task: dict, ex: dict, member: str) -> Record | None:
    """BIG-bench task with the instruction in the task prefix (if any)."""
    ans = _bb_answer(ex)
    if ans is None:
        return None
    prefix = (task.get("task_prefix") or "").strip()
    prompt = f"{prefix}\n\n{ex['input'].strip()}" if prefix else ex["input"].strip()
    return {"messages": [{"role": "user", "content": prompt[-MAX_PROMPT_CHARS:]},
                         {"role": "assistant", "content": ans.strip()}]}


def _conv_chat(task: dict, ex: dict, member: str) -> Record | None:
    prompt = "Continue this conversation as agent_B.\n\n" + ex["input"].strip()
    return {"messages": [{"role": "user", "content": prompt[-MAX_PROMPT_CHARS:]},
                         {"role": "assistant", "content": ex["target"].strip().strip('"')}]}


def _conv_math_word(task: dict, ex: dict, member: str) -> Record | None:
    ans = _bb_answer(ex)
    prompt = "What is the answer to the following math word problem?\n" + ex["input"].strip()
    return _with_options({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": ans.strip()}]}, ex) if ans else None


def _conv_sentiment(task: dict, ex: dict, member: str) -> Record | None:
    ans = _bb_answer(ex)
    options = ", ".join(ex["target_scores"])
    prompt = f"{task['task_prefix'].strip()} Options: {options}.\n\n{ex['input'].strip()}"
    rec = {"messages": [{"role": "user", "content": prompt[-MAX_PROMPT_CHARS:]},
                        {"role": "assistant", "content": ans.strip()}]}
    rec["lang"] = member.rsplit("_", 1)[-1]
    return _with_options(rec, ex)


def _conv_summary(task: dict, ex: dict, member: str) -> Record | None:
    prompt = "Summarize in English:\n" + ex["input"].strip()
    return {"messages": [{"role": "user", "content": prompt[:MAX_PROMPT_CHARS]},
                         {"role": "assistant", "content": ex["target"].strip()}]}


def _conv_proverb(task: dict, ex: dict, member: str) -> Record | None:
    ans = _bb_answer(ex)
    prompt = ("Give the English proverb closest in meaning to this Swahili proverb.\n"
              + ex["input"].strip())
    return _with_options({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": ans.strip()}]}, ex) if ans else None


def _conv_evals(task: None, ex: dict, member: str) -> Record | None:
    msgs = [m for m in ex["input"] if m.get("content")]
    ideal = ex.get("ideal")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal else None
    if not msgs or not ideal:
        return None
    if member.endswith("-exams-qa"):
        # The registry's system prompt asks for reasoning the answers do not contain.
        msgs = [{"role": "system", "content": "Answer with the letter of the correct choice "
                 "in square brackets, like [X]."}] + [m for m in msgs if m["role"] != "system"]
        rec = {"messages": msgs + [{"role": "assistant", "content": str(ideal).strip()}]}
        options = [f"[{c}]" for c in re.findall(r"^([A-E])\. ", msgs[-1]["content"], flags=re.M)]
        if str(ideal).strip() in options:  # the choices are lettered lines of the question
            rec["options"] = options
        return rec
    return {"messages": msgs + [{"role": "assistant", "content": str(ideal).strip()}]}


CONVERTERS: dict[str, Callable] = {
    "plain": _conv_plain, "chat": _conv_chat, "math_word": _conv_math_word,
    "sentiment": _conv_sentiment, "summary": _conv_summary, "proverb": _conv_proverb,
    "evals": _conv_evals,
}

_ARITH = tuple(f"arithmetic/{d}_digit_{op}" for d in range(2, 6)
               for op in ("addition", "subtraction", "multiplication", "division"))

RECIPE: tuple[Subset, ...] = (
    Subset("chat", "bigbench", ("topical_chat",), "chat", 3000, "en", "CDLA-Sharing-1.0 (Topical-Chat)"),
    Subset("arithmetic", "bigbench", _ARITH, "plain", 2000, "en", "Apache-2.0 (BIG-bench)"),
    Subset("medical_sentiment", "bigbench",
           tuple(f"multiemo/medicine_text_{lang}" for lang in ("en", "de", "es", "ru", "zh")),
           "sentiment", 1500, "en,de,es,ru,zh", "CC BY 4.0 (MultiEmo)"),
    Subset("math_word", "bigbench", ("elementary_math_qa/question_only",), "math_word", 1200, "en",
           "Apache-2.0 (MathQA)"),
    Subset("hindi_qa", "bigbench", ("hindi_question_answering",), "plain", 800, "hi",
           "Apache-2.0 (BIG-bench)"),
    Subset("exams", "evals", ("arabic-exams-qa", "german-exams-qa", "spanish-exams-qa"), "evals",
           500, "ar,de,es", "CC BY-SA 4.0 (EXAMS) via MIT openai/evals"),
    Subset("finance", "evals", ("ner_finance", "finance_calc", "taxes"), "evals", 300, "en",
           "MIT (openai/evals)"),
    Subset("xling_summary", "bigbench", ("gem/wikilingua_multilingual",), "summary", 300,
           "ar,zh,hi,ru,es,de,fr,...", "CC BY-NC-SA 3.0 (WikiLingua/wikiHow), via GEM"),
    Subset("proverbs_sw", "bigbench", ("swahili_english_proverbs",), "proverb", 1000, "sw",
           "Apache-2.0 (BIG-bench)"),
)


def recipe_hash() -> str:
    payload = json.dumps([RECIPE_VERSION, BIGBENCH, EVALS, [s.__dict__ for s in RECIPE]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _prompt_hash(rec: Record) -> int:
    text = "\n".join(m["content"] for m in rec["messages"] if m["role"] != "assistant")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _iter_bigbench(archive: Path, wanted: set[str]) -> Iterator[tuple[str, dict]]:
    """Streams (task dir, task.json) pairs for the wanted tasks in one pass over the sdist."""
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            parts = info.name.split("/benchmark_tasks/", 1)
            if len(parts) != 2 or not parts[1].endswith("/task.json"):
                continue
            member = parts[1][: -len("/task.json")]
            if member in wanted:
                yield member, json.load(tar.extractfile(info))


def _iter_evals(wheel: Path, wanted: set[str]) -> Iterator[tuple[str, list[dict]]]:
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(wanted):
            with zf.open(f"evals/registry/data/{member}/samples.jsonl") as f:
                yield member, [json.loads(line) for line in f if line.strip()]


def _split(name: str, records: list[Record], max_train: int) -> tuple[list[Record], list[Record]]:
    keyed = sorted(((_prompt_hash(r), i, r) for i, r in enumerate(records)), key=lambda t: t[:2])
    evals = [r for h, _, r in keyed if h % EVAL_FRACTION_MOD == 0][:MAX_EVAL]
    train = [r for h, _, r in keyed if h % EVAL_FRACTION_MOD != 0][:max_train]
    if not train or not evals:
        raise RuntimeError(f"embedded subset {name!r} came out empty (train {len(train)}, eval {len(evals)})")
    return train, evals


def build(cache: Path, archives: Iterable[str | Path] = ()) -> Path:
    """Builds (or finds) the embedded mixture; returns the directory of JSONL files.

    Args:
        cache: The cache root; archives go to `packages/`, the mixture to `mixtures/`.
        archives: Files or directories holding the source archives, taken instead of a
            download (offline machines); checked against the pins like a download.
    """
    out = cache / "mixtures" / f"embedded-{recipe_hash()}"
    if (out / "manifest.json").is_file():
        return out
    pkgs = cache / "packages"
    bb = fetch(BIGBENCH_SDIST, pkgs, local=archives)
    ev = fetch(EVALS_WHEEL, pkgs, local=archives)
    log.info("building the embedded mixture (%d subsets) into %s", len(RECIPE), out)
    raw: dict[str, list[Record]] = {s.name: [] for s in RECIPE}
    by_member = {(s.source, m): s for s in RECIPE for m in s.members}
    bb_tasks = dict(_iter_bigbench(bb, {m for s in RECIPE if s.source == "bigbench" for m in s.members}))
    ev_tasks = dict(_iter_evals(ev, {m for s in RECIPE if s.source == "evals" for m in s.members}))
    for (source, member), subset in by_member.items():
        if source == "bigbench":
            task = bb_tasks[member]
            examples = task["examples"]
        else:
            task, examples = None, ev_tasks[member]
        conv = CONVERTERS[subset.convert]
        for ex in examples:
            rec = conv(task, ex, member)
            if rec is not None:
                rec.setdefault("lang", subset.langs.split(",")[0])
                raw[subset.name].append(rec)
    tmp = private_tmp(out)
    tmp.mkdir()
    counts = {}
    for s in RECIPE:
        train, evals = _split(s.name, raw[s.name], s.max_train)
        counts[s.name] = {"train": len(train), "eval": len(evals), "available": len(raw[s.name])}
        for split, rows in (("train", train), ("eval", evals)):
            with open(tmp / f"{s.name}.{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp / "NOTICE").write_text(notice())
    (tmp / "manifest.json").write_text(json.dumps(
        {"recipe": recipe_hash(), "version": RECIPE_VERSION, "sources": [BIGBENCH, EVALS],
         "subsets": counts}, indent=2))
    return publish(tmp, out)


def notice() -> str:
    lines = ["Embedded default mixture of hbo_jax: sources and licenses", "",
             f"Built from the PyPI packages {BIGBENCH} (sdist; BIG-bench, Apache-2.0 upstream) and",
             f"{EVALS} (wheel; openai/evals, MIT). Each source dataset keeps its own license:", ""]
    for s in RECIPE:
        lines.append(f"- {s.name}: {', '.join(s.members[:3])}{' ...' if len(s.members) > 3 else ''}"
                     f" [{s.source}] langs {s.langs}; license: {s.license}")
    lines += ["", "BIG-bench task files carry the BIG-bench canary string: they are evaluation data.",
              "Models trained on this mixture are demonstrations, not for benchmark claims.",
              "WikiLingua (wikiHow) is non-commercial; MLSUM-style research-only sources are not used."]
    return "\n".join(lines) + "\n"
