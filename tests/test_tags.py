"""model/tags.py and the decoding paths of model/tokenizer.py: the six tags are single ids that survive
`skip_special_tokens=True` (issue 18), fit Qwen3's embedding, and old tokenizers are migrated in place."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model import add_tag_tokens, load_tokenizer
from model.tags import TAG_TEXTS
from model.tokenizer import decode_responses
from rewards import parallel_stats

BLOCK = "<Parallel><Path> 1+2=3 </Path><Path> 2+1=3 </Path></Parallel>\n<Summary> 3 </Summary>"


def test_tags_are_single_tokens_and_round_trip(tok, tags):
    assert len(set(tags.as_tuple())) == 6
    for text, i in zip(TAG_TEXTS, tags.as_tuple()):
        assert tok.encode(text, add_special_tokens=False) == [i]
    text = "3 paths:\n" + BLOCK
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert add_tag_tokens(tok) == tags  # idempotent
    assert len(tok) == len(set(tok.get_vocab().values()))
    assert tags.as_dict() == {t: tok.convert_tokens_to_ids(t) for t in TAG_TEXTS}


def test_tags_survive_skip_special_tokens(tok, tags):
    ids = tok.encode("x " + BLOCK, add_special_tokens=False) + [tok.eos_token_id]
    # the defaults of transformers and vLLM: special tokens (EOS here) go, the tags stay
    assert tok.decode(ids, skip_special_tokens=True) == "x " + BLOCK
    assert tok.decode(ids, skip_special_tokens=False) == "x " + BLOCK + "<|endoftext|>"
    assert not set(tags.as_tuple()) & set(tok.all_special_ids)
    assert all(not tok.added_tokens_decoder[i].special for i in tags.as_tuple())


def test_decode_responses_and_parallel_stats_see_the_tags(tok):
    body = tok.encode("so " + BLOCK + "\nfinal answer: 3", add_special_tokens=False)
    rows = [body + [tok.eos_token_id, tok.pad_token_id], body[:4] + [tok.pad_token_id] * (len(body) - 2)]
    ids = torch.tensor(rows)  # (2, len(body) + 2), right-padded
    mask = torch.tensor([[1] * (len(body) + 1) + [0], [1] * 4 + [0] * (len(body) - 2)])
    texts = decode_responses(tok, ids, mask)
    assert texts == ["so " + BLOCK + "\nfinal answer: 3", tok.decode(body[:4])]
    stats = parallel_stats(texts[0])
    assert stats.num_blocks == 1 and stats.paths_per_block == [2] and stats.well_formed


def test_qwen_tags_fit_the_embedding_and_decode_like_think(qwen_tok, tmp_path):
    tok = qwen_tok
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</think>"]) == [151643, 151644, 151645, 151668]
    tags = add_tag_tokens(tok)
    assert list(tags.as_tuple()) == list(range(151669, 151675))
    assert max(tags.as_tuple()) < 151936 and len(tok) == 151675  # Qwen3's 151,936-row embedding has room
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    text = "<think>Let x = 12.\n<Parallel><Path>x+1</Path><Path>1+x</Path></Parallel><Summary>13</Summary></think>"
    ids = tok.encode(text, add_special_tokens=False)
    assert all(ids.count(t) >= 1 for t in tags.as_tuple())
    for t in tags.as_tuple() + (151667, 151668):  # the tags carry Qwen3's <think> / </think> flags
        added = tok.added_tokens_decoder[t]
        assert not added.special and not added.normalized
    assert tok.decode(ids + [151645], skip_special_tokens=True) == text  # <|im_end|> dropped, tags kept
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.decode(ids, skip_special_tokens=True) == text


def _old_tokenizer_dir(path) -> str:
    """A tokenizer saved by parallel-r1 before issue 18: the tags added as special tokens."""
    vocab = {p: i for i, p in enumerate(["<unk>", "<|endoftext|>", " ", "x", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": list(TAG_TEXTS)}, replace_extra_special_tokens=False)
    tok.save_pretrained(str(path))
    return str(path)


def test_old_tokenizer_with_special_tags_is_migrated_in_place(tmp_path):
    old = AutoTokenizer.from_pretrained(_old_tokenizer_dir(tmp_path / "old"))
    old_ids = [old.convert_tokens_to_ids(t) for t in TAG_TEXTS]
    text = "x <Parallel><Path> a </Path><Path> b </Path></Parallel>"
    ids = old.encode(text, add_special_tokens=False)
    assert old_ids == list(range(6, 12)) and old.decode(ids, skip_special_tokens=True) == "x  a  b "  # the bug

    tok, tags = load_tokenizer(str(tmp_path / "old"))
    assert list(tags.as_tuple()) == old_ids and len(tok) == len(old) == 12  # same ids: the model stays valid
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert set(map(str, tok.all_special_tokens)) == {"<unk>", "<|endoftext|>"}
    assert add_tag_tokens(tok) == tags and len(tok) == 12  # idempotent after the migration
    tok.save_pretrained(str(tmp_path / "new"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "new"))
    assert again.decode(ids, skip_special_tokens=True) == text and not set(old_ids) & set(again.all_special_ids)


def test_slow_tokenizer_with_special_tags_is_refused():
    class Slow:  # no backend_tokenizer: nothing to rebuild
        all_special_tokens = ["<Path>"]

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        add_tag_tokens(Slow())
