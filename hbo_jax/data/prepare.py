"""Prepare a mixture once: tokenize, mask, truncate, score difficulty, bucket, store.

    subsets (JSONL, Parquet, `datasets` dirs, TFDS; see sources.py) -> chat template
      -> ids + assistant loss mask -> truncate
      -> token stores per (subset, split); too long: cut or dropped (data.too_long), counted
      -> scorer (hbo_jax.scorer): the pretrained model, or a tiny model warmed up on the uniform mixture
      -> difficulty per example (ppl | loss | ifd | length), one jitted batched pass
      -> K equal-size quantile buckets per subset (none dropped) -> manifest.json

The output directory is keyed by a hash of the inputs' bytes and every setting that
changes the result, so a rerun with the same inputs reuses it and a changed input or
setting prepares afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hbo_jax.config import Config, cache_root
from hbo_jax.data import embedded
from hbo_jax.data.atomic import private_tmp, publish
from hbo_jax.data import tokenizer as tok_lib
from hbo_jax.data.formats import SkipReport, iter_conversations, read_conversations
from hbo_jax.data.layout import source_dir_subsets
from hbo_jax.data.scoring import response_only, score_examples
from hbo_jax.data.sources import Source, Subset, declared_subsets, missing_reason, use_hash_store
from hbo_jax.data.store import TokenStore
from hbo_jax.errors import ConfigError, DataError
from hbo_jax.model_init import is_pretrained
from hbo_jax.models.loading import save_params
from hbo_jax.models.pretrained import fingerprint, pretrained_tokenizer
from hbo_jax.rng import Stream, generator
from hbo_jax.progress import progress

log = logging.getLogger(__name__)
PREPARE_VERSION = "4"  # 3: eval examples carry difficulty buckets; 4: declared subsets, row formats


@dataclass
class PreparedData:
    root: Path
    names: list[str]
    train: list[TokenStore]
    eval: list[TokenStore]
    buckets: list[np.ndarray]  # bucket id per train example, per subset
    eval_buckets: list[np.ndarray]  # bucket id per eval example (by the train split's bucket edges)
    scores: list[np.ndarray]
    nll0: list[np.ndarray]  # mean response NLL of each train example under the scorer
    tokenizer: object
    manifest: dict
    # (graphdef, params) of the scoring model when this process just prepared the data: the
    # trainer starts from it instead of reading it back (or reloading a pretrained model).
    scorer_model: tuple | None = None

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.train]

    @property
    def num_buckets(self) -> int:
        return int(self.manifest["num_buckets"])

    def leaves(self) -> list[list[np.ndarray]]:
        """Example indices of every (subset, bucket) leaf."""
        return [[np.flatnonzero(b == j) for j in range(self.num_buckets)] for b in self.buckets]

    @property
    def scorer_params(self) -> Path:
        return self.root / "scorer.safetensors"


def source_dir(cfg: Config) -> Path:
    if cfg.data.source_dir:
        path = Path(cfg.data.source_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data.source_dir={path}: {missing_reason(path, 'directory')}")
        return path
    return embedded.build(cache_root(cfg), cfg.data.embedded_archives)


def count_subsets(cfg: Config) -> int:
    """Subsets in the config's mixture, as `mixture` lists them, reading no data.

    Raises:
        DataError: data.source_dir is not a directory or has no subsets.
    """
    n = len(cfg.data.subsets)
    if cfg.data.source_dir:
        n += len(source_dir_subsets(source_dir(cfg), f"data.source_dir={cfg.data.source_dir}"))
    elif not cfg.data.subsets:
        n += len(embedded.RECIPE)  # the embedded mixture, without building it
    return n


def check_min_prob(cfg: Config) -> None:
    """min_prob * D < 1 for the D subsets, so the floor leaves room for the global actor.

    Reads no data: a run calls it before anything else (`config_checks.validate` checks the buckets).
    """
    floor = cfg.mixing.min_prob
    if floor <= 0:
        return
    try:
        d = count_subsets(cfg)
    except DataError:  # no source directory or no subset files: data preparation says so, naming the key
        return
    if floor * d >= 1:
        raise ConfigError(f"mixing.min_prob={floor} times the {d} subsets of the mixture is {floor * d:g}: must "
                          f"be < 1 (min_prob < 1/{d}, the uniform probability of a subset)")


def mixture(cfg: Config) -> list[Subset]:
    """The subsets to prepare: `data.source_dir` (or the embedded mixture) and `data.subsets`.

    Declared subsets come after the source directory's; with declared subsets and no
    source directory, the embedded mixture is not built.
    """
    use_hash_store(cache_root(cfg) / "file_hashes.json")  # unchanged files are not re-read
    out = []
    if cfg.data.source_dir or not cfg.data.subsets:
        src = source_dir(cfg)
        key = f"data.source_dir={src}" if cfg.data.source_dir else "embedded mixture"
        out = source_dir_subsets(src, key)
    for sub in declared_subsets(cfg.data.subsets):
        clash = next((s for s in out if s.name.lower() == sub.name.lower()), None)
        if clash:
            raise DataError(f"{sub.key}: duplicate subset name; {clash.key} already has "
                            f"{clash.name!r} ({clash.train[0]})")
        out.append(sub)
    return out


def prepared_key(cfg: Config) -> str:
    """The name the run's prepared data has (or will have) in the cache: a hash of what it depends on
    (`_key_settings`: the input files by content, not by path), computed without preparing anything."""
    return _hash(_key_settings(cfg, mixture(cfg)))


def _hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _other_seeds(root: Path, seedless: str) -> list[str]:
    """Prepared directories beside `root` made from the same inputs and settings with another train.seed."""
    out = []
    for manifest in sorted(root.parent.glob("*/manifest.json")):
        try:
            if manifest.parent != root and json.loads(manifest.read_text()).get("seedless_key") == seedless:
                out.append(manifest.parent.name)
        except (OSError, ValueError):
            continue  # another run's half-written or damaged manifest is no reason to stop
    return out


def _key_settings(cfg: Config, subsets: list[Subset]) -> dict:
    """Everything the prepared data depends on; `_key` is its hash."""
    # Inputs enter by content (every file's sha256 and name), not by directory or glob:
    # moving the data reuses the preparation, editing one file prepares afresh.
    # No bar when the digests are remembered (nothing is read): only after a second.
    inputs = [(s.name, s.digests()) for s in progress(subsets, desc="hashing inputs", delay=1.0)]
    settings = {"v": PREPARE_VERSION, "data": dataclasses.asdict(cfg.data),
                "scorer": dataclasses.asdict(cfg.scorer), "model": dataclasses.asdict(cfg.model),
                "seed": cfg.train.seed, "inputs": inputs}  # train.data_seed stays out: replicas share this
    for k in ("cache_dir", "source_dir", "max_eval_per_subset", "subsets", "embedded_archives"):
        settings["data"].pop(k)
    if settings["data"]["too_long"] == "truncate":  # the behaviour before the key existed: same key
        settings["data"].pop("too_long")
    if settings["data"]["train_fraction"] == 1.0:  # the behaviour before the key existed: same key
        settings["data"].pop("train_fraction")
    if not settings["model"]["scan_layers"]:  # the behaviour before the key existed: same key
        settings["model"].pop("scan_layers")
    init = settings["model"].pop("init")
    if is_pretrained(init):  # the model, not the tiny-model settings, decides the result
        settings["model"] = {"pretrained": fingerprint(init), "dtype": cfg.model.dtype}
        settings.pop("scorer")
        settings["data"].pop("vocab_size")
        settings["data"].pop("tokenizer")
        settings.pop("seed")  # nothing is warmed up: the seed plays no part in the prepared data
    return settings


def _tokenizer(cfg: Config, subsets: list[Subset]):
    if is_pretrained(cfg.model.init):
        return pretrained_tokenizer(cfg.model.init)
    if cfg.data.tokenizer != "train":
        return tok_lib.load_tokenizer(Path(cfg.data.tokenizer).expanduser())
    digest = hashlib.sha256(json.dumps([[t.digest() for t in s.train] for s in subsets]).encode()).hexdigest()[:12]
    out = cache_root(cfg) / "tokenizers" / f"bpe{cfg.data.vocab_size}-{digest}"
    if (out / "tokenizer.json").is_file():
        return tok_lib.load_tokenizer(out)
    texts = []
    for s in subsets:
        for src in s.train:
            texts += [tok_lib.conversation_texts(c) for c in read_conversations(src, "skip", SkipReport(), s.format)]
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("training a %d-token byte-level BPE on %d conversations", cfg.data.vocab_size, len(texts))
    return tok_lib.train_bpe(texts, cfg.data.vocab_size, out)


TOO_LONG = "longer than data.seq_len (data.too_long=drop)"  # the skip reason of a dropped example


def encode(tokenizer, sources: list[Source], fmt: str, cfg: Config, report: SkipReport,
           cut_rows: list | None = None, kept_rows: list | None = None) -> tuple[list, int]:
    """(ids, mask) of every usable row of the inputs, in order, and how many of them were cut.

    Bad rows go by `data.bad_input`; rows longer than data.seq_len by `data.too_long`. This is
    the one place an example is cut to fit (the stores hold at most seq_len + 1 tokens, so
    `collate` and `pack` never cut one), so it is counted here; `cut_rows`, when given,
    receives whether each returned example was cut, and `kept_rows` the position of each
    returned example's row among the inputs' usable rows (parseable, in the row format).
    """
    out, cut, position = [], 0, 0
    max_len = cfg.data.seq_len + 1  # seq_len + 1 ids give seq_len predicted positions
    for src in sources:
        wheres, convs = [], []
        for where, conv in iter_conversations(src, cfg.data.bad_input, report, fmt):
            wheres.append(where)
            convs.append(conv)
        for where, (ids, mask) in zip(wheres, tok_lib.encode(tokenizer, convs)):
            position += 1
            if len(ids) > max_len and cfg.data.too_long == "drop":
                report.add(TOO_LONG, where)  # asked for, so counted even under bad_input=error
                continue
            kept = tok_lib.truncate(ids, mask, max_len)
            if kept is None:
                if cfg.data.bad_input == "error":
                    raise DataError(f"{where}: no response tokens within data.seq_len={cfg.data.seq_len}")
                report.add("no response tokens within seq_len", where)
            else:
                cut += len(ids) > max_len
                out.append(kept)
                if cut_rows is not None:
                    cut_rows.append(len(ids) > max_len)
                if kept_rows is not None:
                    kept_rows.append(position - 1)
    return out, cut


def train_rows(n: int, fraction: float, name: str, min_rows: int) -> list[int]:
    """The indices, ascending, of the `data.train_fraction` of a subset's n examples kept: a fixed random sample.

    Drawn from the subset's name alone (seed 0), so every seed and strategy trains on the
    same rows; at least `min_rows` (the buckets need one example each) when there are.
    """
    if fraction >= 1.0:
        return list(range(n))
    k = min(n, max(min_rows, round(fraction * n)))
    return np.sort(generator(0, Stream.TRAIN_SAMPLE, zlib.crc32(name.encode())).choice(n, k, replace=False)).tolist()


def _too_few(s: Subset, usable: int, report: SkipReport, num_buckets: int) -> str:
    """The error for a subset with fewer usable training examples than buckets: why, from where."""
    where = s.key if s.key.startswith("data.subsets") else str(s.train[0].path)
    why = "; ".join(report.lines())
    if usable == 0 and report.total:
        return (f"{where}: every training row ({report.total} of {report.total}) of subset {s.name!r} "
                f"was skipped: {why}")
    skipped = f" ({report.total} of {report.total + usable} rows skipped: {why})" if report.total else ""
    return (f"{where}: subset {s.name!r} has {usable} usable training examples, fewer than "
            f"data.num_buckets={num_buckets}{skipped}")


def counted_cuts(subset: dict) -> dict | None:
    """A manifest subset's {"train": n, "eval": n} examples cut to seq_len; None where they were not
    counted (prepared before cuts were) or miscounted (counted over every train row, before a fix kept
    the count to the rows data.train_fraction keeps: more cut than kept). Such a cache's key is the same."""
    cut = subset.get("truncated")
    return None if cut is None or cut["train"] > subset["train"] else cut


