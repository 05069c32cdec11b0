"""Merging runs (`python -m hbo_jax.merge`): the selection and averaging rules, determinism
across input layouts and block sizes, tied weights, the output against committed
transformers logits, named errors that leave no output, and data-order replicas of a
tiny run merged and evaluated end to end.

Inputs are the `tied` parity fixture (`scripts/make_parity_fixtures.py`: a random tiny
Llama with tied embeddings and its transformers logits in `reference.npz`) and copies of
it with perturbed elements.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from scipy import stats as sps

from hbo_jax.merge import main as merge_main, merge, merge_inputs
from hbo_jax.merging import fused, inputs as mi
from hbo_jax.merging.select import average_block, element_bits, select_block, tensor_key
from hbo_jax.models.safetensors_writer import SafetensorsWriter
from hbo_jax.models.tensor_io import SafetensorsReader

PARITY = Path(__file__).parent / "fixtures" / "parity"
TIED = PARITY / "tied"


def _fixture() -> dict[str, np.ndarray]:
    with SafetensorsReader(TIED) as r:
        return dict(r.items())


def _write(out: Path, arrays: dict, *, config: dict | None = None, shard: int | None = None,
           order=None, tokenizer=None) -> Path:
    """A Hugging Face directory of `arrays` (in `order`), the tied fixture's config (or `config`)."""
    names = order or list(arrays)
    with SafetensorsWriter(out, [(n, arrays[n].shape, arrays[n].dtype) for n in names], max_shard_bytes=shard) as w:
        for n in names:
            w.write(n, arrays[n])
        cfg = config or json.loads((TIED / "config.json").read_text())
        (w.staging_dir / "config.json").write_text(json.dumps(cfg))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(w.staging_dir))
    return out


