"""model/load.py and model/tags.py: round trips through plain transformers, clear errors, tag tokens."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import add_tag_tokens, build_model, check_tokenizer_fits, load_model, load_tokenizer, save_model
from model import load as load_mod
from model.tags import TAG_TEXTS

from .conftest import TINY


def test_save_load_round_trip_gives_identical_logits(tiny_model, tok, tmp_path):
    save_model(str(tmp_path), tiny_model.config, tiny_model.state_dict(), tok)
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, use_cache=False).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))(input_ids=ids, use_cache=False).logits
        ours = load_model(str(tmp_path))(input_ids=ids, use_cache=False).logits
    assert torch.equal(plain, ref) and torch.equal(ours, ref)
    tok2, tags2 = load_tokenizer(str(tmp_path))
    assert tok2.encode("hello <Path> 12", add_special_tokens=False) == tok.encode("hello <Path> 12", add_special_tokens=False)
    assert tags2 == add_tag_tokens(tok)
    check_tokenizer_fits(load_model(str(tmp_path)), tok2)


def test_sharded_checkpoint_loads(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(load_mod, "SHARD_BYTES", 20_000)  # force several shards on a tiny model
    save_model(str(tmp_path), tiny_model.config, tiny_model.state_dict())
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    ids = torch.arange(10)[None]
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, use_cache=False).logits
        assert torch.equal(load_model(str(tmp_path))(input_ids=ids, use_cache=False).logits, ref)
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
        assert torch.equal(plain(input_ids=ids, use_cache=False).logits, ref)


def test_bf16_load(tiny_model, tmp_path):
    save_model(str(tmp_path), tiny_model.config, tiny_model.state_dict())
    m = load_model(str(tmp_path), dtype="bfloat16")
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16


def test_clear_errors(tiny_model, tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    save_model(str(tmp_path), tiny_model.config, tiny_model.state_dict())
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_model(str(tmp_path))
    small = build_model(dict(TINY, vocab_size=50))
    with pytest.raises(ValueError, match="tokenizer has"):
        check_tokenizer_fits(small, tok, "some/dir")


def test_missing_weight_is_an_error(tiny_model, tmp_path):
    state = {k: v for k, v in tiny_model.state_dict().items() if "layers.1.mlp" not in k}
    save_model(str(tmp_path), tiny_model.config, state)
    with pytest.raises(ValueError, match="missing"):
        load_model(str(tmp_path))


def test_attention_choice():
    assert load_mod.resolve_attention("auto", "cpu") == "sdpa"
    assert load_mod.resolve_attention("auto", "cpu", structured=True) == "sdpa"
    assert load_mod.resolve_attention("auto", "cuda", structured=True) == "flex_attention"
    with pytest.raises(ValueError, match="CUDA"):
        load_mod.resolve_attention("flex_attention", "cpu")
    with pytest.raises(ValueError, match="path-window"):
        load_mod.resolve_attention("flash_attention_2", "cuda", structured=True)
