"""Merge throughput and peak memory of `python -m hbo_jax.merge` against the disk's read bandwidth.

    python benchmarks/merge_throughput.py [--shapes smollm2_135m llama_1b] [--k 3 8] [--dir /tmp/merge_bench]
        [--code OTHER_CHECKOUT .] [--repeat N]

Writes K synthetic bf16 fine-tunes and their base (Hugging Face safetensors directories
at the shapes of `train_step_cpu.SHAPES`, each fine-tune differing from the base in half
its elements) under `--dir`, measures this disk's sequential read bandwidth on one of
those files (cold: its page cache dropped with posix_fadvise(DONTNEED) first; warm: read
again; O_DIRECT: around the page cache, as the merge reads) and on all K+1 inputs at once,
one thread per file (cold), and the merge's own reads alone (one block per read, and
neighbouring blocks read together, as the merge reads), then runs the merge
(select + resample) in a subprocess, cold and warm (with each `--code` checkout's hbo_jax:
versions compared on the same inputs), and reports seconds, input bytes read per second,
their ratios to the single-stream cold and O_DIRECT disk rates (each the best of 3
reads; the merge reads with O_DIRECT: the higher one is the disk's limit), CPU time per element (user + system,
all threads: less sensitive to a shared machine's load than seconds), the load average,
and the subprocess's peak RSS (getrusage). `--repeat N` runs every merge N times, the
checkouts alternating round by round with a cold and an O_DIRECT disk read between
rounds (joining the best-of): the table gives each merge's median seconds and CPU (and
the range of seconds) against the best disk rates of all reads, the JSON lines every
merge. Everything under `--dir` is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train_step_cpu import SHAPES  # noqa: E402


def tensors(shape) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and shapes of a Llama of a SHAPES entry (tied: no lm_head)."""
    d, layers, h, kv, f, v, tied = shape
    hd = d // h
    out = [("model.embed_tokens.weight", (v, d)), ("model.norm.weight", (d,))]
    if not tied:
        out.append(("lm_head.weight", (v, d)))
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (h * hd, d)), (p + "self_attn.k_proj.weight", (kv * hd, d)),
                (p + "self_attn.v_proj.weight", (kv * hd, d)), (p + "self_attn.o_proj.weight", (d, h * hd)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    return out


def config(shape) -> dict:
    d, layers, h, kv, f, v, tied = shape
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v, "hidden_size": d,
            "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": h,
            "num_key_value_heads": kv, "head_dim": d // h, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
            "tie_word_embeddings": tied, "dtype": "bfloat16"}


