"""Options scored against one prefilled prompt equal the same sequences scored whole."""

import jax
import numpy as np
import pytest

from hbo_jax import tasks
from hbo_jax.config import MeshConfig
from hbo_jax.data import tokenizer as tok_lib
from hbo_jax.data.scoring import score_examples
from hbo_jax.models.continuations import continuation_logprobs, shared_prefix
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import make_mesh
from hbo_jax.step import make_example_nll_fn

CORPUS = ["Which colour is grass? red green blue", "What is 17 plus 18? 35 36", "green and blue and red",
          "Pick the colour of the sea: blue", "The answer is green."] * 4
OPTIONS = ["red", "green", "blue", "green and blue", "35"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tok_lib.train_bpe(CORPUS, 300, tmp_path_factory.mktemp("tok") / "bpe")


def _model(vocab: int, mesh, scan: bool):
    spec = LlamaSpec(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=64, rope_theta=1e4, rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=False,
                     dtype="float32", param_dtype="float32", remat=False, scan_layers=scan)
    graphdef, params = init_params(spec, mesh, seed=3)
    # Sharper than the initialisation's near-uniform logits, so a token scored at the wrong
    # position or against the wrong option moves the sum far beyond the tolerance.
    return graphdef, jax.tree.map(lambda x: x * 6.0, params)


def _groups(tokenizer, seq_len: int):
    """Questions of growing prompts, their options encoded as score_mc encodes them."""
    rows = [tasks.EvalItem([{"role": "user", "content": f"Which colour is grass? ({i}) " + "red green blue " * i}],
                           "green", OPTIONS) for i in range(6)]
    return tasks.encode_options(rows, tokenizer, seq_len)


def _whole(graphdef, params, groups, mesh, seq_len, pad_id):
    flat = [e for g in groups for e in g]
    nll = score_examples(flat, make_example_nll_fn(graphdef, mesh), params, mesh, seq_len, pad_id, 16)
    lp = -nll * np.array([m[1:].sum() for _, m in flat])
    bounds = np.cumsum([0] + [len(g) for g in groups])
    return [lp[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("scan,shape", [(False, (8, 1, 1)), (True, (8, 1, 1)), (False, (2, 2, 2))])
def test_options_after_a_shared_prefill_equal_the_whole_sequences(tokenizer, scan, shape):
    mesh = make_mesh(MeshConfig(*shape))  # the 8 host devices; (2, 2, 2): parameters and kv heads sharded too
    graphdef, params = _model(len(tokenizer), mesh, scan)
    groups = _groups(tokenizer, 256)
    got = continuation_logprobs(graphdef, params, groups, mesh=mesh, pad_id=tokenizer.pad_token_id, batch_size=4)
    want = _whole(graphdef, params, groups, mesh, 256, tokenizer.pad_token_id)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-4)
    assert min(np.ptp(w) for w in want) > 1.0  # the options' scores are far apart: a mix-up would show


def test_prompts_cut_differently_for_options_of_different_lengths_still_score_exactly(tokenizer):
    mesh = make_mesh(MeshConfig())
    graphdef, params = _model(len(tokenizer), mesh, False)
    groups = _groups(tokenizer, 24)  # every sequence cut from the left: the options' prompts differ
    assert any(shared_prefix(g) == 0 for g in groups)
    got = continuation_logprobs(graphdef, params, groups, mesh=mesh, pad_id=tokenizer.pad_token_id, batch_size=8)
    for g, w in zip(got, _whole(graphdef, params, groups, mesh, 24, tokenizer.pad_token_id)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-4)


def test_the_shared_prefix_stops_at_the_first_scored_token():
    a = (np.array([5, 6, 7, 8, 9]), np.array([0, 0, 0, 1, 1]))
    b = (np.array([5, 6, 7, 8, 4]), np.array([0, 0, 0, 1, 1]))  # shares 8, but 8 is scored
    c = (np.array([5, 6, 3, 8]), np.array([0, 0, 1, 1]))
    assert shared_prefix([a, b]) == 3 and shared_prefix([a, b, c]) == 2
    assert shared_prefix([(np.array([1, 2, 3]), np.array([0, 0, 0]))]) == 2  # nothing scored: all but one token


def test_multiple_choice_scores_the_same_through_the_shared_prefill(tokenizer):
    mesh = make_mesh(MeshConfig())
    graphdef, params = _model(len(tokenizer), mesh, False)
    items = [tasks.EvalItem([{"role": "user", "content": "Which colour is grass?"}], o, OPTIONS) for o in OPTIONS]
    res = tasks.score_mc(items, tokenizer, 256, lambda groups: _whole(graphdef, params, groups, mesh, 256,
                                                                      tokenizer.pad_token_id))
    shared = tasks.score_mc(items, tokenizer, 256, lambda groups: continuation_logprobs(
        graphdef, params, groups, mesh=mesh, pad_id=tokenizer.pad_token_id, batch_size=8))
    assert res == shared and res["examples"] == len(OPTIONS)
