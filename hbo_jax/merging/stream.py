"""Streams a merge: one block of rows of one tensor from every input at a time.

Each input has its own reader thread that reads the blocks in the merge's order
(`TensorReader.stream_blocks`: O_DIRECT for safetensors files, around the page cache,
whose filling and copying cost more CPU than anything but the selection; neighbouring
small blocks in one read of up to a block's size), hashes them
(the input's digest in merge.json: XXH3-128, 0.02 ns of CPU per byte where sha256 took
0.55, the largest single cost of a merge at 4.4 ns per element at K = 3; a digest
identifies the inputs, it is no defence against crafted files) and hands them over
through a queue of `PREFETCH` blocks; `DEPTH` blocks of all K models (+ the base) are
merged at once, and written in order while the readers fetch the next ones. Memory is at
most (K+1) x (PREFETCH+2+DEPTH) reads of at most a block's size (queued, being read, being
taken, being merged: a read's buffer lives while any of its blocks does) plus DEPTH+1
output blocks (being merged, being written), whatever the model size; `block_bytes` sets
the block (a tensor smaller than it is one block), by default `auto_block_bytes`: 8 MiB,
smaller when more inputs would put over `IN_FLIGHT_BYTES` in flight, so memory does not
grow with K. The output goes through `safetensors_writer.SafetensorsWriter`: a staging directory
renamed into place when complete.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import xxhash

from hbo_jax.models.tensor_io import TensorInfo, TensorReader
from hbo_jax.progress import progress as progress_lines

PREFETCH = 2
DEPTH = 2  # blocks merged at once
# Larger blocks cost more CPU, not less (135M shape: 8 MiB blocks 18-19 ns of CPU per element, 32 MiB 21): a
# block of 32 MiB or more is a fresh memory map each time (malloc's threshold), faulted in page by page.
MAX_BLOCK_BYTES = 8 << 20
IN_FLIGHT_BYTES = 512 << 20  # blocks held by all inputs together, by default


def auto_block_bytes(inputs: int) -> int:
    """The default block of each of `inputs` inputs: (PREFETCH+2+DEPTH) reads of each within IN_FLIGHT_BYTES."""
    return max(1 << 20, min(MAX_BLOCK_BYTES, IN_FLIGHT_BYTES // ((PREFETCH + 2 + DEPTH) * max(inputs, 1))))


def row_blocks(info: TensorInfo, block_bytes: int) -> list[tuple[int, int] | None]:
    """(start, stop) row ranges of a tensor's blocks of at most ~block_bytes (None: a scalar, read whole)."""
    if not info.shape:
        return [None]
    rows = info.shape[0]
    row_bytes = max(info.nbytes // max(rows, 1), 1)
    step = max(1, block_bytes // row_bytes)
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)] or [(0, 0)]


class _Sentinel:
    def __init__(self, error: BaseException | None = None):
        self.error = error


class InputStream:
    """Reads one input's blocks in plan order on a thread; yields them in order.

    Args:
        reader: The input.
        plan: (tensor name, row range or None) in the order they will be asked for.
        dtypes: Tensor name -> dtype to cast its blocks to after hashing (the base's to
            the models'; a float32 GGUF base), or None.
        read_bytes: The most one read takes (blocks that follow each other in a file are read
            together up to it: a buffer lives while any of its blocks does).
    """

    def __init__(self, reader: TensorReader, plan: list[tuple[str, tuple[int, int] | None]],
                 dtypes: dict | None = None, read_bytes: int = MAX_BLOCK_BYTES):
        self.reader, self.plan, self.dtypes, self.read_bytes = reader, plan, dtypes, read_bytes
        self.tensor_digests: dict[str, str] = {}
        self._queue: queue.Queue = queue.Queue(PREFETCH)  # lists of blocks, one per read
        self._ready: collections.deque = collections.deque()  # the blocks of the read being taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"read {reader.where}")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            current, h = None, None
            plan = iter(self.plan)
            for blocks in self.reader.stream_blocks(self.plan, self.read_bytes):
                ready = []
                for block in blocks:
                    name, _ = next(plan)
                    if name != current:
                        if h is not None:
                            self.tensor_digests[current] = h.hexdigest()
                        current, h = name, xxhash.xxh3_128()
                    block = np.ascontiguousarray(block)
                    h.update(block.reshape(-1).view(np.uint8))
                    if self.dtypes is not None:
                        block = block.astype(self.dtypes[name], copy=False)
                    ready.append(block)
                # a read's blocks queued together: the next read starts while they are merged
                if not self._put(ready):
                    return
            if h is not None:
                self.tensor_digests[current] = h.hexdigest()
            self._put(_Sentinel())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Sentinel(e))

    def next(self) -> np.ndarray:
        if not self._ready:
            item = self._queue.get()
            if isinstance(item, _Sentinel):
                raise item.error or RuntimeError(f"{self.reader.where}: read past the plan")
            self._ready.extend(item)
        return self._ready.popleft()

    def close(self) -> None:
        """Stops the thread (blocks not yet taken are dropped) and waits for it."""
        self._stop.set()
        self._thread.join()

    def digest(self, infos: list[TensorInfo]) -> str:
        """XXH3-128 over the sorted (name, shape, dtype, XXH3-128 of the data) lines of every tensor read."""
        h = xxhash.xxh3_128()
        for info in sorted(infos, key=lambda i: i.name):
            src = self.reader.info(info.name)
            h.update(f"{info.name} {list(src.shape)} {src.dtype} {self.tensor_digests[info.name]}\n".encode())
        return h.hexdigest()


