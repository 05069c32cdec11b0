"""Tensors by Hugging Face name, one at a time: readers for three sources.

A `TensorReader` lists every tensor under its Hugging Face name and layout
(`model.layers.0.self_attn.q_proj.weight`, `[out, in]`) with shape and dtype before any
data is read, and reads a tensor whole or a block of its rows (axis 0) alone:
`SafetensorsReader` (a Hugging Face directory, sharded or not), `RunReader` (a run's
Orbax checkpoint, as export writes it), `hbo_jax.models.gguf.GgufReader` (a GGUF file,
dequantized); `open_reader` picks one (`RunReader` and `open_reader` are in
`hbo_jax.models.readers`). `hbo_jax.models.safetensors_writer.SafetensorsWriter` writes a
Hugging Face directory tensor by tensor or row block by row block, sharded above a size,
and renames it into place only once complete. A tool that combines checkpoints (export, merging)
thus holds about one block per input and one for the output, never a whole model.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from hbo_jax.errors import CheckpointMismatch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> NumPy dtypes (bfloat16 and float8 from ml_dtypes, as JAX's).
ST_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
              "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere `stream_block` reads through the page cache
_DIRECT_ALIGN = 4096


def parse_size(text: str | int) -> int:
    """Bytes in `5GB`, `500MB`, `2GiB` or a plain number (GB = 10**9, as transformers reads it)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not a number of bytes such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape and dtype (normalised to a tuple of ints and a NumPy dtype)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ----------------------------------------------------------------------------- readers