def write_inputs(root: Path, shape, k: int) -> list[Path]:
    """The base and K fine-tunes (bf16), written block by block (little memory)."""
    import ml_dtypes
    import numpy as np

    from hbo_jax.models.safetensors_writer import SafetensorsWriter

    specs = tensors(shape)
    bf16 = ml_dtypes.bfloat16
    dirs = [root / "base"] + [root / f"m{i}" for i in range(k)]
    writers = [SafetensorsWriter(d, [(n, s, bf16) for n, s in specs], max_shard_bytes=5 * 10 ** 9) for d in dirs]
    rng = np.random.default_rng(0)
    for name, s in specs:
        rows = max(1, (16 << 20) // (int(np.prod(s[1:])) * 2 or 1))
        for lo in range(0, s[0], rows):
            block = (rng.standard_normal((min(rows, s[0] - lo), *s[1:]), np.float32) * 0.02).astype(bf16)
            writers[0].write(name, block)
            for w in writers[1:]:  # half the elements nudged by one bf16 step or more
                nudge = rng.integers(0, 2, block.shape, dtype=np.uint16)
                w.write(name, (block.view(np.uint16) + nudge).view(bf16))
    for d, w in zip(dirs, writers):
        (w.staging_dir / "config.json").write_text(json.dumps(config(shape)))
        w.commit()
    return dirs


def files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _read_all(path: Path) -> None:
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _read_direct(path: Path) -> None:
    import numpy as np

    raw = np.empty((16 << 20) + 4096, np.uint8)
    buf = raw[-raw.ctypes.data % 4096:][:16 << 20]  # O_DIRECT: an aligned buffer
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        pos, got = 0, len(buf)
        while got == len(buf):  # a shorter read is the end of the file
            got = os.preadv(fd, [buf], pos)
            pos += got
    finally:
        os.close(fd)


def read_bandwidth(paths: list[Path], cold: bool, direct: bool = False) -> float:
    """Bytes per second reading `paths` sequentially in 16 MiB reads, one thread per file at once
    (`direct`: with O_DIRECT, around the page cache, as the merge reads)."""
    if cold:
        drop_cache(paths)
    threads = [threading.Thread(target=_read_direct if direct else _read_all, args=(p,)) for p in paths]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(p.stat().st_size for p in paths) / (time.perf_counter() - t)


def merge_reads(dirs: list[Path], grouped: bool) -> float:
    """Bytes per second of the merge's own reading alone (this checkout's `stream_blocks` over the merge's
    plan, one thread per input, nothing merged): one block per read, or neighbouring blocks read together."""
    from hbo_jax.merging.inputs import check_inputs, open_input
    from hbo_jax.merging.stream import auto_block_bytes, row_blocks

    inputs = [open_input(str(d)) for d in dirs]
    tensors, _ = check_inputs(inputs[0], inputs[1:])
    block = auto_block_bytes(len(dirs))
    plan = [(t.name, rows) for t in tensors for rows in row_blocks(t, block)]

    def read(reader):
        for _ in reader.stream_blocks(plan, block if grouped else 0):
            pass

    threads = [threading.Thread(target=read, args=(i.reader,)) for i in inputs]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t
    for i in inputs:
        i.reader.close()
    return len(dirs) * sum(t.nbytes for t in tensors) / seconds


def run_merge(dirs: list[Path], out: Path, cold: bool, code: Path = ROOT) -> tuple[float, float, float]:
    """(seconds, CPU seconds of all its threads in the command, peak RSS bytes) of `python -m hbo_jax.merge`'s
    `main` (after its imports) in a fresh process, importing hbo_jax from `code` (another checkout: compare
    versions on the same inputs). The command keeps its compiled programs in a cache next to `out`
    (the first merge of a K and dtype fills it); the progress bar is off (stderr is not a terminal)."""
    if cold:
        drop_cache([f for d in dirs for f in files(d)])
    argv = ["--base", str(dirs[0]), "--models", *map(str, dirs[1:]), "--out", str(out), "--method", "select",
            "--resample", "--overwrite"]
    code_line = ("import sys, time, resource; from hbo_jax.merge import main; "
                 "t, c = time.perf_counter(), time.process_time(); "
                 f"assert main({argv!r}) == 0; "
                 "print(time.perf_counter() - t, time.process_time() - c, "
                 "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    # its compile cache in the benchmark's folder: empty at the start, filled by the first merge
    env = {**os.environ, "PYTHONPATH": str(code), "JAX_PLATFORMS": "cpu", "HBO_JAX_CACHE": str(out.parent / "cache")}
    res = subprocess.run([sys.executable, "-c", code_line], capture_output=True, text=True, env=env, check=True,
                         cwd=code)  # `python -c` puts its working directory first on the path
    seconds, cpu, rss = res.stdout.split()[-3:]
    return float(seconds), float(cpu), float(rss)


def measure(root: Path, name: str, ks: list[int], codes: list[Path], repeat: int = 1) -> list[dict]:
    """Writes the inputs of shape `name` under `root` (once, for the largest K), reads the disk, merges
    `repeat` rounds per K, checkout and page cache; one row per K, checkout and cache (medians)."""
    rows = []
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    written = write_inputs(root, SHAPES[name], max(ks))
    made = time.perf_counter() - t
    biggest = max(files(written[0]), key=lambda f: f.stat().st_size)
    # the best of 3: this virtual disk's rate moves 2x from one read to the next; its limit is the best
    disk_cold = max(read_bandwidth([biggest], True) for _ in range(3))
    disk_warm = read_bandwidth([biggest], False)
    disk_direct = max(read_bandwidth([biggest], False, direct=True) for _ in range(3))  # no page cache
    elements = sum(math.prod(s) for _, s in tensors(SHAPES[name]))
    for k in ks:
        dirs = written[:k + 1]
        size = sum(f.stat().st_size for d in dirs for f in files(d))
        disk_parallel = read_bandwidth([f for d in dirs for f in files(d)], True)  # K+1 streams, as merged
        # the merge's own reads, alone (O_DIRECT: no page cache to drop); the best of 3, alternating
        reads = {False: 0.0, True: 0.0}
        for _ in range(3):
            for grouped in reads:
                reads[grouped] = max(reads[grouped], merge_reads(dirs, grouped))
        runs = []
        for r in range(repeat):
            if r:  # the disk's rate drifts: read again between rounds, the best of all reads is its limit
                disk_cold = max(disk_cold, read_bandwidth([biggest], True))
                disk_direct = max(disk_direct, read_bandwidth([biggest], False, direct=True))
            for code in codes if r % 2 == 0 else codes[::-1]:
                for cold in (True, False):
                    seconds, cpu, rss = run_merge(dirs, root / "merged", cold, code)
                    runs.append({"shape": name, "k": k, "code": str(code), "cache": "cold" if cold else "warm",
                                 "round": r, "seconds": seconds, "cpu_ns_per_element": cpu / elements * 1e9,
                                 "peak_rss_GB": rss / 1e9, "load_average": os.getloadavg()})
                    print(json.dumps(runs[-1]), flush=True)
        for code in codes:
            for cache in ("cold", "warm"):
                mine = [x for x in runs if x["code"] == str(code) and x["cache"] == cache]
                seconds = statistics.median(x["seconds"] for x in mine)
                rows.append({"shape": name, "k": k, "code": str(code), "cache": cache, "merges": len(mine),
                             "input_GB": size / 1e9, "seconds": seconds,
                             "seconds_range": [min(x["seconds"] for x in mine),
                                               max(x["seconds"] for x in mine)],
                             "GB_per_s": size / seconds / 1e9,
                             "cpu_ns_per_element": statistics.median(x["cpu_ns_per_element"] for x in mine),
                             "disk_cold_GB_per_s": disk_cold / 1e9, "disk_warm_GB_per_s": disk_warm / 1e9,
                             "disk_direct_GB_per_s": disk_direct / 1e9,
                             "disk_cold_parallel_GB_per_s": disk_parallel / 1e9,
                             "merge_reads_block_GB_per_s": reads[False] / 1e9,
                             "merge_reads_grouped_GB_per_s": reads[True] / 1e9,
                             "vs_cold_disk": size / seconds / disk_cold,
                             "vs_direct_disk": size / seconds / disk_direct,
                             "peak_rss_GB": max(x["peak_rss_GB"] for x in mine),
                             "inputs_written_s": made,
                             "load_average": [max(x["load_average"][i] for x in mine) for i in range(3)]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of `measure`'s rows."""
    out = ["| shape | K | code | page cache | merges | input GB | merge s (median; range) | merge GB/s | "
           "CPU ns / element | disk GB/s: 1 stream cold / warm / O_DIRECT, K+1 streams cold | "
           "the merge's reads alone, GB/s: a block per read / grouped | "
           "merge / disk: 1 stream cold, O_DIRECT | peak RSS GB | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["seconds_range"]
        out.append(f"| {r['shape']} | {r['k']} | {r['code']} | {r['cache']} | {r['merges']} | {r['input_GB']:.2f} | "
                   f"{r['seconds']:.2f}" + (f"; {lo:.2f}-{hi:.2f}" if r["merges"] > 1 else "") + " | "
                   f"{r['GB_per_s']:.2f} | {r['cpu_ns_per_element']:.1f} | {r['disk_cold_GB_per_s']:.2f} / "
                   f"{r['disk_warm_GB_per_s']:.2f} / {r['disk_direct_GB_per_s']:.2f} / "
                   f"{r['disk_cold_parallel_GB_per_s']:.2f} | {r['merge_reads_block_GB_per_s']:.2f} / "
                   f"{r['merge_reads_grouped_GB_per_s']:.2f} | {r['vs_cold_disk']:.2f}, {r['vs_direct_disk']:.2f} | "
                   f"{r['peak_rss_GB']:.2f} | {r['load_average'][0]:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2_135m", "llama_1b"], choices=sorted(SHAPES))
    ap.add_argument("--k", type=int, nargs="+", default=[3],
                    help="numbers of fine-tunes merged (inputs are written once, for the largest)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/merge_bench"))
    ap.add_argument("--code", type=Path, nargs="+", default=[ROOT],
                    help="checkouts whose hbo_jax to merge with, each on the same inputs (default: this one)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of merges, checkouts alternating, disk read again between rounds (medians)")
    args = ap.parse_args()
    rows = []
    try:
        for name in args.shapes:
            rows += measure(args.dir / name, name, args.k, args.code, args.repeat)
            shutil.rmtree(args.dir / name, ignore_errors=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
