"""Tokenizers and chat-template encoding with assistant-only loss masks.

The demo trains a byte-level BPE with `tokenizers` on the mixture's train split and saves
it as a `transformers` tokenizer directory (ChatML template) that `AutoTokenizer` loads.
Any other HF tokenizer directory with a chat template works the same way: assistant
spans are found by rendering the template on growing prefixes of the conversation, so
no template needs special `{% generation %}` markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from hbo_jax.data.atomic import private_tmp, publish
from hbo_jax.data.formats import Conversation
from hbo_jax.errors import DataError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path):
    """Trains a byte-level BPE and saves a transformers tokenizer directory; returns it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, chat_template=CHATML_TEMPLATE)
    tmp = private_tmp(out_dir)
    fast.save_pretrained(tmp)
    publish(tmp, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise DataError(f"data.tokenizer={path}: not a tokenizer directory (no tokenizer.json)")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.chat_template:
        raise DataError(f"data.tokenizer={path}: tokenizer has no chat_template")
    return tok


def conversation_texts(conv: Conversation) -> str:
    return "\n".join(m["content"] for m in conv)


def _assistant_spans(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Renders the conversation; returns the text and the char spans of assistant turns."""
    render = tokenizer.apply_chat_template
    text = render(conv, tokenize=False)
    spans = []
    for k, msg in enumerate(conv):
        if msg["role"] != "assistant":
            continue
        start = len(render(conv[:k], tokenize=False, add_generation_prompt=True)) if k else 0
        end = len(render(conv[: k + 1], tokenize=False))
        if text[:end] != render(conv[: k + 1], tokenize=False):
            raise ValueError("chat template is not prefix-consistent; cannot locate assistant turns")
        spans.append((start, end))
    return text, spans


def encode(tokenizer, convs: list[Conversation]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chat template -> (token ids int32, loss mask uint8) per conversation.

    mask[t] = 1 when token t belongs to an assistant turn (content and end-of-turn
    marker), i.e. when predicting it counts towards the loss.
    """
    if not convs:
        return []
    rendered = [_assistant_spans(tokenizer, c) for c in convs]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            mask |= ((starts >= a) & (starts < b)).astype(np.uint8)
        out.append((np.asarray(ids, dtype=np.int32), mask))
    return out


def truncate(ids: np.ndarray, mask: np.ndarray, max_len: int):
    """Fits a sequence into max_len tokens, keeping the response.

    Too long: keep the last max_len tokens (drops the start of the prompt, keeps the
    whole response). If the response alone is too long, start one token before the
    first assistant token and cut the end. Returns None when nothing trainable is left.
    """
    if len(ids) > max_len:
        first = int(np.argmax(mask)) if mask.any() else 0
        start = len(ids) - max_len
        if start >= first:
            start = max(first - 1, 0)
        ids, mask = ids[start:start + max_len], mask[start:start + max_len]
    # The first token is never predicted, so it cannot carry loss.
    if not mask[1:].any():
        return None
    return ids, mask
