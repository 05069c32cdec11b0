"""benchmarks/accelerator_run.py's pieces that need no device (CI also runs its --smoke mode)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accelerator_run as ar  # noqa: E402


def test_peak_is_looked_up_from_the_device_kind():
    assert ar.peak_tflops("NVIDIA H200") == ar.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert ar.peak_tflops("NVIDIA H100 PCIe") == 756.0  # matched before the plain "H100"
    assert ar.peak_tflops("cpu") is None  # an unknown chip: no MFU rather than a made-up one


def test_a_result_renders_into_the_docs_block_in_place(tmp_path):
    step = {"shape": "smollm2_135m", "batch": 16, "seq": 2048, "attention": "cudnn", "median_s_per_step": 0.5,
            "tokens_per_s": 65536.0, "examples_per_s": 32.0, "model_tflops_per_s": 400.0, "mfu": 0.404}
    res = {"smoke": False, "started": "now", "total_seconds": 400.0, "budget_s": 470.0, "json": "x.json",
           "phases": {"env": {"status": "ok", "seconds": 3.0, "result": {"device_kind": "NVIDIA H200"}},
                      "train_smollm2": {"status": "ok", "seconds": 60.0, "result": step},
                      "train_1b": {"status": "timeout", "seconds": 120.0},
                      "study": {"status": "ok", "seconds": 1.0, "result": {"status": "not wired"}}},
           "derived": {}}
    block = ar.render(res)
    assert "| smollm2_135m | 16 x 2048 | cudnn | 0.5000 | 65,536 | 400.0 | 40.4% |" in block
    assert "| train_1b | timeout | 120 |" in block and "| study | ok (not wired) | 1 |" in block
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n\n{ar.BEGIN}\nold\n{ar.END}\n\nafter\n")
    ar.write_docs(block, doc)
    ar.write_docs(block, doc)  # idempotent: the block is replaced, not appended
    assert doc.read_text() == f"intro\n\n{block}\n\nafter\n"


def test_merge_renders_its_medians_against_the_disk():
    row = {"shape": "smollm2_135m", "cache": "warm", "merges": 3, "input_GB": 1.08, "seconds": 0.5,
           "GB_per_s": 2.16, "cpu_ns_per_element": 11.0, "disk_cold_GB_per_s": 3.0, "disk_direct_GB_per_s": 4.0,
           "vs_cold_disk": 0.72, "vs_direct_disk": 0.54, "peak_rss_GB": 0.6}
    res = {"smoke": False, "started": "now", "total_seconds": 400.0, "budget_s": 470.0, "json": "x.json",
           "phases": {"env": {"status": "ok", "seconds": 3.0, "result": {}},
                      "merge": {"status": "ok", "seconds": 40.0, "result": {"cpu_count": 16, "rows": [row]}}},
           "derived": {}}
    block = ar.render(res)
    assert "smollm2_135m shape, 16 CPU cores; medians of 3 merges" in block
    assert "| warm | 1.08 | 0.50 | 2.16 | 11.0 | 3.00 / 4.00 | 0.72, 0.54 | 0.60 |" in block


def test_scalebio_at_1b_renders_each_variant_against_plain():
    variants = {"plain": {"device_peak_mib": 20480.0, "peak_rss_mib": 3072.0, "seconds": 0.5,
                          "device_vs_plain": 1.0, "rss_vs_plain": 1.0, "time_vs_plain": 1.0},
                "scalebio": {"device_peak_mib": 30720.0, "peak_rss_mib": 3072.0, "seconds": 1.25,
                             "device_vs_plain": 1.5, "rss_vs_plain": 1.0, "time_vs_plain": 2.5},
                "scalebio_lisa_4": {"skipped": "no time left"}}
    res = {"smoke": False, "started": "now", "total_seconds": 400.0, "budget_s": 470.0, "json": "x.json",
           "phases": {"env": {"status": "ok", "seconds": 3.0, "result": {}},
                      "scalebio_1b": {"status": "ok", "seconds": 140.0, "result": {
                          "shape": "llama_1b", "batch": 4, "seq": 256, "param_dtype": "float32",
                          "dtype": "bfloat16", "steps": 3, "variants": variants}}},
           "derived": {}}
    block = ar.render(res)
    assert "| scalebio | 30.00 GiB | 1.50 | 3.00 GiB | 1.00 | 1.2500 | 2.50 |  |" in block
    assert "| scalebio_lisa_4 | — | — | — | — | — | — | no time left |" in block
    assert "Train step" not in block  # no train phase ran: no empty table
