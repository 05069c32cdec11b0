"""One Orbax CheckpointManager over TrainState + MixerState + sampler state + metadata.

The three are saved together, so a resumed run continues the same batch stream and the
same policy. Saves are synchronous for now: the train step donates its state buffers,
and an async save must not read buffers a later step has donated (orbax#626).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def save(self, step: int, train_state, mixer_state, sampler_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave(train_state), mixer=ocp.args.StandardSave(mixer_state),
            sampler=ocp.args.JsonSave(sampler_state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, train_like, mixer_like) -> dict[str, Any]:
        """Restores into the shardings of the given example states."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(_abstract(train_like)),
            mixer=ocp.args.StandardRestore(_abstract(mixer_like)),
            sampler=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return {k: out[k] for k in ("train", "mixer", "sampler", "meta")}

    def restore_params(self, step: int, params_like, mesh):
        """Restores only the model parameters of a checkpoint (no optimizer state is read).

        Args:
            step: Checkpoint step.
            params_like: The model's parameter state, abstract or concrete; gives the tree
                structure, shapes and dtypes.
            mesh: Mesh the parameters are placed on (by their logical axis names).
        """
        from hbo_jax.parallel import tree_shardings

        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params_like, tree_shardings(params_like, mesh))
        item = {"params": target}
        out = self.manager.restore(step, args=ocp.args.Composite(train=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        return out["train"]["params"]

    def close(self) -> None:
        self.manager.close()
