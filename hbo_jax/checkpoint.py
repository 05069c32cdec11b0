"""One Orbax CheckpointManager over a training method's named state trees + sampler + metadata.

They are saved together, so a resumed run continues the same batch stream and the
same policy. What protects a run:

- A save is written under a temporary name and renamed when complete (Orbax), so a
  half-written save never replaces the last good one; `keep` old ones are kept and the
  oldest is only deleted after a newer one is committed.
- After every save, process 0 writes `hbo_manifest.json` into the step directory: the
  size of every file and the CRC32 of those up to 64 MiB (metadata, JSON, small arrays;
  reading back every byte of a multi-GB checkpoint after each save would cost more than
  it protects). On resume each candidate is checked against it, newest first; a
  truncated, missing or altered file (or a missing manifest) moves the step to
  `<checkpoints>.corrupt/` and the previous complete one is used, with a warning.
  Directories written before manifests existed (none has one) are trusted as Orbax
  committed them.
- `check_resume_config` refuses a resume whose configuration would not continue the
  same run (data, model, mixture, batch size, seed, ...), naming the key.

Saves are synchronous by default. The train step donates its state buffers, and an
asynchronous save must not read buffers a later step has donated (orbax#626); with
`asynchronous=True` (`train.async_checkpoint`) the state is first copied on its devices
(one extra copy of parameters + optimizer state in device memory while a save runs) and
written in the background; its manifest follows once the write has finished, so a save
cut short by a crash is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from hbo_jax.config import resolve_data_seed
from hbo_jax.config_keys import (RESUME_FREE, RESUME_NEVER, RESUME_SECTIONS, RESUME_WARN, flatten, is_input_path,
                                  matches)
from hbo_jax.errors import ConfigError
from hbo_jax.parallel import tree_shardings

_DATA_SEED = "train.data_seed"  # compared by its resolved value (check_resume_config)

log = logging.getLogger(__name__)

MANIFEST = "hbo_manifest.json"
_CRC_MAX_BYTES = 64 << 20  # larger files: size only

def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> dict[str, list[int]]:
    """relative path -> [size, crc32] for every file under a step directory but the manifest."""
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            out[str(p.relative_to(step_dir))] = [size, _crc32(p) if size <= _CRC_MAX_BYTES else None]
    return out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Saves and restores (train, mixer, sampler, meta) checkpoints under one directory.

    Args:
        directory: Where the step directories go (`<run_dir>/checkpoints`).
        keep: How many complete checkpoints to keep (the newest ones).
    """

    def __init__(self, directory: str | Path, keep: int, asynchronous: bool = False):
        self.directory = Path(directory).absolute()
        self.asynchronous = asynchronous
        self._unsealed: int | None = None  # an async save whose manifest is not written yet
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=asynchronous))

    def save(self, step: int, trees: dict[str, Any], sampler_state: dict, meta: dict) -> float:
        """Saves one step (all processes call it); returns the seconds the caller was blocked.

        Args:
            step: The step number (the checkpoint's name).
            trees: Named PyTrees of device arrays (a training method's state: `train`,
                and e.g. `mixer`).
            sampler_state: The sampler's JSON state.
            meta: JSON metadata (config, evaluation before training, host-side sums).

        Asynchronous saves copy the state on its devices first, so the next (donating)
        train step never frees a buffer the background writer still reads; the manifest
        of such a save is written once it has finished (`wait`, the next save, `close`).
        """
        t0 = time.perf_counter()
        self.wait()  # one save in flight at a time; seals the previous one
        if self.asynchronous:
            trees = jax.tree.map(lambda x: x.copy(), trees)
        if set(trees) & {"sampler", "meta"}:
            raise ValueError(f"state names {sorted(trees)} clash with the checkpoint's own items")
        self.manager.save(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in trees.items()},
            sampler=ocp.args.JsonSave(sampler_state), meta=ocp.args.JsonSave(meta)))
        self._unsealed = step
        if not self.asynchronous:
            self.wait()
        return time.perf_counter() - t0

    def wait(self) -> None:
        """Waits for a save in flight (errors surface here) and writes its manifest."""
        self.manager.wait_until_finished()
        if self._unsealed is not None:
            self._seal(self._unsealed)
            self._unsealed = None

    def _seal(self, step: int) -> None:
        if jax.process_index() == 0:
            step_dir = self.directory / str(step)
            manifest = {"step": step, "files": _files(step_dir)}
            tmp = step_dir / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, step_dir / MANIFEST)  # the manifest itself appears whole or not at all
        _barrier(f"hbo_ckpt_manifest_{step}")

    def latest_step(self) -> int | None:
        """The newest committed step (after any save in flight has finished)."""
        self.wait()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.wait()
        return sorted(self.manager.all_steps())

    def verify(self, step: int) -> str | None:
        """Checks a step against its manifest; returns what is wrong, or None when complete."""
        step_dir = self.directory / str(step)
        try:
            manifest = json.loads((step_dir / MANIFEST).read_text())
        except FileNotFoundError:
            return f"{MANIFEST} is missing (the save did not finish)"
        except (OSError, ValueError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        for rel, (size, crc) in manifest["files"].items():
            p = step_dir / rel
            if not p.is_file():
                return f"{rel} is missing"
            if p.stat().st_size != size:
                return f"{rel} is truncated or altered ({p.stat().st_size} bytes, expected {size})"
            if crc is not None and _crc32(p) != crc:
                return f"{rel} is corrupt (checksum mismatch)"
        return None

    def quarantine(self, step: int, reason: str) -> Path:
        """Moves a bad step out of the manager's sight (kept for inspection, never deleted)."""
        dest = self.directory.with_name(self.directory.name + ".corrupt") / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
            (dest.parent / f"{dest.name}.reason.txt").write_text(reason + "\n")
        _barrier(f"hbo_ckpt_quarantine_{step}")
        self.manager.reload()
        return dest

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def find_resumable(self) -> tuple[int, dict] | None:
        """The newest complete checkpoint as (step, meta), quarantining incomplete newer ones.

        Every problem is logged with the step it falls back to; None when no complete
        checkpoint exists (the run starts from scratch).
        """
        if jax.process_index() == 0:  # a save interrupted before its commit (Orbax's temporary name)
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                log.warning("removing %s: a save that never completed", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier("hbo_ckpt_tmp_cleanup")
        legacy = not any((self.directory / str(s) / MANIFEST).is_file() for s in self.all_steps())
        for step in reversed(self.all_steps()):
            problem = None if legacy else self.verify(step)
            meta = None
            if problem is None:
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # noqa: BLE001 - any unreadable metadata means: not usable
                    problem = f"metadata unreadable ({type(e).__name__}: {e})"
            if problem is None:
                return step, meta
            older = [s for s in self.all_steps() if s < step]
            dest = self.quarantine(step, problem)
            log.warning("checkpoint step %d in %s is incomplete: %s; moved to %s; falling back to %s",
                        step, self.directory, problem, dest,
                        f"step {older[-1]}" if older else "a fresh start (no older checkpoint)")
        return None

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """Restores the named trees into the shardings of `like` (any mesh: resharded on read).

        A checkpoint written before the optimizer counted non-finite updates holds the
        bare AdamW chain as its `train` optimizer state; it is read into the current
        state's `inner_state`, with the counters at zero (those of `like["train"]`).

        Returns:
            {"trees": {name: tree}, "sampler": dict, "meta": dict}.
        """
        train_like = like.get("train")
        legacy = self._without_nonfinite_counters(step, train_like)
        targets = dict(like)
        if legacy:
            targets["train"] = train_like.replace(opt_state=train_like.opt_state.inner_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(_abstract(tree)) for name, tree in targets.items()},
            sampler=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        trees = {name: out[name] for name in like}
        if legacy:
            log.info("checkpoint step %d predates the non-finite update counters; they start at 0", step)
            trees["train"] = trees["train"].replace(opt_state=train_like.opt_state._replace(
                inner_state=trees["train"].opt_state))
        return {"trees": trees, "sampler": out["sampler"], "meta": out["meta"]}

    def _without_nonfinite_counters(self, step: int, train_like) -> bool:
        """Whether `train_like` counts non-finite updates (optax.ApplyIfFiniteState) and the checkpoint does not."""
        import optax

        if not isinstance(getattr(train_like, "opt_state", None), optax.ApplyIfFiniteState):
            return False
        saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "train")
        return not (isinstance(saved["opt_state"], dict) and "inner_state" in saved["opt_state"])

    def restore_params(self, step: int, params_like, mesh):
        """Restores only the model parameters of a checkpoint (no optimizer state is read).

        Args:
            step: Checkpoint step.
            params_like: The model's parameter state, abstract or concrete; gives the tree
                structure, shapes and dtypes.
            mesh: Mesh the parameters are placed on (by their logical axis names).
        """
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              params_like, tree_shardings(params_like, mesh))
        item = {"params": target}
        out = self.manager.restore(step, args=ocp.args.Composite(train=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        return out["train"]["params"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


def check_resume_config(saved: dict, current: dict, allow: bool, where: str,
                        same_inputs: Callable[[], bool | None] | None = None) -> list[str]:
    """Refuses a resume whose configuration would not continue the checkpointed run.

    `train.data_seed` is compared by its resolved value (-1 = train.seed), the value the
    sampler's stream is keyed by: -1 and the number train.seed has are the same run, so
    spelling the default out on resume is no change. A checkpoint written before the key
    existed drew its batches with train.seed, which is what -1 resolves to.

    Where the training files are read from (`config_keys.is_input_path`) is compared by
    content when `same_inputs` can tell: data moved to another folder continues the run,
    other data does not, even with `allow`.

    Args:
        saved: The configuration stored in the checkpoint (`to_dict(cfg)` at save time).
        current: The configuration of the run that resumes.
        allow: `train.allow_config_change`: report the changes as warnings instead.
        where: The checkpoint, for messages.
        same_inputs: Called (once) when an input path changed: whether the files now named
            have the checkpointed run's contents (None: unknown, the path is compared as text).

    Returns:
        The changes that were accepted (each a message), for the log.

    Raises:
        ConfigError: naming the first key whose change breaks exactness.
    """
    old, new = flatten(saved), flatten(current)
    for flat in (old, new):  # the sampler's stream uses the resolved data seed
        if "train.seed" in flat:
            flat[_DATA_SEED] = resolve_data_seed(flat["train.seed"], flat.get(_DATA_SEED, -1))
    notes, same = [], []
    # A key only one side knows is a version change. The data seed comes last, so a changed
    # train.seed (which moves a resolved -1 too) is named as itself.
    for key in sorted(old.keys() & new.keys(), key=lambda k: (k == _DATA_SEED, k)):
        if old[key] == new[key] or matches(key, RESUME_FREE) or not (key.startswith(RESUME_SECTIONS)
                                                                      or key in RESUME_NEVER):
            continue
        change = f"{key} changed from {old[key]!r} to {new[key]!r} since {where}"
        if is_input_path(key) and same_inputs is not None:
            if not same:
                same.append(same_inputs())
            if same[0]:
                notes.append(f"{change}: the files it names have the checkpointed run's contents (the prepared "
                             "data's key, a hash of their bytes, is the same), so the run continues")
                continue
            if same[0] is False:
                raise ConfigError(f"{change}, and the files it names are not the ones the checkpoint was trained "
                                  "on (the prepared data's key, a hash of their bytes, differs). Point it at the "
                                  "checkpointed run's data, or use a new run_dir")
        if key == _DATA_SEED:
            change += " (values resolved: -1 = train.seed)"
        if key in RESUME_WARN:
            notes.append(f"{change}: {RESUME_WARN[key]}")
        elif key in RESUME_NEVER:
            raise ConfigError(f"{change}; the checkpoint cannot continue with a different {key} "
                              "(state shapes or the batch stream depend on it). Use a new run_dir")
        elif allow:
            notes.append(f"{change} (allowed by train.allow_config_change=true; the resumed run "
                         "is no longer the exact continuation)")
        else:
            raise ConfigError(f"{change}; resuming would not continue the same run. Use a new run_dir, "
                              "or pass train.allow_config_change=true to resume anyway")
    return notes
