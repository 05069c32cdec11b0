"""`python -m hbo_jax.merge`: merge runs of one base model, by weighted average or by
parameter selection (Ju et al., EMNLP 2024), into a Hugging Face directory.

    python -m hbo_jax.merge --models runs/r0 runs/r1 runs/r2 --method select --resample --out merged

Inputs are run directories (latest checkpoint, or `--step`), Hugging Face directories
(sharded or not) or GGUF files; `--base` defaults to what the first run's `model.init`
names. Parameter selection takes every element from one model, drawn with `--probs`
(default uniform); `--resample` redraws an element whose drawn model left it at the base
value among the models that changed it (`--atol`: equality tolerance, 0 = exact in the
stored dtype). The draws depend only on `--seed`, the tensor's name and the element's
position (`hbo_jax.merging.select`): the same seed gives the same bytes whatever the
inputs' sharding or block size. The merge streams (`hbo_jax.merging.stream`): at most
~0.5 GB of blocks in flight whatever K, not K models. The output (safetensors, sharded
above `--max-shard-size`, config.json, tokenizer with its chat template, and merge.json
with the inputs' digests, the settings and per-tensor statistics) appears only when
complete and loads with `transformers` and `python -m hbo_jax.evaluate RUN --model hf:OUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hbo_jax.errors import ConfigError
from hbo_jax.merging import select as sel
from hbo_jax.merging.inputs import Input, check_inputs, open_input, run_base
from hbo_jax.merging.stream import no_cyclic_gc, stream_merge

METHODS = ("average", "select")
MERGE_JSON = "merge.json"


@no_cyclic_gc()  # from the inputs' opening on (stream_merge's own covers merge_inputs)
def merge(base: str | Path | None, models: list[str | Path], out_dir: str | Path, *, method: str = "select",
          probs=None, resample: bool = False, seed: int = 0, atol: float = 0.0, step: int | None = None,
          max_shard_bytes: int | None = None, overwrite: bool = False, block_bytes: int | None = None,
          progress: bool | None = None) -> dict:
    """Merges `models` (paths or sources, see `open_input`) into `out_dir`; returns merge.json's content.

    `base` None: the base of the first model when it is a run directory, else no base
    (average or plain selection only, without the equal-to-base statistics). `probs`
    are the selection probabilities or the averaging weights (normalised; default
    uniform); `step` picks the checkpoint of every run directory. The other arguments
    are `merge_inputs`'.
    """
    check_settings(method, resample, len(models), atol, seed)
    ins = [open_input(m, step) for m in models]
    if base is not None:
        b = open_input(base)
    elif (Path(str(models[0])) / "config.yaml").is_file():
        b = run_base(models[0])
    else:
        b = None
    try:
        return merge_inputs(b, ins, out_dir, method=method, probs=probs, resample=resample, seed=seed, atol=atol,
                            max_shard_bytes=max_shard_bytes, overwrite=overwrite, block_bytes=block_bytes,
                            progress=progress)
    finally:
        for i in [b, *ins]:
            if i is not None:
                i.reader.close()


def check_settings(method: str, resample: bool, k: int, atol: float, seed: int) -> None:
    """Raises ConfigError for settings that cannot merge; names the option."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: one of {METHODS}")
    if not 2 <= k <= sel.MAX_MODELS:
        raise ConfigError(f"--models: {k} model(s) given, a merge takes 2 to {sel.MAX_MODELS}")
    if resample and method != "select":
        raise ConfigError("--resample applies to --method select only")
    if not atol >= 0:
        raise ConfigError(f"--atol {atol}: must be >= 0")
    if not 0 <= seed < 2 ** 63:
        raise ConfigError(f"--seed {seed}: must be in [0, 2**63)")