def _perturbed(arrays: dict, seed: int, frac: float) -> dict:
    """A copy with a fraction `frac` of every tensor's elements changed."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in arrays.items():
        mask = rng.random(v.shape) < frac
        out[k] = np.where(mask, v + rng.normal(size=v.shape).astype(v.dtype), v).astype(v.dtype)
    return out


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ----------------------------------------------------------------------------- the rules


def test_selection_frequencies_match_the_probabilities():
    n, probs = 60_000, np.array([0.5, 0.3, 0.2])
    models = [np.full(n, k, np.float32) for k in range(3)]
    out, _ = select_block(models, None, probs, tensor_key(7, "w"), 0, resample=False)
    counts = np.bincount(out.astype(int), minlength=3)
    assert sps.chisquare(counts, probs * n).pvalue > 1e-3, counts


def _triple32(x: int) -> int:
    """The hash of the element words, on Python ints: the reference the arrays are checked against."""
    for shift, mult in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB), (14, 1)):
        x ^= x >> shift
        x = x * mult & 0xFFFFFFFF
    return x


def _words(seed: int, name: str, start: int, count: int) -> list[int]:
    key = hashlib.sha256(seed.to_bytes(8, "little") + name.encode()).digest()
    out = []
    for i in range(start, start + count):
        high = i >> 32
        digest = key if high == 0 else hashlib.sha256(key + high.to_bytes(8, "little")).digest()
        k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")
        out.append(_triple32(_triple32((i & 0xFFFFFFFF) ^ k0) ^ k1))
    return out


@pytest.mark.parametrize("start", [0, 1, 13, 2 ** 32 - 5])  # the last crosses to the next round keys
def test_element_words_are_the_keyed_hash_of_the_index(start):
    key = tensor_key(3, "model.norm.weight")
    np.testing.assert_array_equal(element_bits(key, start, 40), _words(3, "model.norm.weight", start, 40))


def test_draw_and_redraw_halves_and_neighbours_are_independent():
    # the upper 16 bits draw the run and the lower 16 the redraw: neither may predict the other, nor
    # an element's draw its neighbour's (contingency tables of their top 4 bits, 2**20 elements)
    w = element_bits(tensor_key(0, "w"), 0, 1 << 20).astype(np.int64)
    hi, lo = w >> 28, (w >> 12) & 15
    for a, b in ((hi, lo), (hi[:-1], hi[1:]), (hi[:-576], hi[576:])):
        table = np.bincount(a * 16 + b, minlength=256).reshape(16, 16)
        assert sps.chi2_contingency(table)[1] > 1e-3


def test_redraws_follow_the_probabilities_renormalised_over_the_runs_that_changed():
    n, probs = 60_000, np.array([0.5, 0.3, 0.2])
    base = np.zeros(n, np.float32)
    models = [np.full(n, k + 1, np.float32) for k in range(3)]
    models[1][: n // 2] = 0  # first half: run 1 left it at the base; run 0 and 2 drawn as 5:2
    out, st = select_block(models, base, probs, tensor_key(2, "w"), 0, resample=True)
    counts = np.bincount(out[: n // 2].astype(int), minlength=4)
    assert counts[0] == counts[2] == 0
    assert sps.chisquare(counts[[1, 3]], np.array([0.5, 0.2]) / 0.7 * (n // 2)).pvalue > 1e-3, counts
    assert abs(st.resampled - 0.3 * n / 2) < 5 * np.sqrt(n / 2 * 0.3 * 0.7)  # the drawn run 1 is redrawn


def test_resampling_never_keeps_the_base_where_some_run_changed_it():
    rng = np.random.default_rng(0)
    base = rng.normal(size=20_000).astype(ml_dtypes.bfloat16)
    models = []
    for k in range(3):  # each run changes ~30% of the elements, so many elements are changed by one run only
        m = base.copy()
        idx = rng.random(base.size) < 0.3
        m[idx] = (base[idx].astype(np.float32) + 1).astype(ml_dtypes.bfloat16)
        models.append(m)
    out, st = select_block(models, base, np.full(3, 1 / 3), tensor_key(1, "t"), 0, resample=True)
    changed = np.stack([m != base for m in models])
    some = changed.any(axis=0)
    assert np.all(out[some] != base[some])
    assert np.all(out[~some] == base[~some])
    from_changer = np.zeros(base.size, bool)
    for k, m in enumerate(models):
        from_changer |= changed[k] & (out == m)
    assert np.all(from_changer[some])  # each changed element comes from a run that changed it
    assert st.kept_base == int((~some).sum()) and st.resampled > 0
    plain, _ = select_block(models, base, np.full(3, 1 / 3), tensor_key(1, "t"), 0, resample=False)
    assert np.any(plain[some] == base[some])  # without resampling the base does survive


@pytest.mark.parametrize("pieces", [None, (4096, 1024)], ids=["numpy", "fused"])
@pytest.mark.parametrize("k, resample, probs, digest, resampled, kept_base", [
    (3, True, [1 / 3] * 3, "1d55c22162d5b012", 7470, 1729),
    (5, True, [0.1, 0.0, 0.4, 0.3, 0.2], "b1d241c70caebc45", 7979, 673),  # a run of probability 0
    (3, False, [0.5, 0.3, 0.2], "b282e4515a575822", 0, 0),
])
def test_selection_bytes_are_pinned(k, resample, probs, digest, resampled, kept_base, pieces, monkeypatch):
    # A merge's bytes are a function of (seed, name, position) that users may re-derive: each
    # implementation must give the same ones (pinned from the version whose element words are the keyed
    # hash). Each run changes its elements its own way, so the bytes depend on which run is drawn. "fused":
    # short compiled pieces, so the 21000 elements go through XLA (4096, then the 520 of the tail padded to
    # 1024; the block starts at an odd element: the inputs are copied to aligned arrays)
    if pieces is not None:
        monkeypatch.setattr(fused, "PIECES", pieces)
    rng = np.random.default_rng(11)
    base = rng.normal(size=(70, 300)).astype(ml_dtypes.bfloat16)
    models = [np.where(rng.random(base.shape) < 0.4, base,
                       (base.astype(np.float32) * (1 + 0.01 * (j + 1)) + 0.01).astype(ml_dtypes.bfloat16))
              for j in range(k)]
    out, st = select_block(models, base, np.array(probs), tensor_key(9, "model.layers.3.mlp.up_proj.weight"),
                           1234567, resample=resample)
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == digest
    assert (st.resampled, st.kept_base, st.equal_base[:3]) == (resampled, kept_base, [9943, 8995, 8645])


def test_fused_pieces_past_2_32_elements_give_numpys_bytes(monkeypatch):
    # the fused rule counts the index's lower 32 bits with the round keys of its upper ones: a block
    # crossing 2**32 (its crossing piece goes to NumPy) must give the bytes NumPy gives everywhere
    rng = np.random.default_rng(4)
    base = rng.integers(0, 1 << 16, 21000, dtype=np.uint16).view(ml_dtypes.bfloat16)
    models = [np.where(rng.random(base.size) < 0.5, base, rng.integers(0, 1 << 16, base.size, dtype=np.uint16)
                       .view(ml_dtypes.bfloat16)) for _ in range(3)]
    args = (models, base, np.full(3, 1 / 3), tensor_key(5, "lm_head.weight"), 2 ** 32 - 9000)
    numpy_only, _ = select_block(*args, resample=True)
    monkeypatch.setattr(fused, "PIECES", (4096, 1024))
    with_fused, _ = select_block(*args, resample=True)
    np.testing.assert_array_equal(with_fused.view(np.uint16), numpy_only.view(np.uint16))


def test_average_equals_the_direct_computation():
    rng = np.random.default_rng(3)
    models = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(3)]
    w = np.array([0.2, 0.5, 0.3])
    out, _ = average_block(models, w)
    np.testing.assert_array_equal(out, (np.float32(0.2) * models[0] + np.float32(0.5) * models[1])
                                  + np.float32(0.3) * models[2])


def test_threads_calling_a_new_piece_length_compile_it_once(monkeypatch):
    # the pool's threads reach the first piece of a length at once: each compiling it cost 0.1 s of CPU
    import threading

    monkeypatch.setattr(fused, "_COMPILED", set())
    n, k = 3000, 2  # a length no other test compiles
    monkeypatch.setattr(fused, "PIECES", (n,))
    fused._compiled.cache_clear()
    rng = np.random.default_rng(5)
    vals = [rng.integers(0, 1 << 16, n, dtype=np.uint16) for _ in range(k)]
    start = threading.Barrier(2)

    def call():
        start.wait()
        fused.select(vals, vals[0], np.array([1 << 15, 1 << 15], np.uint32), np.array([1 << 15], np.uint32),
                     np.arange(3, dtype=np.uint32), True, np.empty(n, np.uint16))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fused._compiled.cache_info().misses == 1 and fused._compiled(k, True)[0]._cache_size() == 1


def test_pieces_go_to_numpy_while_prepare_compiles_the_rule(monkeypatch):
    n = 2000  # a length no other test compiles
    for name, value in (("_COMPILED", set()), ("_PENDING", set()), ("PIECES", (n,))):
        monkeypatch.setattr(fused, name, value)
    rng = np.random.default_rng(6)
    vals = [rng.integers(0, 1 << 16, n, dtype=np.uint16) for _ in range(2)]
    args = (vals, vals[0], np.array([1 << 15, 1 << 15], np.uint32), np.array([1 << 15], np.uint32),
            np.arange(3, dtype=np.uint32), True, np.empty(n, np.uint16))
    with fused._FIRST_CALLS:  # holds the compiling thread back
        thread = fused.prepare(2, True, ml_dtypes.bfloat16)
        assert fused.select(*args) is None  # not done: NumPy's
    thread.join()
    assert fused.select(*args) is not None


def test_a_process_that_ends_while_the_rule_compiles_exits_cleanly():
    # A small merge ends before `prepare`'s compile does; on a daemon thread the interpreter's exit then
    # stopped XLA mid-compile and the process aborted (SIGABRT) after writing its output: about one
    # exit in two, so three tries; without the tests' compilation cache, whose hit ends the compile first.
    # The pause lets the thread reach XLA's compile (while it traces, the exit just freezes it).
    code = ("import time, jax, ml_dtypes; jax.devices('cpu'); from hbo_jax.merging import fused; "
            "fused.prepare(3, True, ml_dtypes.bfloat16); time.sleep(0.1); print('ended')")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert (done.returncode, done.stdout.strip()) == (0, "ended"), done.stderr[-2000:]


def test_an_input_digest_is_xxh3_over_its_tensors_lines():
    # merge.json's "digest" text states this rule: anyone can re-derive an input's digest from its tensors
    import xxhash

    from hbo_jax.merging.stream import InputStream, row_blocks

    arrays = {"b": np.arange(10, dtype=np.float32), "a": np.arange(12, dtype=np.uint16).view(ml_dtypes.bfloat16)
              .reshape(3, 4)}
    reader = mi.ArrayReader(arrays)
    infos = [reader.info(n) for n in arrays]
    plan = [(i.name, rows) for i in infos for rows in row_blocks(i, 8)]  # several blocks per tensor
    stream = InputStream(reader, plan)
    for _ in plan:
        stream.next()
    stream.close()
    lines = "".join(f"{n} {list(a.shape)} {a.dtype} {xxhash.xxh3_128(a.tobytes()).hexdigest()}\n"
                    for n, a in sorted(arrays.items()))
    assert stream.digest(infos) == xxhash.xxh3_128(lines.encode()).hexdigest()


@pytest.mark.parametrize("fail", [False, True], ids=["done", "failed"])
def test_the_cycle_collector_is_off_during_a_stream_merge_and_restored_after(fail, tmp_path):
    import gc

    from hbo_jax.merging.stream import stream_merge

    arrays = {"a": np.arange(6, dtype=np.float32)}
    reader = mi.ArrayReader(arrays)
    seen = []

    def merge_block(name, start, blocks, base):
        seen.append(gc.isenabled())
        if fail:
            raise RuntimeError("merge failed")
        return blocks[0], None

    assert gc.isenabled()
    with SafetensorsWriter(tmp_path / "out", [reader.info("a")]) as writer:
        try:
            stream_merge([reader.info("a")], [reader, reader], None, writer, merge_block, progress=False)
        except RuntimeError:
            assert fail
            writer.abort()
    assert seen == [False] and gc.isenabled()


# ----------------------------------------------------------------------------- determinism, tying, logits


def test_same_seed_gives_the_same_bytes_across_shardings_orders_and_block_sizes(tmp_path):
    a = _fixture()
    base, m1, m2 = a, _perturbed(a, 1, 0.5), _perturbed(a, 2, 0.5)
    names = list(a)
    b = _write(tmp_path / "base", base)
    outs = []
    for i, (shard, order, block) in enumerate([(None, names, 64 << 20), (40_000, names[::-1], 12),
                                               (100_000, sorted(names), 1000)]):
        ins = [_write(tmp_path / f"m{j}_{i}", m, shard=shard, order=order) for j, m in enumerate((m1, m2))]
        merge(b, ins, tmp_path / f"out{i}", method="select", resample=True, seed=5, block_bytes=block)
        outs.append((tmp_path / f"out{i}" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    merge(b, ins, tmp_path / "other_seed", method="select", resample=True, seed=6)
    assert (tmp_path / "other_seed" / "model.safetensors").read_bytes() != outs[0]


def test_tied_weights_are_drawn_once_and_stay_tied(tmp_path):
    a = _fixture()
    m1, m2 = _perturbed(a, 1, 0.5), _perturbed(a, 2, 0.5)
    m2_head = {**m2, "lm_head.weight": m2["model.embed_tokens.weight"]}  # a redundant copy, as some savers write
    b = _write(tmp_path / "base", a)
    out = tmp_path / "out"
    merge(b, [_write(tmp_path / "m1", m1), _write(tmp_path / "m2", m2_head)], out, method="select", resample=True)
    with SafetensorsReader(out) as r:
        assert "lm_head.weight" not in r and "model.embed_tokens.weight" in r
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    from hbo_jax.config import MeshConfig
    from hbo_jax.models.hf import load_hf
    from hbo_jax.parallel import make_mesh

    import jax
    _, _, spec = load_hf(out, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    assert spec.tie_embeddings


def _tokenizer(chat: str = "{% for m in messages %}{{ m['content'] }}{% endfor %}", extra: str = ""):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", *([extra] if extra else [])])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = chat
    return fast


@pytest.mark.parametrize("method", ["select", "average"])
def test_merged_directory_gives_the_transformers_reference_logits(method, tmp_path):
    """select+resample: the base is the fixture shifted, one run is the base and the other the
    fixture, so every element is resampled to the fixture's. average: runs at fixture +- noise."""
    import jax
    from flax import nnx
    from transformers import AutoConfig, AutoTokenizer

    from hbo_jax.config import MeshConfig
    from hbo_jax.models.hf import load_hf
    from hbo_jax.parallel import make_mesh

    a, tok = _fixture(), _tokenizer()
    if method == "select":
        shifted = {k: v + np.float32(0.25) for k, v in a.items()}
        base, runs = _write(tmp_path / "base", shifted, tokenizer=tok), [shifted, a]
    else:
        noise = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32) * 0.01 for k, v in a.items()}
        base, runs = None, [{k: a[k] + noise[k] for k in a}, {k: a[k] - noise[k] for k in a}]
    ins = [_write(tmp_path / f"m{i}", r, tokenizer=tok) for i, r in enumerate(runs)]
    out = tmp_path / "out"
    rec = merge(base, ins, out, method=method, resample=method == "select", max_shard_bytes=150_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert AutoConfig.from_pretrained(str(out)).tie_word_embeddings
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.chat_template == tok.chat_template and loaded("hello world")["input_ids"] == [3, 4]
    ref = np.load(TIED / "reference.npz")
    graphdef, params, _ = load_hf(out, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))
    logits = np.asarray(nnx.merge(graphdef, params)(ref["tokens"]))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    if method == "select":
        assert rec["totals"]["frac_equal_base"] == [1.0, 0.0] and rec["totals"]["frac_resampled"] > 0.4


