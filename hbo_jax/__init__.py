"""hbo_jax: hierarchical data balancing (HBO) for fine-tuning LLMs on dataset mixtures, in JAX."""

import os

# transformers is used for tokenizers, configs and chat templates only; its notice that
# PyTorch is absent is expected here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
