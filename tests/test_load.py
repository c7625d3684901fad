"""model/load.py and model/tags.py: round trips through plain transformers, clear errors, tag tokens."""
import json
import os
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model import (add_tag_tokens, apply_structured_attention, build_model, check_tokenizer_fits, export_info,
                   load_for_inference, load_model, load_tokenizer, save_model, structured_tags)
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


# --- the export others use (issue 18) ---------------------------------------------------------------------

SOURCE_GENERATION = {"bos_token_id": 1, "eos_token_id": 1, "max_new_tokens": 2048, "do_sample": False}
PATHS = "1 2 <Parallel><Path> 3 4 </Path><Path> 5 6 </Path></Parallel><Summary> 7 </Summary>"


def bf16_source(tok, path) -> str:
    """A bf16 'base model' directory with its own generation_config.json, as Qwen3 ships."""
    model = build_model(dict(TINY, vocab_size=len(tok), eos_token_id=tok.eos_token_id), dtype="bfloat16")
    save_model(str(path), model.config, model.state_dict(), tok)
    (path / "generation_config.json").write_text(json.dumps(SOURCE_GENERATION))
    return str(path)


def test_export_keeps_the_source_dtype_and_loads_in_plain_transformers(tok, tags, tmp_path):
    source = bf16_source(tok, tmp_path / "base")
    model = load_model(source, dtype="float32")  # trained in fp32 (CPU, or FSDP's fp32 master weights)
    save_model(str(tmp_path / "out"), model.config, model.state_dict(), tok, variant="structured",
               template="chat", prompt_style="parallel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parallel_r1 entry must not disturb transformers
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
        config = AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert plain.dtype == torch.bfloat16 and plain.config.use_cache is True
    assert config.parallel_r1 == {"variant": "structured", "template": "chat", "prompt_style": "parallel",
                                  "tags": {t: i for t, i in zip(TAG_TEXTS, range(178, 184))}}
    assert export_info(str(tmp_path / "out"))["tags"] == tags.as_dict()
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == SOURCE_GENERATION
    ids = torch.tensor([tok.encode("1 2 3", add_special_tokens=False)])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(source)(input_ids=ids).logits
        assert torch.equal(plain(input_ids=ids).logits, ref)  # bf16 -> fp32 -> bf16 is exact
    saved_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ids = saved_tok.encode(PATHS, add_special_tokens=False) + [tok.eos_token_id]
    assert saved_tok.decode(ids, skip_special_tokens=True) == PATHS


def test_export_of_a_built_model_stays_fp32_and_writes_the_stop_ids(tiny_model, tok, tmp_path):
    save_model(str(tmp_path), tiny_model.config, tiny_model.state_dict(), tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["use_cache"] is True and "parallel_r1" not in cfg
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    # EOS and <|im_end|> (a chat-trained model ends its turn with it), padding with EOS
    assert generation["eos_token_id"] == [1, 3] and generation["pad_token_id"] == 1
    save_model(str(tmp_path / "half"), tiny_model.config, tiny_model.state_dict(), dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "half")).dtype == torch.bfloat16


def test_load_for_inference_patches_a_structured_export(tok, tags, tmp_path):
    model = load_model(bf16_source(tok, tmp_path / "base"), dtype="float32")
    for variant in ("causal", "structured"):
        save_model(str(tmp_path / variant), model.config, model.state_dict(), tok, variant=variant)
    causal, _, _ = load_for_inference(str(tmp_path / "causal"))
    assert structured_tags(causal) is None and causal.generation_config.use_cache is True
    patched, tok2, tags2 = load_for_inference(str(tmp_path / "structured"))
    assert tags2 == tags and structured_tags(patched) == tags and patched.dtype == torch.bfloat16
    assert patched.generation_config.max_new_tokens == 2048  # the saved generation_config.json
    ids = torch.tensor([tok.encode(PATHS, add_special_tokens=False)])
    reference = apply_structured_attention(load_model(str(tmp_path / "structured"), "bfloat16"), tags)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "structured"))
    with torch.no_grad():
        logits = patched(input_ids=ids).logits
        assert torch.equal(logits, reference(input_ids=ids).logits)
        assert not torch.equal(logits, plain(input_ids=ids).logits)  # plain transformers: causal attention
        # model.generate works on the patched model (no KV cache): the same tokens as a plain greedy loop
        out = patched.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        loop = ids
        for _ in range(4):
            loop = torch.cat([loop, patched(input_ids=loop).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, loop)


def test_load_for_inference_refuses_a_foreign_tokenizer(tiny_model, tok, tmp_path):
    save_model(str(tmp_path), tiny_model.config, tiny_model.state_dict(), tok, variant="causal")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["parallel_r1"]["tags"]["<Path>"] = 7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tag ids"):
        load_for_inference(str(tmp_path))