def test_a_gguf_base_is_compared_dequantized_and_gives_its_tokenizer(tmp_path):
    """The committed qwen2 GGUF (float32 but one Q8_0 tensor) as the base of the HF qwen2
    fixture (equal to it on every float32 tensor) and a perturbed copy: with resampling every
    element the copy changed is the copy's, every other one the base's."""
    from transformers import AutoTokenizer

    with SafetensorsReader(PARITY / "qwen2") as r:
        a = dict(r.items())
    cfg = json.loads((PARITY / "qwen2" / "config.json").read_text())
    m1 = _perturbed(a, 1, 0.5)
    ins = [_write(tmp_path / "m0", a, config=cfg), _write(tmp_path / "m1", m1, config=cfg)]
    gguf = PARITY / "qwen2_gguf" / "model.gguf"
    rec = merge(f"gguf:{gguf}", ins, tmp_path / "out", method="select", resample=True)
    quantized = "model.layers.0.mlp.down_proj.weight"
    with SafetensorsReader(tmp_path / "out") as out:
        for name, want in a.items():
            if name != quantized:
                got, moved = out.read(name), m1[name] != want
                np.testing.assert_array_equal(got[moved], m1[name][moved], err_msg=name)
                np.testing.assert_array_equal(got[~moved], want[~moved], err_msg=name)
    assert rec["base"]["digest"] and not rec["base"]["cast_to_model_dtype_for_comparison"]
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template  # the GGUF's, with its template