class TensorReader(abc.ABC):
    """Tensors by Hugging Face name, read one at a time; a context manager.

    Subclasses set `_infos` (name -> TensorInfo, in order) and `where` (for messages)
    and implement `_read`.
    """

    where: str
    _infos: dict[str, TensorInfo]

    def infos(self) -> list[TensorInfo]:
        """Every tensor's name, shape and dtype, in the reader's order; nothing is read."""
        return list(self._infos.values())

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.where}: no tensor {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """The whole tensor, of `info(name).shape` and `.dtype`."""
        self.info(name)
        return self._read(name, None)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of a tensor (axis 0), reading little beyond them."""
        return self._read(name, self._rows(name, start, stop))

    def _rows(self, name: str, start: int, stop: int) -> slice:
        """The checked slice of rows `start:stop` of a tensor."""
        shape = self.info(name).shape
        if not shape:
            raise ValueError(f"{self.where}: tensor {name!r} is a scalar (it has no rows)")
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.where}: rows {start}:{stop} of tensor {name!r} outside 0:{shape[0]}")
        return slice(start, stop)

    def stream_block(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """`read(name)` (rows None) or `read_rows(name, *rows)`, for a tool that reads each byte once
        (see `SafetensorsReader`: around the page cache). Here: `read`."""
        return self.read(name) if rows is None else self.read_rows(name, *rows)

    def stream_blocks(self, plan: Iterable[tuple[str, tuple[int, int] | None]],
                      max_bytes: int) -> Iterator[list[np.ndarray]]:
        """The blocks of `plan` ((name, rows or None) in order, each as `stream_block`), in lists read
        together: neighbours in a file in one read of up to ~`max_bytes` (see `SafetensorsReader`).
        Here: one block per list."""
        for name, rows in plan:
            yield [self.stream_block(name, rows)]

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, tensor) pairs, one tensor in memory at a time."""
        return ((name, self._read(name, None)) for name in self._infos)

    @abc.abstractmethod
    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        """The tensor, or its rows `rows` (a checked, in-range slice)."""

    def close(self) -> None:
        """Releases open files; the reader is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsReader(TensorReader):
    """A Hugging Face safetensors directory or file.

    Tensors are listed in the index's order (one file: its header's), with their stored
    names and dtypes. `read`/`read_rows` read the bytes of a tensor or row block with
    `os.preadv` straight into the array (no memory map of the file, whose touched pages
    would stay resident and count towards the process's memory while it streams whole
    models; the read releases the GIL, so several threads read at once); `stream_block`
    reads with O_DIRECT, around the page cache; `slice` gives safetensors' memory-mapped
    lazy slice.

    Args:
        path: A directory with `model.safetensors` or `model.safetensors.index.json` +
            shards, or one `.safetensors` file.

    Attributes:
        dir: The directory.
        config: Its parsed `config.json`, or None when it has none.

    Raises:
        FileNotFoundError: No model.safetensors or index.
        CheckpointMismatch: A shard the index lists is missing or lacks a tensor it
            should hold; the message names them.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        path = Path(path)
        self.dir = path if path.is_dir() else path.parent
        self.where = str(path)
        if path.is_file():
            files = None
        elif (path / INDEX_FILE).is_file():
            files = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        elif (path / SINGLE_FILE).is_file():
            path, files = path / SINGLE_FILE, None
        else:
            raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._handles: dict[str, object] = {}
        if files is None:  # one file: its own header lists it
            self._handles[path.name] = safe_open(str(path), framework="numpy")
            files = {name: path.name for name in self._handles[path.name].keys()}
        self._file_of = files
        self._offsets: dict[str, tuple[int, int, dict]] = {}
        self._direct: dict[str, int | None] = {}
        self._infos = {}
        for name, fname in files.items():
            if fname not in self._handles:
                if not (self.dir / fname).is_file():
                    raise CheckpointMismatch(f"{self.dir / fname}: shard file listed for tensor {name!r} is missing")
                self._handles[fname] = safe_open(str(self.dir / fname), framework="numpy")
            try:
                sl = self._handles[fname].get_slice(name)
            except Exception:  # noqa: BLE001 - safetensors raises its own error type for an unknown name
                raise CheckpointMismatch(f"{self.dir / fname}: tensor {name!r} listed in {INDEX_FILE} "
                                         "is not in this shard") from None
            if sl.get_dtype() not in ST_DTYPES:
                raise CheckpointMismatch(f"{self.dir / fname}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
            self._infos[name] = TensorInfo(name, sl.get_shape(), ST_DTYPES[sl.get_dtype()])
        config = self.dir / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else None

    def slice(self, name: str):
        """The lazy safetensors slice of a tensor (NumPy indexing reads only what it selects)."""
        self.info(name)
        return self._handles[self._file_of[name]].get_slice(name)

    def _data_offsets(self, fname: str) -> tuple[int, int, dict]:
        """(open descriptor, where the data starts, name -> [begin, end]) of a file, from its header."""
        if fname not in self._offsets:
            path = self.dir / fname
            fd = os.open(path, os.O_RDONLY)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            self._offsets[fname] = (fd, 8 + n, {k: v["data_offsets"] for k, v in header.items()
                                                if k != "__metadata__"})
        return self._offsets[fname]

    def _span(self, name: str, rows: slice | None) -> tuple[int, int, int, tuple[int, ...], np.dtype]:
        """(descriptor, file position, bytes, shape, dtype) of a tensor or its rows."""
        info, fname = self._infos[name], self._file_of[name]
        fd, data_start, offsets = self._data_offsets(fname)
        begin, end = offsets[name]
        if end - begin != info.nbytes:
            raise CheckpointMismatch(f"{self.dir / fname}: tensor {name!r} holds {end - begin} bytes, "
                                     f"its shape {info.shape} and dtype {info.dtype} need {info.nbytes}")
        total = info.shape[0] if info.shape else 1
        lo, hi = (0, total) if rows is None else (rows.start, rows.stop)
        row_bytes = info.nbytes // max(total, 1)
        shape = ((hi - lo), *info.shape[1:]) if info.shape else ()
        return fd, data_start + begin + lo * row_bytes, (hi - lo) * row_bytes, shape, info.dtype.newbyteorder("<")

    def _read(self, name: str, rows: slice | None) -> np.ndarray:
        fd, pos, nbytes, shape, dtype = self._span(name, rows)
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got == 0:
                raise CheckpointMismatch(f"{self.dir / self._file_of[name]}: file ends inside tensor {name!r}")
            done += got
        return out

    def stream_block(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor or its rows read with O_DIRECT: the device writes them into the array, without the
        page cache, whose filling and copying cost a streaming merge more CPU than anything but its
        hashing and selection (measured on a virtual disk: ~0.02 ns of CPU per byte instead of
        0.15-1.4, and 1.2-2.3 GB/s where buffered reads got 0.5-2.3). For a tool that reads each byte
        once: what the page cache holds is read from the device again. Where the file system
        refuses O_DIRECT (tmpfs), `read`. (Asking the page cache first, with RWF_NOWAIT, costs
        more: a miss starts its readahead, so the block is read twice.)"""
        return self._read_together([self._locate(name, rows)])[0]

    def stream_blocks(self, plan: Iterable[tuple[str, tuple[int, int] | None]],
                      max_bytes: int) -> Iterator[list[np.ndarray]]:
        """The blocks of `plan` as `stream_block` reads them, but neighbours in a file in one read: the
        next blocks whose bytes lie within ~`max_bytes` of each other and cover at least 3/4 of that
        window (a layer's tensors, in whatever order the plan asks for them: a file written in
        another order than the plan's still reads in few requests), their arrays views of its
        buffer. Each read is a round trip to the device: a 135M model is 278 blocks per input, most
        of them under 2 MB (norms, attention projections), and four inputs read block by block at
        1.4-2.0 GB/s where 8 MiB reads reach 1.6-2.2 (a virtual disk)."""
        group: list[tuple] = []
        for name, rows in plan:
            item = self._locate(name, rows)
            if group and (item[0] != group[0][0] or max(item[1] + item[2], *(b[1] + b[2] for b in group))
                          - min(item[1], *(b[1] for b in group)) > max_bytes):
                yield from self._read_window(group)
                group = []
            group.append(item)
        if group:
            yield from self._read_window(group)

    def _read_window(self, group: list[tuple]) -> Iterator[list[np.ndarray]]:
        """`group`'s blocks (`_locate`'s, one file) in one read when they cover 3/4 of the window they
        span; else each block alone (the holes would be read for nothing)."""
        lo, hi = min(b[1] for b in group), max(b[1] + b[2] for b in group)
        if 4 * sum(b[2] for b in group) >= 3 * (hi - lo):
            yield self._read_together(group)
        else:
            for b in group:
                yield self._read_together([b])

    def _locate(self, name: str, rows: tuple[int, int] | None) -> tuple:
        """(file name, position, bytes, shape, dtype, name, rows) of a block."""
        _, pos, nbytes, shape, dtype = self._span(name, None if rows is None else self._rows(name, *rows))
        return self._file_of[name], pos, nbytes, shape, dtype, name, rows

    def _read_together(self, blocks: list[tuple]) -> list[np.ndarray]:
        """Blocks of one file (`_locate`'s, any order) in one O_DIRECT read of the window they span;
        each one with `_read` where the file or device refuses O_DIRECT."""
        fname, first, last = blocks[0][0], min(b[1] for b in blocks), max(b[1] + b[2] for b in blocks)
        direct = self._direct_fd(fname)
        if direct is None or last == first:
            return [self._read(b[5], None if b[6] is None else slice(*b[6])) for b in blocks]
        # offset, length and buffer address all multiples of the block size (4096 covers 512-byte devices)
        start = first - first % _DIRECT_ALIGN
        span = -(-(last - start) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        raw = np.empty(span + _DIRECT_ALIGN, np.uint8)
        buf = raw[-raw.ctypes.data % _DIRECT_ALIGN:][:span]
        done = 0
        while done < last - start:
            try:
                got = os.preadv(direct, [buf[done:]], start + done)
            except OSError:  # alignment this device does not take: read through the page cache
                self._direct[fname] = None
                return self._read_together(blocks)
            if got == 0 or got % _DIRECT_ALIGN:  # the end of the file (a last, partial block)
                done += got
                break
            done += got
        if done < last - start:
            ends_in = next(b[5] for b in blocks if b[1] + b[2] > start + done)
            raise CheckpointMismatch(f"{self.dir / fname}: file ends inside tensor {ends_in!r}")
        return [buf[pos - start:pos - start + nbytes].view(dtype).reshape(shape)
                for _, pos, nbytes, shape, dtype, _, _ in blocks]

    def _direct_fd(self, fname: str) -> int | None:
        """A descriptor of the file opened with O_DIRECT, or None where that is refused."""
        if fname not in self._direct:
            try:
                self._direct[fname] = os.open(self.dir / fname, os.O_RDONLY | _O_DIRECT) if _O_DIRECT else None
            except OSError:
                self._direct[fname] = None
        return self._direct[fname]

    def close(self) -> None:
        self._handles.clear()
        for fd, _, _ in self._offsets.values():
            os.close(fd)
        self._offsets.clear()
        for fd in self._direct.values():
            if fd is not None:
                os.close(fd)
        self._direct.clear()