def data_notes(manifest: dict) -> list[str]:
    """What a run logs about its prepared data, one line each (none for clean data).

    Skipped rows per reason with their first positions; per subset with cut examples, how
    many and what share of its train and eval examples; a subset whose eval rows were all
    skipped.
    """
    notes = [f"skipped {line}" for line in SkipReport.from_dict(manifest["skipped"]).lines()]
    if any(counted_cuts(s) is None for s in manifest["subsets"]):
        notes.append(f"examples cut to data.seq_len were not counted (or miscounted) when prepared data "
                     f"{manifest['key']} was made (the cache key is the same); delete it to count them")
    for s in manifest["subsets"]:
        cut = counted_cuts(s) or {"train": 0, "eval": 0}
        parts = [f"{cut[split]} of {s[split]} {split} examples ({cut[split] / s[split]:.1%})"
                 for split in ("train", "eval") if cut[split]]
        if parts:
            notes.append(f"subset {s['name']!r}: {' and '.join(parts)} were longer than data.seq_len="
                         f"{manifest['seq_len']} and were cut to fit (data.too_long=drop skips them instead)")
        skipped_eval = s.get("skipped", {}).get("eval", 0)
        if skipped_eval and not s["eval"]:
            notes.append(f"subset {s['name']!r}: every eval row ({skipped_eval} of {skipped_eval}) was "
                         "skipped, so it has no held-out loss")
    return notes