# ----------------------------------------------------------------------------- errors


def _mismatch(kind: str, a: dict, tmp_path: Path) -> tuple[dict, dict | None, object]:
    """(the second model's arrays, its config or None, its tokenizer) for one kind of mismatch."""
    cfg = json.loads((TIED / "config.json").read_text())
    m = dict(a)
    if kind == "missing":
        m.pop("model.layers.1.mlp.up_proj.weight")
    elif kind == "extra":
        m["model.layers.1.mlp.extra.weight"] = a["model.norm.weight"]
    elif kind == "shape":
        m["model.norm.weight"] = np.zeros(63, np.float32)
    elif kind == "dtype":
        m["model.norm.weight"] = a["model.norm.weight"].astype(np.float16)
    elif kind == "architecture":
        cfg["rms_norm_eps"] = 1e-6
    elif kind == "vocab":
        cfg["vocab_size"] = 300
        m["model.embed_tokens.weight"] = np.zeros((300, 64), np.float32)
    return m, cfg, _tokenizer(extra="other") if kind == "tokenizer" else _tokenizer()


ERRORS = {"missing": mi.MissingTensor, "extra": mi.ExtraTensor, "shape": mi.ShapeMismatch,
          "dtype": mi.DtypeMismatch, "architecture": mi.ArchitectureMismatch, "vocab": mi.VocabMismatch,
          "tokenizer": mi.TokenizerMismatch}
