"""Task metrics through real models with known answers, and per-bucket loss aggregation.

The rigged model is a Llama whose layers add nothing (zero output projections) and whose
embeddings are one-hot, so its logits at a position depend only on that position's
token: a bigram table we write into the LM head. Chaining "last prompt token -> answer
tokens -> end of turn" makes it certain of one answer, through the real scoring and the
real KV-cache decoding paths.
"""

import json

import jax
import numpy as np
import pytest

from hbo_jax import tasks
from hbo_jax.config import MeshConfig
from hbo_jax.data import tokenizer as tok_lib
from hbo_jax.data.store import TokenStore
from hbo_jax.evaluate import bucket_losses, heldout_loss, make_generate_fn, make_logprob_fn
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.models.loading import flat_params, params_from_flat
from hbo_jax.parallel import make_mesh
from hbo_jax.step import make_example_nll_fn

CORPUS = ["Which colour is grass? red green blue", "What is 17 plus 18? 35 36",
          "Pick the colour of the sea: blue", "The answer is green."] * 4
SEQ_LEN = 48


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok_lib.train_bpe(CORPUS, 300, tmp_path_factory.mktemp("tok") / "bpe")


def _spec(vocab: int, hidden: int) -> LlamaSpec:
    return LlamaSpec(vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=1, num_kv_heads=1,
                     head_dim=hidden, intermediate_size=8, rope_theta=1e4, rms_norm_eps=1e-6,
                     tie_embeddings=False, qkv_bias=False, dtype="float32", param_dtype="float32", remat=False)


