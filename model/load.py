"""Load, build and save Qwen3 models as plain Hugging Face directories.

Loading reads config.json, builds the stock `transformers` Qwen3ForCausalLM on the meta device and
assigns the safetensors weights with a strict key check, so a missing or extra tensor is an error
naming the directory instead of a silently random layer. Saving writes a directory that plain
`AutoModelForCausalLM.from_pretrained` loads unchanged (issue 18): weights in the dtype the model came from,
`use_cache: true`, the source's generation_config.json, and a `parallel_r1` entry in config.json naming the
variant and the tag ids. `load_for_inference` loads such an export back with the structured patch if it needs one.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from .patch import apply_structured_attention
from .tags import add_tag_tokens
from .tokenizer import stop_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 4 * 2**30


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_attention(requested: str = "auto", device: str | torch.device = "cpu", structured: bool = False) -> str:
    """Pick the attention implementation.

    auto: flash_attention_2 for the causal variant when flash-attn is importable and the device is
    CUDA; flex_attention for the structured variant on CUDA (path-window masks need a BlockMask);
    sdpa otherwise (the only choice on CPU, and the structured fallback).
    """
    cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if cuda and structured:
            return "flex_attention"
        if cuda and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"
    allowed = ("sdpa", "eager", "flex_attention", "flash_attention_2")
    if requested not in allowed:
        raise ValueError(f"unknown attention implementation {requested!r}; use auto or one of {allowed}")
    if requested == "flash_attention_2" and structured:
        raise ValueError("flash_attention_2 cannot express the structured path-window mask; use sdpa or flex_attention")
    if requested in ("flash_attention_2", "flex_attention") and not cuda:
        raise ValueError(f"{requested} needs a CUDA device; use sdpa on {device}")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("flash_attention_2 requested but flash-attn is not installed: pip install -e '.[gpu]'")
    return requested


def shard_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_config(path: str) -> Qwen3Config:
    """The Qwen3Config of a local model directory, with a clear error for anything else."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist (models are read from local paths only)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} is missing: is {path} a Hugging Face model directory?")
    with open(cfg_file) as f:
        raw = json.load(f)
    if raw.get("model_type") != "qwen3":
        raise ValueError(f"{cfg_file} has model_type {raw.get('model_type')!r}; parallel-r1 trains Qwen3 ('qwen3') models")
    return Qwen3Config.from_pretrained(path)


def _finish(model: Qwen3ForCausalLM, dtype: torch.dtype, attn: str, source_dtype: torch.dtype) -> Qwen3ForCausalLM:
    model.config._attn_implementation = attn
    model.config.use_cache = False  # training and scoring never build a cache; the sampler brings its own
    # config.dtype keeps the dtype the weights came in (not the fp32 they may train in): save_model exports in it
    model.config.dtype = source_dtype
    return model.to(dtype)


def load_model(path: str, dtype="float32", attn_implementation: str = "auto", device="cpu",
               structured: bool = False) -> Qwen3ForCausalLM:
    """Load a local Qwen3 directory (config.json + one or sharded *.safetensors). The model remembers where
    it came from (config.name_or_path) and the dtype of the stored weights (config.dtype) for its export."""
    config = read_config(path)
    config.name_or_path = path  # save_model carries this directory's generation_config.json
    files = shard_files(path)
    dtype, attn = resolve_dtype(dtype), resolve_attention(attn_implementation, device, structured)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    state = {}
    for f in files:
        state.update(load_file(f, device=str(device)))
    stored = state.get("model.embed_tokens.weight", next(iter(state.values()))).dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = expected - set(state) - tied, set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match a Qwen3 of this config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (rotary frequencies) were created on meta: rebuild them for real
    model.model.rotary_emb = Qwen3RotaryEmbedding(config).to(device)
    return _finish(model.eval(), dtype, attn, stored)


def build_model(config: dict, seed: int = 0, dtype="float32", attn_implementation: str = "auto",
                device="cpu", structured: bool = False) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 of any size, from a dict of Qwen3Config fields (seeded)."""
    dtype, attn = resolve_dtype(dtype), resolve_attention(attn_implementation, device, structured)
    cfg = Qwen3Config(**config)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    return _finish(model, dtype, attn, dtype)


def check_tokenizer_fits(model, tokenizer, path: str = "") -> None:
    """Every token id of the tokenizer must have an embedding row."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        where = f" ({path})" if path else ""
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}{where}; "
                         "use the tokenizer saved with this model or a larger vocab_size")