NAMED = {"missing": "up_proj", "extra": "extra.weight", "shape": "model.norm.weight", "dtype": "model.norm.weight",
         "architecture": "rms_norm_eps", "vocab": "vocabulary size 300", "tokenizer": "tokenizer differs"}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_each_mismatch_gives_its_named_error_and_no_output(kind, tmp_path):
    a = _fixture()
    m, cfg, tok = _mismatch(kind, a, tmp_path)
    base = _write(tmp_path / "base", a, tokenizer=_tokenizer())
    ins = [_write(tmp_path / "m0", a, tokenizer=_tokenizer()), _write(tmp_path / "m1", m, config=cfg, tokenizer=tok)]
    with pytest.raises(ERRORS[kind], match=NAMED[kind]) as e:
        merge(base, ins, tmp_path / "out", method="select", resample=True)
    assert str(tmp_path / "m1") in str(e.value)
    _no_output(tmp_path, tmp_path / "out")


def test_a_read_failure_midway_leaves_no_output(tmp_path):
    a = _fixture()

    class Failing(mi.ArrayReader):
        def _read(self, name, rows):
            if name == "model.layers.1.mlp.up_proj.weight":
                raise OSError("input/output error")
            return super()._read(name, rows)

    def inp(reader):
        cfg = json.loads((TIED / "config.json").read_text())
        from hbo_jax.models.hf import spec_from_hf_config
        return mi.Input(reader.where, reader, spec_from_hf_config(cfg), cfg)

    with pytest.raises(OSError, match="input/output"):
        merge_inputs(inp(mi.ArrayReader(a)), [inp(mi.ArrayReader(a)), inp(Failing(a, "bad"))], tmp_path / "out",
                     block_bytes=4096)
    _no_output(tmp_path, tmp_path / "out")


