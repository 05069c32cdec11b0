"""A warning when data.seq_len exceeds the context a pretrained model was trained with."""

import logging
from types import SimpleNamespace

from hbo_jax.models.base import warn_context


def test_a_sequence_longer_than_the_base_context_is_warned_about_once(caplog):
    spec = SimpleNamespace(max_position_embeddings=2048)
    with caplog.at_level(logging.WARNING, logger="hbo_jax.models.base"):
        warn_context(spec, 4096, "hf:/m/a")
        warn_context(spec, 4096, "hf:/m/a")
    assert len(caplog.records) == 1 and "2048-token context" in caplog.text and "data.seq_len=4096" in caplog.text


def test_no_warning_within_the_context_or_without_a_declared_one(caplog):
    with caplog.at_level(logging.WARNING, logger="hbo_jax.models.base"):
        warn_context(SimpleNamespace(max_position_embeddings=2048), 2048, "hf:/m/b")
        warn_context(SimpleNamespace(max_position_embeddings=None), 10**6, "hf:/m/c")
    assert not caplog.records
