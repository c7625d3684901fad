"""The six parallel-thinking tags as special tokens (DESIGN.md: model/tags.py)."""
from __future__ import annotations

from dataclasses import dataclass, fields

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


def add_tag_tokens(tokenizer) -> TagIds:
    """Add the six tags to a Hugging Face tokenizer as special tokens (idempotent) and return their ids.

    Special tokens are never split and are matched in raw text, so "<Path>" written in a prompt
    becomes the single tag token, exactly like a sampled one.
    """
    existing = {str(t) for t in tokenizer.all_special_tokens}
    missing = [t for t in TAG_TEXTS if t not in existing]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in TAG_TEXTS]
    for text, i in zip(TAG_TEXTS, ids):
        if i is None or i == tokenizer.unk_token_id or tokenizer.encode(text, add_special_tokens=False) != [i]:
            raise ValueError(f"tag {text} did not become a single token (got id {i}); is this a fast tokenizer?")
    return TagIds(*ids)
