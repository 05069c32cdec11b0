"""`python -m hbo_jax.export RUN_DIR OUT_DIR`: a run's checkpoint as a Hugging Face directory.

The directory (config.json, model.safetensors, tokenizer with its chat template) loads
with `transformers.AutoModelForCausalLM.from_pretrained`, serves with vLLM, and comes
back into hbo_jax as `model.init=hf:OUT_DIR` or `python -m hbo_jax.evaluate RUN_DIR
--model hf:OUT_DIR`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_run(run_dir: Path, out_dir: Path, step: int | None = None, dtype: str | None = None,
               overrides: list[str] = (), *, max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Exports the checkpoint at `step` (default: the latest) of a run; returns out_dir.

    On several hosts every process runs this (with `distributed.*` overrides or an
    auto-detected cluster): the gathers are collective and process 0 writes.
    `max_shard_bytes` and `overwrite` are `export_hf`'s.
    """
    from hbo_jax.config import load_config
    from hbo_jax.distributed import FRESH_LAUNCH, initialize
    from hbo_jax.errors import ConfigError
    from hbo_jax.evaluate import load_model
    from hbo_jax.models.safetensors_writer import check_output_dir
    from hbo_jax.parallel import make_mesh
    from hbo_jax.scorer import prepare

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", [*FRESH_LAUNCH, *overrides], paths_from_file=False)
    initialize(cfg.distributed)
    # Before any loading, on every process (on storage all hosts see, all stop alike);
    # process 0's writer checks again when it publishes the directory.
    check_output_dir(out_dir, overwrite)
    mesh = make_mesh(cfg.mesh)
    data = prepare(cfg, mesh)  # the run's tokenizer (cached: nothing is recomputed)
    graphdef, params = load_model("checkpoint", cfg, data, mesh, run_dir, step)
    return export_model(cfg, graphdef, params, data.tokenizer, out_dir, dtype, max_shard_bytes=max_shard_bytes,
                        overwrite=overwrite)


def export_model(cfg, graphdef, params, tokenizer, out_dir: Path, dtype: str | None = None, *,
                 max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Writes a run's model (`nnx.merge(graphdef, params)`) as a Hugging Face directory.

    The context length and RoPE settings are those of the model's spec: a fine-tune of
    a pretrained model (`model.init` hf:, gguf:, smollm2) declares its base model's,
    as `load_pretrained` read them from its config.json or GGUF metadata.

    Args:
        cfg: The run's Config.
        graphdef: The model's graph (carries the spec).
        params: The model's `nnx.Param` state.
        tokenizer: The run's tokenizer (saved with the weights), or None.
        out_dir: Output directory (created).
        dtype: Stored dtype; default the params'.
        max_shard_bytes: Shard the weights above this size (with an index); None: one file.
        overwrite: Replace an existing, non-empty out_dir (refused otherwise).

    Returns:
        out_dir.
    """
    from flax import nnx

    from hbo_jax.models.hf import export_hf

    spec = nnx.merge(graphdef, params).spec
    # Only a model trained from scratch (model.init=scorer|random) has no base model's
    # context length: it declares the training length, at least 2048 (RoPE has no hard
    # limit, and servers such as vLLM refuse prompts longer than the declared context).
    return export_hf(params, spec, tokenizer, out_dir, dtype=dtype,
                     max_position_embeddings=max(cfg.data.seq_len, 2048), max_shard_bytes=max_shard_bytes,
                     overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    from hbo_jax.cli import USER_ERRORS, setup_logging
    from hbo_jax.models.tensor_io import parse_size

    ap = argparse.ArgumentParser(prog="python -m hbo_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="stored dtype (default: as trained)")
    ap.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                    help="split the weights into shards of at most SIZE (e.g. 5GB) with an index (default: one file)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. distributed.* flags or mesh.*")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        out = export_run(args.run_dir, args.out_dir, args.step, args.dtype, args.overrides,
                         max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    except (*USER_ERRORS, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        print(f"exported {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
