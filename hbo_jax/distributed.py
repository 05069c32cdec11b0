"""Multi-process runs: `jax.distributed` start-up, agreed stop requests, a per-process trace.

JAX's multi-controller runtime is the distributed engine: every host runs the same
program over its local devices, and arrays span all of them. This module only starts it
(`initialize`, called from `main`, never at import: Grain worker processes re-import
modules, grain#802), makes all processes agree on when to stop after a SIGTERM/SIGINT
(`StopRequest`), and optionally records what each process saw (`Trace`), so tests can
check that hosts hold the same mixer state and load disjoint slices of one global batch.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np

from hbo_jax.config import DistributedConfig
from hbo_jax.errors import ConfigError
from hbo_jax.records import dumps, truncate_after

log = logging.getLogger(__name__)


def detect_cluster(env: dict | None = None) -> str | None:
    """Names the multi-process launcher this process runs under, or None.

    Args:
        env: Environment to inspect (default: `os.environ`).
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if any(env.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "tpu"
    if env is os.environ:
        try:  # JAX's own probe (a Cloud TPU VM has its workers in the metadata server)
            from jax._src import cloud_tpu_init  # set when `import jax` found TPU chips + libtpu

            if cloud_tpu_init.running_in_cloud_tpu_vm:
                return "tpu"
        except Exception:  # noqa: BLE001 - a private module; absent means: not detected
            pass
    return None


# A run directory's config.yaml records how *that* run was launched (coordinator address,
# process id); a later command on the run (evaluate, export) starts from these instead
# and takes its own `distributed.*` flags.
FRESH_LAUNCH = ("distributed.mode=auto", "distributed.coordinator_address=''", "distributed.num_processes=0",
                "distributed.process_id=-1", "distributed.trace=false")


def initialize(cfg: DistributedConfig) -> bool:
    """Starts `jax.distributed` when the config or the environment asks for it.

    Must run before anything touches a JAX device. Explicit fields win over detection;
    JAX fills in what is left from the cluster environment (SLURM, Open MPI, TPU).

    Returns:
        Whether this is a multi-process run now.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if multiprocessing.parent_process() is not None:  # a Grain/data worker: never joins
        return False
    explicit = bool(cfg.coordinator_address or cfg.num_processes or cfg.process_id >= 0)
    cluster = detect_cluster()
    if cfg.mode == "off" or (cfg.mode == "auto" and not explicit and cluster is None):
        return False
    if cfg.coordinator_address and cluster is None and (cfg.num_processes <= 0 or cfg.process_id < 0):
        raise ConfigError("distributed.coordinator_address is set but no cluster was detected to supply the "
                          f"rest: set distributed.num_processes (now {cfg.num_processes}) and "
                          f"distributed.process_id (now {cfg.process_id}) too")
    if cfg.num_processes > 0 and not 0 <= cfg.process_id < cfg.num_processes and cluster is None:
        raise ConfigError(f"distributed.process_id={cfg.process_id} must be in [0, distributed.num_processes="
                          f"{cfg.num_processes})")
    # CPU processes need a cross-process collective implementation (harmless elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"initialization_timeout": cfg.initialization_timeout}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"distributed: jax.distributed.initialize failed ({e}); detected launcher: "
                          f"{cluster or 'none'}; set distributed.coordinator_address/num_processes/process_id "
                          "or distributed.mode=off") from None
    log.info("jax.distributed: process %d of %d (%s), %d local / %d global devices", jax.process_index(),
             jax.process_count(), cluster or "explicit flags", jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one (a collective when multi-process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class StopRequest:
    """SIGTERM/SIGINT ask the training loop to save and exit at the next step boundary.

    Used as a context manager around a run; the previous handlers come back on exit. A
    second signal restores them and re-raises, so a stuck run can still be killed.
    Outside the main thread (where Python cannot install handlers) it never fires.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # asked twice: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self.received_at = time.monotonic()
        log.warning("%s received: saving a checkpoint after the current step, then exiting "
                    "(send it again to stop at once)", self.signal_name)

    def should_stop(self) -> bool:
        """Whether any process was signalled; all processes get the same answer."""
        return any_process(self.signal_name is not None)

    def seconds_since(self) -> float:
        """Seconds since this process got the signal (0 when another process got it)."""
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


class Trace:
    """Per-process record of batch rows and mixer state (`distributed.trace=true`).

    Writes `<run_dir>/trace/process_<i>.jsonl`; a fresh run starts it anew, a run resuming
    from step `start` keeps the records up to it and appends (the steps after it, which an
    interrupted run may have traced, are traced again).
    """

    def __init__(self, run_dir: Path, enabled: bool, rows: slice, start: int):
        self.enabled = enabled
        self.rows = rows
        self.path = Path(run_dir) / "trace" / f"process_{jax.process_index()}.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start == 0:
                self.path.unlink(missing_ok=True)
            else:
                truncate_after(self.path, start)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(record) + "\n")

    def batch(self, step: int, host_batch: dict) -> None:
        """One digest per row of this process's slice of the global batch that trains `step`
        (counted from 1, as in metrics.jsonl)."""
        if self.enabled:
            ids, mask = host_batch["input_ids"], host_batch["loss_mask"]
            self._write({"step": step, "kind": "batch", "rows": [self.rows.start, self.rows.stop],
                         "digest": [_digest(ids[r], mask[r]) for r in range(len(ids))]})

    def mixer(self, step: int, mixer_state, probabilities) -> None:
        """A digest of this process's local copy of the (replicated) mixer state."""
        if self.enabled:
            leaves = [np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
                      for x in jax.tree.leaves(mixer_state)]
            pg, pl = probabilities
            self._write({"step": step, "kind": "mixer", "digest": _digest(*leaves),
                         "p_global": np.asarray(pg).tolist(), "p_local": np.asarray(pl).tolist()})