def bigram_model(vocab: int, chain: list[int], mesh):
    """A model that, after token chain[i], puts logit 30 on chain[i + 1] and 0 elsewhere."""
    nxt = {}
    for u, w in zip(chain[:-1], chain[1:]):
        assert nxt.setdefault(u, w) == w, "the rig needs a chain without conflicting successors"
    hidden = -(-vocab // 8) * 8
    graphdef, params = init_params(_spec(vocab, hidden), mesh, seed=0)
    flat = {k: np.asarray(v) for k, v in flat_params(params).items()}
    flat["embed"] = np.eye(vocab, hidden, dtype=np.float32)  # RMSNorm turns e_v into sqrt(H) e_v
    for k in flat:
        if k.endswith(("o_proj.kernel", "down_proj.kernel")):
            flat[k] = np.zeros_like(flat[k])
    head = np.zeros((hidden, vocab), np.float32)
    for u, w in nxt.items():
        head[u, w] = 30.0 / np.sqrt(hidden)
    flat["lm_head.kernel"] = head
    shardings = {k: v.sharding for k, v in flat_params(params).items()}
    return graphdef, params_from_flat(params, {k: jax.device_put(v, shardings[k]) for k, v in flat.items()})


def _answer_chain(tokenizer, item: tasks.EvalItem, answer: str) -> list[int]:
    """Last prompt token, then the answer's tokens and end-of-turn marker as training masks them."""
    prompt_last = tasks.generation_prompts([item], tokenizer, 10_000)[0][-1]
    ids, mask = tok_lib.encode(tokenizer, [item.prompt + [{"role": "assistant", "content": answer}]])[0]
    return [prompt_last] + ids[mask == 1].tolist()


MC_ITEMS = [tasks.EvalItem([{"role": "user", "content": f"Which colour is grass? ({i})"}], "green",
                           ["red", "green", "blue"]) for i in range(5)]


@pytest.mark.parametrize("favoured,expected", [("green", 1.0), ("blue", 0.0)])
def test_multiple_choice_accuracy_of_a_rigged_model(tokenizer, mesh, favoured, expected):
    graphdef, params = bigram_model(len(tokenizer), _answer_chain(tokenizer, MC_ITEMS[0], favoured), mesh)
    logprob = make_logprob_fn(graphdef, params, mesh, tokenizer.pad_token_id, 16)
    res = tasks.score_mc(MC_ITEMS, tokenizer, SEQ_LEN, logprob)
    assert res["examples"] == 5
    assert res["acc"] == expected and res["acc_norm"] == expected


EM_ITEMS = [tasks.EvalItem([{"role": "user", "content": f"What is 17 plus 18? ({i})"}], ref)
            for i, ref in enumerate(["35", "35.0", "$35", " 35 "])]


@pytest.mark.parametrize("favoured,expected", [("35", 1.0), ("36", 0.0)])
def test_exact_match_of_a_rigged_model_through_kv_cache_decoding(tokenizer, mesh, favoured, expected):
    chain = _answer_chain(tokenizer, EM_ITEMS[0], favoured)
    graphdef, params = bigram_model(len(tokenizer), chain, mesh)
    gen = make_generate_fn(graphdef, params, mesh, tokenizer, tokenizer.pad_token_id, 8, 8)
    res = tasks.score_exact_match(EM_ITEMS, tokenizer, gen, SEQ_LEN)
    assert [s["prediction"].strip() for s in res["samples"]] == [favoured] * 3
    assert res["exact_match"] == expected


def test_bucket_loss_equals_a_direct_computation(tokenizer, mesh, tmp_path):
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    graphdef, params = init_params(_spec(vocab, 32), mesh, seed=1)
    examples = []
    for n in (9, 14, 20, 11, 17, 6, 25):
        ids = rng.integers(0, vocab, n).astype(np.int32)
        mask = (rng.random(n) < 0.6).astype(np.uint8)
        mask[-1] = 1
        examples.append((ids, mask))
    store = TokenStore.write(tmp_path / "s", examples)
    buckets = np.array([0, 2, 1, 0, 2, 2, 1])
    res = heldout_loss(make_example_nll_fn(graphdef, mesh), params, [store], ["s"], mesh, SEQ_LEN,
                       tokenizer.pad_token_id, 100, 8, [buckets], 3)["s"]

    from flax import nnx

    # one unpadded forward per example, on one device (op by op on the mesh took minutes)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    host = jax.device_put(jax.device_get(params), jax.devices()[0])
    tok_sum, tok_cnt = np.zeros(3), np.zeros(3)
    for (ids, mask), b in zip(examples, buckets):
        logits = np.asarray(forward(host, ids[None, :-1]))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        tok_sum[b] += (nll * mask[1:]).sum()
        tok_cnt[b] += mask[1:].sum()
    np.testing.assert_allclose(res["bucket_loss"], tok_sum / tok_cnt, rtol=2e-5)
    np.testing.assert_allclose(res["loss"], tok_sum.sum() / tok_cnt.sum(), rtol=2e-5)


def test_bucket_losses_marks_empty_buckets():
    out = bucket_losses(np.array([1.0, 3.0]), np.array([1.0, 3.0]), np.array([0, 0]), 2)
    assert out == [2.5, None]


LETTERED = [{"messages": [{"role": "user", "content": f"Which colour is grass? ({i})\nA. red\nB. green\nC. blue"},
                          {"role": "assistant", "content": "[B]"}]} for i in range(4)]


@pytest.mark.parametrize("favoured,expected", [("[B]", 1.0), ("[C]", 0.0)])
def test_lettered_options_in_plain_chat_are_scored_by_option_likelihood(tokenizer, mesh, tmp_path, favoured,
                                                                         expected):
    path = tmp_path / "x.eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LETTERED))
    items = tasks.read_eval_items(path)
    assert tasks.choose_metric("auto", items, 40) == "mc"
    graphdef, params = bigram_model(len(tokenizer), _answer_chain(tokenizer, items[0], favoured), mesh)
    logprob = make_logprob_fn(graphdef, params, mesh, tokenizer.pad_token_id, 16)
    res = tasks.score_mc(items, tokenizer, SEQ_LEN, logprob)
    assert res["examples"] == 4 and res["acc"] == expected
