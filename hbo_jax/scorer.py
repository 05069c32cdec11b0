"""The model that scores difficulty when a mixture is prepared, and data preparation with it.

With a pretrained `model.init` the model itself scores, as in the paper; otherwise a tiny
model is warmed up on the uniform mixture for `scorer.warmup_steps` (the demo's stand-in
for a base model, which a run may then start from). Warming up is training (an
optimizer, the train step, a sampler over the mixture), so it lives here, above the data
layer: `hbo_jax.data.prepare` takes the scoring model as an argument, and `prepare`
below passes the run's.
"""

from __future__ import annotations

import logging

import numpy as np

from hbo_jax.config import Config
from hbo_jax.data import prepare as prepare_lib
from hbo_jax.data.prepare import PreparedData, ScoringModel
from hbo_jax.data.sampler import HierarchicalSampler, ProbabilitySchedule, batch_iterator
from hbo_jax.model_init import is_pretrained
from hbo_jax.models.llama import LlamaSpec, init_params
from hbo_jax.models.pretrained import load_pretrained
from hbo_jax.parallel import global_batch_from_host, host_slice
from hbo_jax.progress import progress
from hbo_jax.step import init_train_state, make_example_nll_fn, make_optimizer, make_train_step, state_shardings

log = logging.getLogger(__name__)


def warm_up(cfg: Config, stores, pad_id: int, vocab: int, mesh):
    """Trains the scoring model for `scorer.warmup_steps` on the uniform mixture.

    Returns:
        (graphdef, params, the loss of every step).
    """
    spec = LlamaSpec.from_config(cfg.model, vocab_size=vocab)
    graphdef, params = init_params(spec, mesh, cfg.train.seed)
    sc = cfg.scorer
    tx = make_optimizer(sc.learning_rate, sc.warmup_steps, min(10, sc.warmup_steps // 5), 0.0, 1.0)
    state = init_train_state(params, tx, mesh)
    d = len(stores)
    step = make_train_step(graphdef, tx, mesh, d, state_shardings(state))
    leaves = [[np.arange(len(s))] for s in stores]
    # train.seed, never the data seed: the scorer decides the buckets (and the prepared key).
    sampler = HierarchicalSampler(leaves, sc.batch_size, cfg.train.seed + 1,
                                  ProbabilitySchedule(np.ones(d), np.ones((d, 1))))
    it = batch_iterator(sampler, stores, cfg.data.seq_len, pad_id, host_slice(sc.batch_size))
    losses = []
    bar = progress(range(sc.warmup_steps), desc="warming up scorer")
    for _ in bar:
        state, m = step(state, global_batch_from_host(next(it), mesh))
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{float(m['loss']):.3f}")
        losses.append(m["loss"])
    return graphdef, state.params, [float(x) for x in losses]


def scoring_model(cfg: Config, mesh) -> ScoringModel:
    """The `prepare.ScoringModel` of the run: the pretrained model, else the warmed-up tiny model."""

    def build(stores, pad_id: int, vocab: int):
        if is_pretrained(cfg.model.init):  # the base model scores, as in the paper
            log.info("scoring with the pretrained model %s", cfg.model.init)
            graphdef, params, _ = load_pretrained(cfg.model.init, mesh, cfg.model)
            warm = []
        else:
            graphdef, params, warm = warm_up(cfg, stores, pad_id, vocab, mesh)
        return graphdef, params, make_example_nll_fn(graphdef, mesh), warm

    return build


def prepare(cfg: Config, mesh) -> PreparedData:
    """Prepares (or reuses) the mixture described by `cfg.data`, scored by the run's scoring model."""
    return prepare_lib.prepare(cfg, mesh, scoring_model(cfg, mesh))
