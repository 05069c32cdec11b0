"""Tensor I/O by Hugging Face name: each reader against a direct load, row blocks against
slices of whole tensors, and the streaming safetensors writer.

Sources: the parity fixtures (`scripts/make_parity_fixtures.py`; qwen2 is sharded,
llama3 and tied are single files), GGUF files converted from them by
`scripts/gguf_fixture.py`, and a tiny run trained here (untied head, padded vocabulary,
bfloat16 parameters) with its `python -m hbo_jax.export` output as the reference.
"""

import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from hbo_jax.errors import CheckpointMismatch
from hbo_jax.models.gguf import GgufReader
from hbo_jax.models.readers import RunReader, open_reader
from hbo_jax.models import safetensors_writer
from hbo_jax.models.safetensors_writer import SafetensorsWriter
from hbo_jax.models.tensor_io import INDEX_FILE, SafetensorsReader

PARITY = Path(__file__).parent / "fixtures" / "parity"
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from gguf_fixture import write_gguf  # noqa: E402


def _direct(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face directory, read with safetensors itself."""
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_tensors(reader, want: dict[str, np.ndarray]) -> None:
    assert sorted(reader.names()) == sorted(want)
    for info in reader.infos():  # shapes and dtypes are known before reading
        assert (info.shape, info.dtype) == (want[info.name].shape, want[info.name].dtype), info.name
    for name, arr in reader.items():
        np.testing.assert_array_equal(arr, want[name], err_msg=name)


@pytest.fixture(scope="module")
def run_dir(bf16_run):
    return bf16_run


@pytest.fixture(scope="module")
def exported(bf16_export):
    return bf16_export


def _run_reader(run_dir, exported) -> RunReader:
    return RunReader(run_dir, vocab_size=json.loads((exported / "config.json").read_text())["vocab_size"])


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_safetensors_reader_yields_what_safetensors_loads(name):
    with SafetensorsReader(PARITY / name) as reader:
        _assert_same_tensors(reader, _direct(PARITY / name))


def test_gguf_reader_yields_the_hugging_face_tensors_it_was_converted_from(tmp_path):
    """llama architecture: q/k rows stored permuted, F32, so the round trip is exact."""
    path = write_gguf(tmp_path / "tied.gguf", PARITY / "tied")
    with GgufReader(path) as reader:
        _assert_same_tensors(reader, _direct(PARITY / "tied"))


def test_gguf_fixture_reader_matches_its_hugging_face_source():
    """The committed qwen2 GGUF: F32 tensors exact, the Q8_0 one within its quantization step."""
    want = _direct(PARITY / "qwen2")
    with GgufReader(PARITY / "qwen2_gguf" / "model.gguf") as reader:
        assert sorted(reader.names()) == sorted(want)
        for name, arr in reader.items():
            tol = 2e-3 if name == "model.layers.0.mlp.down_proj.weight" else 0  # Q8_0: max|w| / 254 per block
            np.testing.assert_allclose(arr, want[name], rtol=0, atol=tol, err_msg=name)


def test_run_reader_yields_what_export_writes(run_dir, exported):
    with _run_reader(run_dir, exported) as reader:
        assert reader.spec.padded_vocab > reader.spec.vocab_size  # padding rows exist and are dropped
        assert reader.info("lm_head.weight").dtype == ml_dtypes.bfloat16
        _assert_same_tensors(reader, load_file(str(exported / "model.safetensors")))


def test_run_reader_of_stacked_blocks_yields_what_export_writes(scanned_run, tmp_path):
    """A run with model.scan_layers: the reader reads one layer of each stacked parameter from
    the checkpoint, export unstacks the restored model on device; both give the same tensors."""
    from hbo_jax.export import main as export_main

    assert export_main([str(scanned_run), str(tmp_path / "hf")]) == 0
    with RunReader(scanned_run) as reader:
        assert reader.spec.scan_layers and reader.spec.num_layers == 2
        _assert_same_tensors(reader, load_file(str(tmp_path / "hf" / "model.safetensors")))


def test_run_reader_asks_for_the_vocabulary_a_padded_table_hides(run_dir):
    with pytest.raises(ValueError, match="vocab_multiple=100.*vocab_size"):
        RunReader(run_dir)


def _reader(request, kind, tmp_path):
    if kind == "hf_sharded":
        return SafetensorsReader(PARITY / "qwen2")
    if kind == "hf_single":
        return SafetensorsReader(PARITY / "llama3")
    if kind == "gguf":  # permuted q/k rows, q quantized: a row block gathers scattered quantized rows
        import gguf

        quant = {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0}
        return GgufReader(write_gguf(tmp_path / "q.gguf", PARITY / "tied", quantize=quant))
    return _run_reader(request.getfixturevalue("run_dir"), request.getfixturevalue("exported"))


@pytest.mark.parametrize("kind", ["hf_sharded", "hf_single", "gguf", "run"])
def test_a_row_block_is_the_slice_of_the_whole_tensor(kind, request, tmp_path):
    with _reader(request, kind, tmp_path) as reader:
        for name, whole in reader.items():
            n = whole.shape[0]
            for start, stop in ((0, n), (1, max(1, n // 3)), (n // 2, n), (n - 1, n), (3, 3)):
                for block in (reader.read_rows(name, start, stop), reader.stream_block(name, (start, stop))):
                    assert block.dtype == whole.dtype, name
                    np.testing.assert_array_equal(block, whole[start:stop], err_msg=f"{name}[{start}:{stop}]")
            np.testing.assert_array_equal(reader.stream_block(name), whole)


def _row_plan(reader, seed):
    """Every tensor cut in blocks of 3 rows (a scalar whole), in a shuffled order."""
    plan = [(n, None if not reader.info(n).shape else (lo, min(lo + 3, reader.info(n).shape[0])))
            for n in reader.names() for lo in range(0, max(1, (reader.info(n).shape or (1,))[0]), 3)]
    return [plan[i] for i in np.random.default_rng(seed).permutation(len(plan))]


@pytest.mark.parametrize("kind", ["hf_sharded", "hf_single", "gguf"])
def test_blocks_read_together_equal_blocks_read_alone(kind, request, tmp_path):
    with _reader(request, kind, tmp_path) as reader:
        plan = _row_plan(reader, 0)
        together = [b for group in reader.stream_blocks(plan, 1 << 20) for b in group]
        assert len(together) == len(plan)
        for (name, rows), block in zip(plan, together):
            np.testing.assert_array_equal(block, reader.stream_block(name, rows), err_msg=f"{name} {rows}")


def test_blocks_are_read_together_only_where_they_fill_the_read(monkeypatch):
    """Every other tensor of a file: the holes between them would be half of one read, so each is read
    alone; the whole file in order: few reads, each of blocks next to each other."""
    with SafetensorsReader(PARITY / "llama3") as reader:
        reads = []
        real = reader._read_together
        monkeypatch.setattr(reader, "_read_together", lambda blocks: reads.append(blocks) or real(blocks))
        names = sorted(reader.names(), key=lambda n: reader._span(n, None)[1])  # file order
        list(reader.stream_blocks([(n, None) for n in names[::2]], 1 << 30))
        assert all(len(r) == 1 for r in reads)
        reads.clear()
        list(reader.stream_blocks([(n, None) for n in names], 1 << 30))
        assert len(reads) == 1 and len(reads[0]) == len(names)


def test_a_file_cut_short_after_opening_is_named_by_read_and_map(tmp_path):
    data = (PARITY / "tied" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data)
    with SafetensorsReader(tmp_path) as reader:  # safetensors checks the size when it opens the file
        last = max(reader.names(), key=lambda n: reader._span(n, None)[1])  # its bytes end the file
        os.truncate(tmp_path / "model.safetensors", len(data) - 4)
        for read in (reader.read, reader.stream_block):
            with pytest.raises(CheckpointMismatch, match=f"ends inside tensor '{last}'"):
                read(last)


def test_rows_outside_the_tensor_are_refused():
    with SafetensorsReader(PARITY / "tied") as reader:
        n = reader.info("model.norm.weight").shape[0]
        with pytest.raises(ValueError, match="outside"):
            reader.read_rows("model.norm.weight", 0, n + 1)


def test_open_reader_picks_the_reader_for_each_source(run_dir, exported, tmp_path):
    gguf_file = write_gguf(tmp_path / "t.gguf", PARITY / "tied")
    kinds = {f"hf:{PARITY / 'qwen2'}": SafetensorsReader, str(PARITY / "tied" / "model.safetensors"): SafetensorsReader,
             str(exported): SafetensorsReader, f"gguf:{gguf_file}": GgufReader, str(gguf_file): GgufReader}
    for source, cls in kinds.items():
        assert type(open_reader(source)) is cls, source
    vocab = json.loads((exported / "config.json").read_text())["vocab_size"]
    assert type(open_reader(run_dir, vocab_size=vocab)) is RunReader


# ----------------------------------------------------------------------------- writer


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    return {"a.weight": rng.randn(7, 5).astype(np.float32),
            "b.bf16": rng.randn(6, 3, 2).astype(ml_dtypes.bfloat16),
            "c.f16": rng.randn(11).astype(np.float16),
            "d.ids": rng.randint(-5, 5, size=(4, 2)).astype(np.int64),
            "e.scalar": np.float32(3.5).reshape(()),
            "f.empty": np.zeros((0, 4), np.float32)}


def _write(out: Path, tensors: dict, block: int = 2, **kw) -> Path:
    """Writes `tensors` in declared order, each in row blocks of `block` rows."""
    with SafetensorsWriter(out, [(k, v.shape, v.dtype) for k, v in tensors.items()], **kw) as w:
        for name, arr in tensors.items():
            if arr.ndim == 0 or len(arr) == 0:
                w.write(name, arr)
            for i in range(0, len(arr) if arr.ndim else 0, block):
                w.write(name, arr[i:i + block])
    return out


@pytest.mark.parametrize("write_back", [None, 1], ids=["default", "after_every_block"])
def test_written_file_loads_back_with_safetensors(write_back, tmp_path, monkeypatch):
    if write_back is not None:  # the writer hands what it wrote to the disk this often (`_write_back`)
        monkeypatch.setattr(safetensors_writer, "WRITE_BACK_BYTES", write_back)
    tensors = _tensors()
    out = _write(tmp_path / "out", tensors)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(tensors)
    for name, arr in tensors.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_above_the_shard_size_the_output_is_sharded_with_an_index(tmp_path):
    tensors = _tensors()
    limit = 150  # bytes: a.weight (140) alone, the others grouped in order
    out = _write(tmp_path / "out", tensors, max_shard_bytes=limit)
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(set(index["weight_map"].values()))
    assert all(f == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    for f in files:
        held = load_file(str(out / f))
        assert sorted(held) == sorted(n for n, s in index["weight_map"].items() if s == f)
        assert sum(a.nbytes for a in held.values()) <= limit or len(held) == 1
    with SafetensorsReader(out) as reader:
        _assert_same_tensors(reader, tensors)


def test_a_failure_midway_leaves_no_output(tmp_path):
    tensors = _tensors()
    with pytest.raises(RuntimeError, match="disk full"):
        with SafetensorsWriter(tmp_path / "out", [(k, v.shape, v.dtype) for k, v in tensors.items()]) as w:
            w.write("a.weight", tensors["a.weight"])
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging directory


def test_a_tensor_left_unwritten_fails_the_commit_and_leaves_no_output(tmp_path):
    tensors = _tensors()
    with pytest.raises(ValueError, match="'a.weight'.*not fully written"):
        with SafetensorsWriter(tmp_path / "out", [(k, v.shape, v.dtype) for k, v in tensors.items()]) as w:
            w.write("a.weight", tensors["a.weight"][:3])
    assert list(tmp_path.iterdir()) == []


def test_tensors_come_in_the_declared_order(tmp_path):
    tensors = _tensors()
    with SafetensorsWriter(tmp_path / "out", [(k, v.shape, v.dtype) for k, v in tensors.items()]) as w:
        with pytest.raises(ValueError, match="'a.weight' is due next"):
            w.write("b.bf16", tensors["b.bf16"])
        w.abort()


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(out, tensors)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    _write(out, tensors, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone, no staging left
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["x"], tensors["x"])


# ----------------------------------------------------------------------------- export on the writer


def test_sharded_export_holds_the_same_tensors_and_loads_back(tmp_path):
    from transformers import AutoConfig

    from hbo_jax.config import MeshConfig
    from hbo_jax.models.hf import export_hf, load_hf
    from hbo_jax.parallel import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, params, spec = load_hf(PARITY / "qwen2", mesh)
    export_hf(params, spec, None, tmp_path / "sharded", max_shard_bytes=100_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    with SafetensorsReader(tmp_path / "sharded") as reader:
        _assert_same_tensors(reader, _direct(PARITY / "qwen2"))
    assert AutoConfig.from_pretrained(str(tmp_path / "sharded")).model_type == "qwen2"
    assert load_hf(tmp_path / "sharded", mesh)[2] == spec


def test_export_cli_refuses_an_existing_directory_unless_overwrite(run_dir, exported, tmp_path, capsys):
    from hbo_jax.export import main as export_main

    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(run_dir), str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert export_main([str(run_dir), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