def merge_inputs(base: Input | None, models: list[Input], out_dir: str | Path, *, method: str = "select",
                 probs=None, resample: bool = False, seed: int = 0, atol: float = 0.0,
                 max_shard_bytes: int | None = None, overwrite: bool = False,
                 block_bytes: int | None = None, progress: bool | None = None) -> dict:
    """Merges opened inputs into `out_dir` (see the module docstring); returns merge.json's content.

    Raises:
        ConfigError: Unusable settings (`check_settings`), or resampling without a base.
        CheckpointMismatch: A named mismatch between the inputs (`inputs.check_inputs`);
            nothing is written.
        FileExistsError: `out_dir` exists and not `overwrite`.
    """
    from hbo_jax.models.hf import write_hf_metadata
    from hbo_jax.models.safetensors_writer import SafetensorsWriter

    check_settings(method, resample, len(models), atol, seed)
    if resample and base is None:
        raise ConfigError("--resample needs --base (the model the runs started from)")
    try:
        p = sel.normalise(probs, len(models), "--probs" if method == "select" else "--weights")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tensors, cast = check_inputs(base, models)
    per_tensor: dict[str, dict] = {}
    total = sel.BlockStats()

    pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="merge")  # numpy releases the GIL

    def merge_block(name, start, blocks, b):
        if method == "average":
            return sel.average_block(blocks, p, b, atol, pool=pool)
        return sel.select_block(blocks, b, p, sel.tensor_key(seed, name), start, resample=resample, atol=atol,
                                pool=pool)

    def on_tensor(name, stats):
        t = sel.BlockStats()
        for s in stats:
            t.add(s)
        total.add(t)
        per_tensor[name] = t.as_json(resample)

    stored = str(tensors[0].dtype) if tensors else "float32"
    config = {**models[0].config, "dtype": stored}
    if "torch_dtype" in config:
        config["torch_dtype"] = stored
    tokenizer = next((i.tokenizer for i in [*models, base] if i is not None and i.tokenizer is not None), None)
    with pool, SafetensorsWriter(out_dir, tensors, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        if method == "select":  # once nothing stops the merge from starting
            sel.prepare_selection(len(models), resample, {t.dtype for t in tensors}, atol)
        digests, base_digest = stream_merge(tensors, [m.reader for m in models], base and base.reader, writer,
                                            merge_block, block_bytes=block_bytes, progress=progress,
                                            on_tensor=on_tensor)
        record = {
            "method": method, "resample": resample, "seed": seed, "atol": atol,
            "probs" if method == "select" else "weights": p.tolist(),
            "rng": "element i of the row-major tensor: the 32-bit word t(t((i mod 2**32) ^ k0) ^ k1), t the "
                   "triple32 hash (x ^= x >> 17; x *= 0xed5ad4bb; x ^= x >> 11; x *= 0xac4c1b51; x ^= x >> 15; "
                   "x *= 0x31848bab; x ^= x >> 14), (k0, k1) the first two little-endian uint32 of "
                   "d = sha256(seed as 8 little-endian bytes + tensor name), or of sha256(d + (i >> 32) as 8 "
                   "bytes) from i = 2**32 on; its upper 16 bits draw the model, its lower 16 the redraw "
                   "(probability resolution 2**-16)",
            "digest": "xxh3_128 over sorted lines 'name shape dtype xxh3_128(tensor bytes)' of the tensors read",
            "base": None if base is None else {"source": base.source, "step": base.step, "digest": base_digest,
                                               "cast_to_model_dtype_for_comparison": cast},
            "models": [{"source": m.source, "step": m.step, "digest": d} for m, d in zip(models, digests)],
            "dtype": stored, "totals": total.as_json(resample), "tensors": per_tensor,
        }
        write_hf_metadata(writer.staging_dir, config, tokenizer)
        (writer.staging_dir / MERGE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def main(argv: list[str] | None = None) -> int:
    from hbo_jax.cli import USER_ERRORS, setup_logging, use_compile_cache
    from hbo_jax.models.tensor_io import parse_size

    ap = argparse.ArgumentParser(prog="python -m hbo_jax.merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                    help="run directories, Hugging Face directories (hf:DIR or a path) or GGUF files")
    ap.add_argument("--base", help="the model the runs started from (default: the first run's model.init)")
    ap.add_argument("--method", choices=METHODS, default="select")
    ap.add_argument("--probs", "--weights", dest="probs", nargs="+", type=float, metavar="P",
                    help="selection probabilities (select) or weights (average), one per model; default uniform")
    ap.add_argument("--resample", action="store_true",
                    help="redraw elements left at the base value among the models that changed them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atol", type=float, default=0.0, help="equal to the base within this (default 0: exact)")
    ap.add_argument("--step", type=int, help="checkpoint step of the run directories (default: the latest)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                    help="split the weights into shards of at most SIZE (e.g. 5GB) with an index (default: one file)")
    ap.add_argument("--block-size", type=parse_size, metavar="SIZE",
                    help="bytes per block read from each input (memory ~ 4 (K+1) blocks; default 8MiB, "
                         "less for more than 15 models so that at most ~512MiB are in flight)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    setup_logging()
    # The selection's programs compile in ~0.06 s each, but a 135M merge lasts ~1 s and waits on
    # them at its start: kept, later merges of the same K and dtype start ~0.1 s sooner.
    use_compile_cache(min_compile_seconds=0.0)
    start = time.perf_counter()
    try:
        record = merge(args.base, args.models, args.out, method=args.method, probs=args.probs,
                       resample=args.resample, seed=args.seed, atol=args.atol, step=args.step,
                       max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, block_bytes=args.block_size)
    except (*USER_ERRORS, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = record["totals"]
    if "frac_equal_base" in t:
        print("fraction of elements equal to the base, per model: "
              + ", ".join(f"{x:.4f}" for x in t["frac_equal_base"]))
    if record["resample"]:
        print(f"resampled: {t['frac_resampled']:.4f}, kept the base: {t['frac_kept_base']:.4f}")
    print(f"merged {len(args.models)} models ({args.method}) into {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
