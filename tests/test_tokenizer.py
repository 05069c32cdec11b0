import numpy as np
import pytest
from transformers import AutoTokenizer

from hbo_jax.data.formats import SkipReport, read_conversations
from hbo_jax.data.tokenizer import conversation_texts, encode, train_bpe, truncate

from conftest import FIXTURE

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [conversation_texts(c) for c in read_conversations(FIXTURE / "chat.train.jsonl", "error", SkipReport())]
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe(texts, 400, out)
    return AutoTokenizer.from_pretrained(str(out))  # what a user of the saved directory does


def test_saved_tokenizer_loads_with_autotokenizer_and_chat_template(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_loss_mask_covers_exactly_every_assistant_turn(tok):
    (ids, mask), = encode(tok, [CONV])
    trained = tok.decode(ids[mask.astype(bool)])
    assert trained == "4<|im_end|>\n6, of course<|im_end|>\n"


def test_truncation_keeps_the_response():
    ids = np.arange(20, dtype=np.int32)
    mask = np.zeros(20, np.uint8)
    mask[15:] = 1
    out_ids, out_mask = truncate(ids, mask, 8)
    assert out_mask.sum() == 5 and out_ids[-1] == 19