class _Writer:
    """Takes merged blocks in plan order: writes each on `pool` (one at a time, in order: a failed write
    stops the merge at the next block), gathers each tensor's stats for `on_tensor`."""

    def __init__(self, writer, pool: ThreadPoolExecutor, bar, on_tensor):
        self.writer, self.pool, self.bar, self.on_tensor = writer, pool, bar, on_tensor
        self.pending, self.stats = None, []

    def take(self, info: TensorInfo, last: bool, merged) -> None:
        out, st = merged.result()
        self.flush()
        self.pending = self.pool.submit(self.writer.write, info.name, out.astype(info.dtype, copy=False))
        self.stats.append(st)
        self.bar.update(out.nbytes)
        if last:
            if self.on_tensor:
                self.on_tensor(info.name, self.stats)
            self.stats = []

    def flush(self) -> None:
        """Waits for the last write."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None


@contextlib.contextmanager
def no_cyclic_gc():
    """Python's cycle collector off (restored after; a decorator or a `with`). After JAX's import the
    next full collection walks its ~1M objects holding the GIL (0.12-0.22 s, every thread stalled), and
    the merge's small objects (futures, tuples, JAX's dispatch) set it off: 9-17% of a 135M merge's CPU
    (`perf`). This moves that collection out of the merge (a process that goes on pays it later). The
    merge's own objects are freed by reference counting; what cycles it leaves (an error's traceback)
    are collected once the collector is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


MergeFn = Callable[[str, int, list[np.ndarray], np.ndarray | None], tuple[np.ndarray, object]]


@no_cyclic_gc()
def stream_merge(tensors: list[TensorInfo], models: list[TensorReader], base: TensorReader | None, writer,
                 merge_block: MergeFn, *, block_bytes: int | None = None, progress: bool | None = None,
                 on_tensor: Callable[[str, list], None] | None = None) -> tuple[list[str], str | None]:
    """Merges every tensor block by block into `writer`.

    Args:
        tensors: The output tensors (name, shape, the models' dtype), in writing order.
        models: The K models' readers.
        base: The base's reader, or None.
        writer: A `SafetensorsWriter` declared with `tensors`.
        merge_block: `(name, first element index, model blocks, base block) -> (block, stats)`.
        block_bytes: About the size of one block of one input (None: `auto_block_bytes`).
        progress: False: show no progress (default: a bar on a terminal, periodic lines in a log).
        on_tensor: Called with (name, the stats of its blocks) after each tensor.

    Returns:
        (each model's digest, the base's digest or None).
    """
    block_bytes = block_bytes or auto_block_bytes(len(models) + (base is not None))
    plan = [(t.name, rows) for t in tensors for rows in row_blocks(t, block_bytes)]
    streams = [InputStream(r, plan, read_bytes=block_bytes) for r in models]
    dtypes = {t.name: t.dtype for t in tensors}
    base_stream = None if base is None else InputStream(base, plan, dtypes, block_bytes)
    every = streams + ([base_stream] if base_stream else [])
    bar = progress_lines(desc="merging", total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True,
                         disable=progress is False)
    # DEPTH blocks are merged at once (the next one's pieces start while the last pieces of one finish: most
    # of a 135M model's tensors are one block of a few pieces, which alone leave a core idle), and one
    # merged block is written on a thread while the next ones merge (the write copies into the page cache
    # with the GIL released); merged in plan order, written in plan order
    drivers = ThreadPoolExecutor(DEPTH, thread_name_prefix="merge block")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="merge write")
    done = _Writer(writer, write_pool, bar, on_tensor)
    inflight: collections.deque = collections.deque()
    try:
        it: Iterator = iter(plan)
        for info in tensors:
            row_elems = int(np.prod(info.shape[1:], dtype=np.int64)) if info.shape else 1
            spans = row_blocks(info, block_bytes)
            for i, (_, rows) in enumerate(next(it) for _ in spans):
                if len(inflight) == DEPTH:  # before taking the next blocks: at most DEPTH held here
                    done.take(*inflight.popleft())
                blocks = [s.next() for s in streams]
                b = base_stream.next() if base_stream else None
                start = 0 if rows is None else rows[0] * row_elems
                inflight.append((info, i == len(spans) - 1,
                                 drivers.submit(merge_block, info.name, start, blocks, b)))
        while inflight:
            done.take(*inflight.popleft())
        done.flush()
    finally:
        drivers.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
        bar.close()
        for s in every:
            s.close()
    return [s.digest(tensors) for s in streams], base_stream.digest(tensors) if base_stream else None