def save_model(out_dir: str, config: Qwen3Config, state_dict: dict, tokenizer=None, *, dtype=None,
               variant: str | None = None, template: str | None = None, prompt_style: str | None = None,
               instruction: str | None = None) -> None:
    """Write an HF directory: config.json, safetensors (sharded above 4 GiB, with an index),
    generation_config.json [+ the tokenizer].

    `state_dict` is a full (unsharded) state dict, e.g. `model.state_dict()` or the one gathered from
    FSDP (fp32 master weights); tied weights are stored once, as transformers does. The weights go out
    in `dtype`, by default `config.dtype`: the dtype load_model found on disk or build_model built in
    (a bf16 Qwen3 comes back bf16), else the state dict's own. config.json gets `use_cache: true`, and
    with `variant` a `parallel_r1` entry {variant, tags (text -> id, from the tokenizer), template,
    prompt_style, instruction (when one was set)} that parallel-r1 reads back (load_for_inference,
    evaluation) and transformers ignores.
    generation_config.json is copied from the directory the model was loaded from when it has one,
    else written from the tokenizer's stop and pad ids.
    """
    os.makedirs(out_dir, exist_ok=True)
    dtype = resolve_dtype(dtype or config.dtype or next(iter(state_dict.values())).dtype)
    state = {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = config.__class__.from_dict(config.to_dict())
    config.dtype = str(dtype).removeprefix("torch.")
    config.use_cache = True  # training turns it off; generation with the export wants its KV cache
    if variant is not None:
        info = {"variant": variant, "template": template, "prompt_style": prompt_style, "instruction": instruction}
        if tokenizer is not None:
            info["tags"] = add_tag_tokens(tokenizer).as_dict()
        config.parallel_r1 = {k: v for k, v in info.items() if v is not None}
    config.save_pretrained(out_dir)
    _write_weights(out_dir, state)
    _write_generation_config(out_dir, config, tokenizer)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _write_weights(out_dir: str, state: dict) -> None:
    """model.safetensors, or shards of at most SHARD_BYTES with model.safetensors.index.json."""
    shards, current, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k], size = state[k], size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _write_generation_config(out_dir: str, config: Qwen3Config, tokenizer=None) -> None:
    """generation_config.json: the source model's (config.name_or_path, set by load_model) copied through,
    else one with the stop tokens of the tokenizer (EOS, and <|im_end|> for chat) and its pad id."""
    source = os.path.join(config.name_or_path or "", "generation_config.json")
    target = os.path.join(out_dir, "generation_config.json")
    if config.name_or_path and os.path.isfile(source):
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)
        return
    if tokenizer is not None:
        stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    else:
        stops, pad = [config.eos_token_id] if config.eos_token_id is not None else [], config.pad_token_id
    eos = stops[0] if len(stops) == 1 else (stops or None)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=pad).save_pretrained(out_dir)


def export_info(path: str) -> dict:
    """The `parallel_r1` entry of a model directory's config.json ({} for a model not written by save_model
    with a variant): variant, tags, and the template / prompt_style / instruction it was trained with."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("parallel_r1") or {}


def load_tokenizer(path: str):
    """A local tokenizer directory, with the six tags added (idempotent)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tok = AutoTokenizer.from_pretrained(path)
    return tok, add_tag_tokens(tok)


def load_for_inference(path: str, dtype=None, device="cpu", attn_implementation: str = "auto"):
    """(model, tokenizer, tags) of an export, ready to generate: the tokenizer saved with it, the model in the
    dtype it was saved in (default) with its generation_config.json, and the structured-attention patch when
    config.json's parallel_r1.variant is "structured" (plain transformers would run such a model with
    causal attention). The patch builds the path-window mask from the whole sequence, so a structured model
    takes no KV cache: sample with rollout.Sampler (paths decoded side by side), or model.generate, which
    this turns to use_cache=False (paths written one after another, each still blind to its siblings)."""
    config = read_config(path)  # the clear errors for a directory that is not a Qwen3 model
    info = export_info(path)
    tokenizer, tags = load_tokenizer(path)
    if info.get("tags", tags.as_dict()) != tags.as_dict():
        raise ValueError(f"{path}: the tokenizer's tag ids {tags.as_dict()} differ from those the model was "
                         f"trained with ({info['tags']}); use the tokenizer saved with the model")
    structured = info.get("variant") == "structured"
    model = load_model(path, dtype or config.dtype or "float32", attn_implementation, device, structured)
    check_tokenizer_fits(model, tokenizer, path)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.use_cache = not structured
    model.generation_config.use_cache = not structured
    if structured:
        apply_structured_attention(model, tags)
    return model, tokenizer, tags