def test_cli_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    a = _fixture()
    ins = [str(_write(tmp_path / f"m{i}", _perturbed(a, i, 0.5))) for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert merge_main(["--models", *ins, "--method", "average", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert merge_main(["--models", *ins, "--method", "average", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "merge.json").is_file()


# ----------------------------------------------------------------------------- replicas of a run


def test_replicas_differ_only_in_the_data_seed(tmp_path, monkeypatch):
    import hbo_jax.train
    from hbo_jax.config import to_dict
    from hbo_jax.errors import ConfigError
    from hbo_jax.replicas import train_replicas

    seen = []
    monkeypatch.setattr(hbo_jax.train, "run", lambda cfg, stop=None: seen.append(to_dict(cfg)) or {})
    dirs = train_replicas(tmp_path, 3, None, ["train.steps=7", "mixing.strategy=uniform"])
    assert [d["run_dir"] for d in seen] == [str(d) for d in dirs] == [str(tmp_path / f"r{i}") for i in range(3)]
    assert [d["train"].pop("data_seed") for d in seen] == [0, 1, 2]
    for d in seen:
        d.pop("run_dir")
    assert seen[0] == seen[1] == seen[2] and seen[0]["train"]["steps"] == 7
    seen.clear()
    train_replicas(tmp_path, 3, None, [], only=1)  # one replica per host / GPU group
    assert [d["run_dir"] for d in seen] == [str(tmp_path / "r1")]
    with pytest.raises(ConfigError, match="train.data_seed"):
        train_replicas(tmp_path, 2, None, ["train.data_seed=4"])


def test_run_directories_merge_into_an_export_that_evaluates(bf16_run, bf16_export, tmp_path):
    """Two copies of one run (bf16, untied head, padded vocabulary; base: its model.init, rebuilt):
    every element is the run's, so the merge holds exactly the tensors its export holds."""
    from hbo_jax.evaluate import main as evaluate_main

    copy = Path(shutil.copytree(bf16_run, tmp_path / "copy"))
    out = tmp_path / "merged"
    rec = merge(None, [bf16_run, copy], out, method="select", resample=True)
    assert [m["step"] for m in rec["models"]] == [1, 1] and rec["base"]["source"].startswith("base of")
    assert rec["models"][0]["digest"] == rec["models"][1]["digest"]
    with SafetensorsReader(out) as got, SafetensorsReader(bf16_export) as want:
        assert sorted(got.names()) == sorted(want.names())
        for name, arr in want.items():
            assert got.info(name).dtype == arr.dtype
            np.testing.assert_array_equal(got.read(name), arr, err_msg=name)
    cfg, ref = (json.loads((d / "config.json").read_text()) for d in (out, bf16_export))
    assert cfg == {**ref, "dtype": "bfloat16"}
    assert evaluate_main([str(bf16_run), "--model", f"hf:{out}", "--no-tasks", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval"]["macro_avg"]["loss"] > 0