def difficulty(kind: str, examples: list, nll_fn, params, mesh, cfg: Config, pad_id: int, name: str):
    """(difficulty score, mean response NLL under the scorer) per example.

    The NLL is kept for every kind: with the scorer as the starting model it is the
    theta0 term of the local PPL-ratio reward, so that reward can come from training
    batches without probes (`mixing.local_source=train`).
    """
    args = (nll_fn, params, mesh, cfg.data.seq_len, pad_id, cfg.scorer.score_batch_size)
    nll = score_examples(examples, *args, desc=f"scoring {name}")
    if kind == "length":
        return np.array([m[1:].sum() for _, m in examples], np.float64), nll
    if kind == "loss":
        return nll, nll
    if kind == "ppl":
        return np.exp(nll), nll
    alone = score_examples([response_only(i, m) for i, m in examples], *args, desc=f"scoring {name} (alone)")
    return nll / np.maximum(alone, 1e-6), nll  # IFD: loss(y|x) / loss(y)


def assign_buckets(scores: np.ndarray, edges: list[list[float]]) -> np.ndarray:
    """Bucket of each score under the train split's bucket edges ([min, max] per bucket)."""
    upper = np.array([hi for _, hi in edges[:-1]])
    return np.searchsorted(upper, scores, side="left").astype(np.int32)


