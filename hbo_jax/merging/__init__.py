"""Merging runs of one base model: the per-element rules (`select`), the inputs and their
checks (`inputs`), the streaming engine (`stream`); `python -m hbo_jax.merge` drives them.
"""
