"""The six parallel-thinking tags as added tokens (DESIGN.md: model/tags.py; issue 18).

The tags are added like Qwen3's own `<think>`: single ids, never split, matched in raw text, but *not*
special, so decoding with the transformers / vLLM default `skip_special_tokens=True` keeps them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from tokenizers import AddedToken, Tokenizer

TAG_TEXTS = ("<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>")


@dataclass(frozen=True)
class TagIds:
    """Token ids of the six tags, in the order of TAG_TEXTS."""

    parallel_open: int
    parallel_close: int
    path_open: int
    path_close: int
    summary_open: int
    summary_close: int

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        """{tag text: id}, e.g. {"<Parallel>": 151669, ...} (the `parallel_r1.tags` entry of an export)."""
        return dict(zip(TAG_TEXTS, self.as_tuple()))


def add_tag_tokens(tokenizer) -> TagIds:
    """Add the six tags to a Hugging Face fast tokenizer (idempotent) and return their ids.

    Each tag is an added token with special=False, normalized=False: one id that is never split and is
    matched in raw text (so "<Path>" written in a prompt becomes the tag token, exactly like a sampled
    one), and that `decode(..., skip_special_tokens=True)` keeps. A tokenizer saved by older
    parallel-r1 versions holds the tags as special tokens: they keep their ids and lose the special
    mark, so the model trained with them stays valid and its outputs decode with the tags.
    """
    if set(map(str, tokenizer.all_special_tokens)) & set(TAG_TEXTS):
        _unmark_special(tokenizer)
    added = tokenizer.get_added_vocab()
    missing = [t for t in TAG_TEXTS if t not in added]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    ids = [tokenizer.convert_tokens_to_ids(t) for t in TAG_TEXTS]
    for text, i in zip(TAG_TEXTS, ids):
        if i is None or i == tokenizer.unk_token_id or tokenizer.encode(text, add_special_tokens=False) != [i]:
            raise ValueError(f"tag {text} did not become a single token (got id {i}); is this a fast tokenizer?")
    return TagIds(*ids)


def _unmark_special(tokenizer) -> None:
    """Turn tags registered as special tokens into plain added tokens, ids unchanged, in place."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("the tokenizer holds the parallel tags as special tokens and is not a fast tokenizer; "
                         "load it with AutoTokenizer (a tokenizer.json) to re-register them")
    # The Rust tokenizer has no call that drops a token from its special set, so it is rebuilt from its
    # own JSON with the tags' flags changed; transformers itself swaps `_tokenizer` the same way.
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for entry in state["added_tokens"]:
        if entry["content"] in TAG_TEXTS:
            entry.update(special=False, normalized=False)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.extra_special_tokens = [t for t in tokenizer.extra_special_tokens if str(t) not in TAG_TEXTS]
