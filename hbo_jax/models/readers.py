"""A run's checkpoint as a `TensorReader` (`RunReader`), and `open_reader`, which picks the
reader for any source: a run directory, a Hugging Face directory or safetensors file, a
GGUF file (`hbo_jax.models.tensor_io` has the reader interface).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hbo_jax.config import load_config
from hbo_jax.distributed import FRESH_LAUNCH
from hbo_jax.errors import CheckpointMismatch, ConfigError
from hbo_jax.model_init import is_pretrained, parse_init
from hbo_jax.models.base import base_spec
from hbo_jax.models.gguf import GgufReader
from hbo_jax.models.hf import name_map
from hbo_jax.models.llama import abstract_model
from hbo_jax.models.loading import VOCAB_AXES, flat_params, layer_entry
from hbo_jax.models.tensor_io import SafetensorsReader, TensorInfo, TensorReader


class RunReader(TensorReader):
    """The model parameters of a run directory's Orbax checkpoint, as export writes them.

    Our paths become Hugging Face names (`hf.name_map`), kernels `[out, in]`, padded
    vocabulary rows (`model.vocab_multiple`) are dropped, dtypes are as stored: the
    tensors of `python -m hbo_jax.export`, read on the host without a mesh or the
    optimizer state. Reads go through tensorstore with the spec Orbax builds to read a
    parameter (`ocp.type_handlers.get_json_tspec_read`), so a row block reads only the
    storage chunks it overlaps (of a transposed kernel: a column block).

    Args:
        run_dir: A run directory (config.yaml, checkpoints/).
        step: Checkpoint step; default the latest.
        vocab_size: The run's tokenizer length; needed only by a model trained from
            scratch with a padded vocabulary (else the base's config or the stored
            embedding rows give it).

    Attributes:
        cfg: The run's Config.
        step: The checkpoint step read.
        spec: The model's LlamaSpec (the base model's, `models.base.base_spec`).

    Raises:
        ConfigError: Not a run directory, no such checkpoint, or a pretrained base
            (`model.init`) no longer at its path (its config gives the shapes).
        CheckpointMismatch: A parameter is missing, unexpected or of another shape than
            the run's model has; named.
        ValueError: `vocab_size` is needed and not given.
    """

    def __init__(self, run_dir: str | Path, step: int | None = None, *, vocab_size: int | None = None):
        import orbax.checkpoint as ocp
        from flax import traverse_util


        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
        # FRESH_LAUNCH: not the run's cluster; its paths are as the run was given them
        self.cfg = cfg = load_config(run_dir / "config.yaml", list(FRESH_LAUNCH), paths_from_file=False)
        steps = sorted(ocp.utils.checkpoint_steps(run_dir / "checkpoints"))
        if step is None and not steps:
            raise ConfigError(f"{run_dir / 'checkpoints'}: no checkpoint found")
        if step is not None and step not in steps:
            raise ConfigError(f"{run_dir / 'checkpoints'}: no checkpoint at step {step} (steps: {steps})")
        self.step = steps[-1] if step is None else step
        train_dir = run_dir / "checkpoints" / str(self.step) / "train"
        self.where = str(train_dir)
        tree = ocp.PyTreeCheckpointHandler().metadata(train_dir)  # shapes and dtypes, no data
        flat = traverse_util.flatten_dict(tree.tree.get("params", {}), sep=".")  # nnx leaves: {"value": ...}
        stored = {path.removesuffix(".value"): md for path, md in flat.items()}
        m = cfg.model
        if vocab_size is None and not is_pretrained(m.init) and not m.vocab_size:
            if "embed" not in stored:
                raise CheckpointMismatch(f"{train_dir}: parameter 'embed' is missing")
            vocab_size = stored["embed"].shape[0]
            if m.vocab_multiple > 1:
                raise ValueError(f"{run_dir}: model.vocab_multiple={m.vocab_multiple} pads the vocabulary to "
                                 f"{vocab_size} rows; pass vocab_size (the length of the run's tokenizer)")
        self.spec = spec = base_spec(cfg, vocab_size)
        want = flat_params(abstract_model(spec)[1])
        extra = sorted(set(stored) - set(want))
        if extra:
            raise CheckpointMismatch(f"{train_dir}: unexpected parameter {extra[0]!r} (and {len(extra) - 1} more)")
        for path, abstract in want.items():
            if path not in stored:
                raise CheckpointMismatch(f"{train_dir}: parameter {path!r} is missing")
            if tuple(stored[path].shape) != tuple(abstract.shape):
                raise CheckpointMismatch(f"{train_dir}: parameter {path!r} has shape {tuple(stored[path].shape)}, "
                                         f"the run's model expects {tuple(abstract.shape)}")
        self._params, self._infos, self._open = {}, {}, {}
        for path, (hf_name, transposed) in name_map(spec).items():
            md, layer = layer_entry(stored, path)  # stacked blocks (model.scan_layers): one layer of md
            shape = list(md.shape[1:] if layer is not None else md.shape)
            if path in VOCAB_AXES:
                shape[VOCAB_AXES[path]] = spec.vocab_size  # the padding rows are dropped
            self._params[hf_name] = (md.name, tuple(shape), transposed, layer)
            self._infos[hf_name] = TensorInfo(hf_name, shape[::-1] if transposed else shape, md.dtype)
        self._dir = train_dir
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(train_dir)
        self._zarr3 = tree.use_zarr3
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)

    def _array(self, orbax_name: str):
        if orbax_name not in self._open:
            import orbax.checkpoint as ocp
            import tensorstore as ts
            from etils import epath

            info = ocp.type_handlers.ParamInfo(name=orbax_name, parent_dir=epath.Path(self._dir),
                                               is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._open[orbax_name] = ts.open(spec, context=self._context, open=True, read=True).result()
        return self._open[orbax_name]

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        orbax_name, shape, transposed, layer = self._params[name]
        index = [slice(0, n) for n in shape]  # our layout, without vocabulary padding
        if rows is not None:
            index[-1 if transposed else 0] = rows
        if layer is not None:
            index.insert(0, layer)
        out = self._array(orbax_name)[tuple(index)].read().result()
        return np.ascontiguousarray(out.T) if transposed else out

    def close(self) -> None:
        self._open.clear()


def open_reader(source: str | Path, *, step: int | None = None, vocab_size: int | None = None) -> TensorReader:
    """The reader for `source`.

    Args:
        source: `hf:<dir>`, `gguf:<file>`, `smollm2` (as `model.init` names them), or a
            path: a run directory (with config.yaml), a `.gguf` file, a Hugging Face
            directory or a `.safetensors` file.
        step: For a run directory: the checkpoint step (default the latest).
        vocab_size: For a run directory: see `RunReader`.
    """
    text = str(source)
    if text == "smollm2" or text.startswith(("hf:", "gguf:")):
        kind, path = parse_init(text)
    else:
        path = Path(text).expanduser()
        kind = "run" if (path / "config.yaml").is_file() else "gguf" if path.suffix == ".gguf" else "hf"
    if kind == "run":
        return RunReader(path, step, vocab_size=vocab_size)
    if kind == "gguf":
        return GgufReader(path)
    return SafetensorsReader(path)