def make_buckets(scores: np.ndarray, k: int) -> tuple[np.ndarray, list[list[float]]]:
    """K equal-size quantile buckets (sizes differ by at most one; nothing dropped)."""
    order = np.argsort(scores, kind="stable")
    bucket = np.zeros(len(scores), np.int32)
    edges = []
    for j, part in enumerate(np.array_split(order, k)):
        bucket[part] = j
        edges.append([float(scores[part].min()), float(scores[part].max())])
    return bucket, edges


# The model that scores difficulty, built once the train splits are tokenized: (train
# stores, pad id, vocabulary size) -> (graphdef, params, example NLL fn, warm-up losses).
# `hbo_jax.scorer.scoring_model` gives the run's: warming a tiny model up is training, which
# lives above the data layer.
ScoringModel = Callable[[list[TokenStore], int, int], tuple]


def prepare(cfg: Config, mesh, scoring_model: ScoringModel) -> PreparedData:
    """Prepares (or reuses) the mixture described by `cfg.data`.

    `scoring_model` builds the model that scores difficulty; it is called only when the
    prepared data is not cached. `hbo_jax.scorer.prepare` passes the run's.
    """
    mix = mixture(cfg)
    settings = _key_settings(cfg, mix)
    root = _prepared_root(cfg, settings)
    if (root / "manifest.json").is_file():
        log.info("prepared data found in %s: no tokenizing, scorer warm-up or scoring", root)
        return load(root, cfg)
    seedless = _hash({k: v for k, v in settings.items() if k != "seed"})
    others = _other_seeds(root, seedless) if "seed" in settings else []
    if others:
        log.info("preparing again for train.seed=%d: the cache holds this mixture prepared with another train.seed "
                 "(%s), but train.seed initialises the scorer that is warmed up and scores difficulty. To repeat a "
                 "run over seeds on the same prepared data, keep train.seed and vary train.data_seed",
                 cfg.train.seed, ", ".join(others[:3]))
    t0 = time.perf_counter()
    report = SkipReport()
    tokenizer = _tokenizer(cfg, mix)
    pad = int(tokenizer.pad_token_id)
    tmp = private_tmp(root)
    encoded, counts = {}, {}
    for s in progress(mix, desc="tokenizing"):
        tr_report, ev_report = SkipReport(), SkipReport()  # per subset and split: the errors name them
        tr_cut_rows: list[bool] = []
        tr, _ = encode(tokenizer, s.train, s.format, cfg, tr_report, tr_cut_rows)
        keep = train_rows(len(tr), cfg.data.train_fraction, s.name, cfg.data.num_buckets)
        tr, tr_cut = [tr[i] for i in keep], sum(tr_cut_rows[i] for i in keep)  # counted among the rows kept
        if len(tr) < cfg.data.num_buckets:
            raise DataError(_too_few(s, len(tr), tr_report, cfg.data.num_buckets))
        ev, ev_cut = encode(tokenizer, s.eval, s.format, cfg, ev_report)
        report.merge(tr_report)
        report.merge(ev_report)
        encoded[s.name] = (tr, ev)
        counts[s.name] = {"truncated": {"train": tr_cut, "eval": ev_cut},
                          "skipped": {"train": tr_report.total, "eval": ev_report.total}}
    names = [s.name for s in mix]
    train_stores = [TokenStore.write(tmp / n / "train", encoded[n][0]) for n in names]
    eval_stores = [TokenStore.write(tmp / n / "eval", encoded[n][1]) for n in names]
    t_tok = time.perf_counter() - t0

    graphdef, params, nll_fn, warm = scoring_model(train_stores, pad, len(tokenizer))
    if not is_pretrained(cfg.model.init):  # the warmed-up model: a run may start from it
        save_params(params, tmp / "scorer.safetensors")
    t_warm = time.perf_counter() - t0 - t_tok
    subsets = []
    for n, store, ev_store in zip(names, train_stores, eval_stores):
        exs = [store[i] for i in range(len(store))]
        scores, nll0 = difficulty(cfg.data.difficulty, exs, nll_fn, params, mesh, cfg, pad, n)
        bucket, edges = make_buckets(scores, cfg.data.num_buckets)
        # Eval examples go to the bucket their score falls in, so per-bucket eval loss
        # reads "how did the examples that were hard for the starting model do".
        ev_exs = [ev_store[i] for i in range(len(ev_store))]
        ev_scores = difficulty(cfg.data.difficulty, ev_exs, nll_fn, params, mesh, cfg, pad, f"{n} eval")[0] \
            if ev_exs else np.zeros(0)
        np.save(tmp / n / "eval_buckets.npy", assign_buckets(ev_scores, edges))
        np.save(tmp / n / "scores.npy", scores)
        np.save(tmp / n / "nll0.npy", nll0.astype(np.float32))
        np.save(tmp / n / "buckets.npy", bucket)
        subsets.append({"name": n, "train": len(store), "eval": len(eval_stores[names.index(n)]),
                        "bucket_sizes": np.bincount(bucket, minlength=cfg.data.num_buckets).tolist(),
                        "bucket_edges": edges, **counts[n]})
    manifest = {
        "key": root.name, "seedless_key": seedless, "num_buckets": cfg.data.num_buckets,
        "difficulty": cfg.data.difficulty,
        "seq_len": cfg.data.seq_len, "vocab_size": len(tokenizer),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "sources": [{"name": s.name, "format": s.format, "train": [str(t) for t in s.train],
                     "eval": [str(e) for e in s.eval] or None} for s in mix],
        "subsets": subsets, "skipped": report.to_dict(),
        "scorer": {"model": cfg.model.init if is_pretrained(cfg.model.init) else "warmed-up tiny model",
                   "warmup_steps": len(warm), "first_loss": warm[0] if warm else None,
                   "last_loss": float(np.mean(warm[-10:])) if warm else None},
        "seconds": {"tokenize": t_tok, "scorer_warmup": t_warm,
                    "score": time.perf_counter() - t0 - t_tok - t_warm},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    publish(tmp, root)
    data = load(root, cfg, tokenizer)
    data.scorer_model = (graphdef, params)
    return data


def _prepared_root(cfg: Config, settings: dict) -> Path:
    """Where the mixture prepared with `settings` (`_key_settings`) lives in the data cache."""
    return cache_root(cfg) / "prepared" / _hash(settings)


def find_prepared(cfg: Config) -> PreparedData | None:
    """The run's prepared data where the cache holds it (nothing is prepared), else None."""
    root = _prepared_root(cfg, _key_settings(cfg, mixture(cfg)))
    return load(root, cfg) if (root / "manifest.json").is_file() else None


def load(root: Path, cfg: Config, tokenizer=None) -> PreparedData:
    manifest = json.loads((root / "manifest.json").read_text())
    names = [s["name"] for s in manifest["subsets"]]
    if tokenizer is None:
        tokenizer = (pretrained_tokenizer(cfg.model.init) if is_pretrained(cfg.model.init)
                     else tok_lib.load_tokenizer(manifest["tokenizer"]))
    return PreparedData(
        root=root, names=names,
        train=[TokenStore(root / n / "train") for n in names],
        eval=[TokenStore(root / n / "eval") for n in names],
        buckets=[np.load(root / n / "buckets.npy") for n in names],
        eval_buckets=[np.load(root / n / "eval_buckets.npy") for n in names],
        scores=[np.load(root / n / "scores.npy") for n in names],
        nll0=[np.load(root / n / "nll0.npy") for n in names],
        tokenizer=tokenizer, manifest=manifest)
