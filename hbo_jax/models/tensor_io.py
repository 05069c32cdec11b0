"""Tensors by Hugging Face name, one at a time: readers for three sources, a safetensors writer.

A `TensorReader` lists every tensor under its Hugging Face name and layout
(`model.layers.0.self_attn.q_proj.weight`, `[out, in]`) with shape and dtype before any
data is read, and reads a tensor whole or a block of its rows (axis 0) alone:
`SafetensorsReader` (a Hugging Face directory, sharded or not), `RunReader` (a run's
Orbax checkpoint, as export writes it), `hbo_jax.models.gguf.GgufReader` (a GGUF file,
dequantized); `open_reader` picks one (`RunReader` and `open_reader` are in
`hbo_jax.models.readers`). `SafetensorsWriter` writes a Hugging Face directory tensor by
tensor or row block by row block, sharded above a size, and renames it into place only
once complete. A tool that combines checkpoints (export, merging)
thus holds about one block per input and one for the output, never a whole model.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from hbo_jax.errors import CheckpointMismatch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> NumPy dtypes (bfloat16 and float8 from ml_dtypes, as JAX's).
_ST_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
              "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere `stream_block` reads through the page cache
_DIRECT_ALIGN = 4096
# The writer starts the disk writing every this many bytes (`SafetensorsWriter._write_back`)
WRITE_BACK_BYTES = 32 << 20


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
            if sl.get_dtype() not in _ST_DTYPES:
                raise CheckpointMismatch(f"{self.dir / fname}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
            self._infos[name] = TensorInfo(name, sl.get_shape(), _ST_DTYPES[sl.get_dtype()])
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
        _, pos, nbytes, shape, dtype = self._span(name, None if rows is None else self._rows(name, *rows))
        direct = self._direct_fd(self._file_of[name])
        if direct is None or nbytes == 0:
            return self._read(name, None if rows is None else slice(*rows))
        # offset, length and buffer address all multiples of the block size (4096 covers 512-byte devices)
        start, skip = pos - pos % _DIRECT_ALIGN, pos % _DIRECT_ALIGN
        span = -(-(skip + nbytes) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        raw = np.empty(span + _DIRECT_ALIGN, np.uint8)
        buf = raw[-raw.ctypes.data % _DIRECT_ALIGN:][:span]
        done = 0
        while done < skip + nbytes:
            try:
                got = os.preadv(direct, [buf[done:]], start + done)
            except OSError:  # alignment this device does not take: read through the page cache
                self._direct[self._file_of[name]] = None
                return self._read(name, None if rows is None else slice(*rows))
            if got == 0 or got % _DIRECT_ALIGN:  # the end of the file (a last, partial block)
                done += got
                break
            done += got
        if done < skip + nbytes:
            raise CheckpointMismatch(f"{self.dir / self._file_of[name]}: file ends inside tensor {name!r}")
        return buf[skip:skip + nbytes].view(dtype).reshape(shape)

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


# ----------------------------------------------------------------------------- writer


class SafetensorsWriter:
    """Writes a Hugging Face safetensors directory one tensor, or one row block, at a time.

    The `safetensors` package writes only whole dicts of in-memory tensors, so this
    writes its format itself: 8-byte little-endian header length, JSON header (dtype,
    shape, byte offsets of each tensor; padded with spaces to 8 bytes), raw
    little-endian data. The header comes first, so all tensors are declared up front;
    data then follows in that order, each tensor whole or in consecutive row blocks.
    Above `max_shard_bytes` the tensors are split, in order, into
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (transformers'
    names). All goes into `staging_dir` beside `out_dir` (put config.json, tokenizer
    files, ... there too), renamed to `out_dir` once every tensor is complete and
    removed on an error. Leaving the `with` block commits; an exception aborts.

    Args:
        out_dir: The directory to create.
        tensors: TensorInfo or (name, shape, dtype) of every tensor, in writing order.
        max_shard_bytes: Most data bytes per file (a larger tensor gets its own); None:
            one `model.safetensors`.
        metadata: The headers' `__metadata__`; default {"format": "pt"} (transformers
            checks it).
        overwrite: Replace an existing `out_dir` at commit; otherwise one that exists
            and is not an empty directory is refused.

    Raises:
        FileExistsError: `out_dir` exists (see `overwrite`).
        ValueError: A repeated name, or a dtype without a safetensors name.
    """

    def __init__(self, out_dir: str | Path, tensors: Iterable[TensorInfo | tuple], *,
                 max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None,
                 overwrite: bool = False):
        self.out_dir, self.overwrite = Path(out_dir), overwrite
        check_output_dir(self.out_dir, overwrite)
        self._infos = [t if isinstance(t, TensorInfo) else TensorInfo(*t) for t in tensors]
        names = [t.name for t in self._infos]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor {next(n for n in names if names.count(n) > 1)!r} is declared twice")
        unknown = [t for t in self._infos if t.dtype.newbyteorder("=") not in _ST_NAMES]
        if unknown:
            raise ValueError(f"tensor {unknown[0].name!r}: dtype {unknown[0].dtype} has no safetensors name")
        self._types = [_ST_NAMES[t.dtype.newbyteorder("=")] for t in self._infos]
        self._shard = _plan_shards(self._infos, max_shard_bytes)
        count = self._shard[-1] + 1 if self._infos else 1
        self._files = [SINGLE_FILE] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors"
                                                        for k in range(count)]
        self._metadata = {"format": "pt"} if metadata is None else dict(metadata)
        # Beside out_dir (one file system, so the final rename is atomic); made by mkdir,
        # not mkdtemp, so the output gets the usual permissions (mkdtemp's are 0700).
        self.staging_dir = self.out_dir.parent / f".{self.out_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        self.staging_dir.mkdir(parents=True)
        self._next, self._rows, self._file, self._opened, self._closed = 0, 0, None, -1, False
        self._flushed = self._written = 0  # bytes of the open file handed to the disk / written

    def _header(self, shard: int) -> bytes:
        header, offset = {}, 0
        for info, kind, k in zip(self._infos, self._types, self._shard):
            if k == shard:
                header[info.name] = {"dtype": kind, "shape": list(info.shape),
                                     "data_offsets": [offset, offset + info.nbytes]}
                offset += info.nbytes
        if self._metadata:
            header["__metadata__"] = self._metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        return struct.pack("<Q", len(blob)) + blob

    def _open_shard(self, shard: int) -> None:
        while self._opened < shard:  # shards follow each other; a tensorless one still gets its file
            self._close_file()
            self._opened += 1
            self._file = open(self.staging_dir / self._files[self._opened], "wb")
            self._file.write(self._header(self._opened))
            self._flushed = self._written = 0

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before the rename publishes it
            self._file.close()
            self._file = None

    def _write_back(self) -> None:
        """Starts writing what the open file holds to the disk, without waiting, and drops its pages already
        on the disk from the page cache (POSIX_FADV_DONTNEED: Linux starts the writeback of dirty pages
        and keeps those). The fsync of `commit` then waits for the last few blocks only, not the whole
        file (135M shape: 0.09 s at the end of a 1 s merge), and the output does not evict the page cache."""
        if hasattr(os, "posix_fadvise"):
            self._file.flush()
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._flushed = self._written

    def write(self, name: str, data: np.ndarray) -> None:
        """Writes the tensor due next, whole or its next rows (in the declared dtype).

        Raises:
            ValueError: Another tensor is due, or the data does not fit the declaration.
        """
        if self._closed or self._next >= len(self._infos):
            raise ValueError(f"tensor {name!r}: every declared tensor is written (or the writer is closed)")
        info = self._infos[self._next]
        if name != info.name:
            raise ValueError(f"tensor {info.name!r} is due next, not {name!r} (tensors come in declared order)")
        data = np.asarray(data)
        if data.dtype != info.dtype:
            raise ValueError(f"tensor {name!r}: dtype {data.dtype}, declared {info.dtype}")
        total = info.shape[0] if info.shape else 1
        rows = data.shape[0] if data.ndim else 1
        if data.shape[1:] != info.shape[1:] or data.ndim != len(info.shape) or self._rows + rows > total:
            raise ValueError(f"tensor {name!r}: a block of shape {data.shape} after {self._rows} rows does not "
                             f"fit the declared shape {info.shape}")
        self._open_shard(self._shard[self._next])
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        block = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self._file.write(block)
        self._written += block.size
        if self._written - self._flushed >= WRITE_BACK_BYTES:
            self._write_back()
        self._rows += rows
        if self._rows == total:
            self._next, self._rows = self._next + 1, 0

    def commit(self) -> Path:
        """Finishes the files, writes the index (when sharded) and renames into `out_dir`.

        Raises:
            ValueError: A declared tensor is not (fully) written; nothing is kept.
            FileExistsError: `out_dir` appeared meanwhile (see `overwrite`).
        """
        try:
            if self._next < len(self._infos):
                raise ValueError(f"tensor {self._infos[self._next].name!r} (and {len(self._infos) - self._next - 1} "
                                 "after it) not fully written")
            self._open_shard(len(self._files) - 1)
            self._close_file()
            if len(self._files) > 1:
                index = {"metadata": {"total_parameters": sum(int(np.prod(t.shape)) for t in self._infos),
                                      "total_size": sum(t.nbytes for t in self._infos)},
                         "weight_map": {t.name: self._files[k] for t, k in zip(self._infos, self._shard)}}
                (self.staging_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            _move_into_place(self.staging_dir, self.out_dir, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.out_dir

    def abort(self) -> None:
        """Drops everything written so far (`out_dir` is untouched)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _plan_shards(infos: list[TensorInfo], max_bytes: int | None) -> list[int]:
    """The shard of each tensor: in order, a new shard when the next tensor would overflow."""
    out, shard, size = [], 0, 0
    for info in infos:
        if max_bytes is not None and size and size + info.nbytes > max_bytes:
            shard, size = shard + 1, 0
        out.append(shard)
        size += info.nbytes
    return out


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Raises FileExistsError when `out_dir` exists, is not an empty directory, and not `overwrite`."""
    out_dir = Path(out_dir)
    if overwrite or not (out_dir.exists() or out_dir.is_symlink()):
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise FileExistsError(f"{out_dir} exists; refusing to overwrite it (pass overwrite=True, or --overwrite)")


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Renames `staging` to `out_dir`; an existing `out_dir` (allowed) is set aside first, then removed."""
    check_output_dir(out_dir, overwrite)
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(staging, out_dir)
        return
    old = staging.with_suffix(".old")
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
