"""Bytes of each piece a rank holds, from a Qwen3 config.json's shapes alone: parameters (sharded or not), the
activations a micro-batch saves for backward and the transient working sets of backward and of sampling.
curriculum/memory.py composes them into a stage's plan; tests/test_memory.py checks them against what a real
small Qwen3 allocates on CPU."""
from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import Qwen3Config

GiB = 2**30
# Beside our tensors a CUDA rank holds its context (~0.5 GiB), NCCL buffers, cuBLAS workspaces and what the
# caching allocator loses to fragmentation: a fixed allowance, not a measurement.
CUDA_RESERVE_BYTES = 3 * GiB
PREFETCHED_LAYERS = 2  # FSDP2 holds the decoder layer computing and the next one, prefetched
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    """The shapes of a Qwen3ForCausalLM that memory depends on."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False

    @classmethod
    def from_config(cls, raw: dict) -> "Arch":
        """From config.json fields (missing ones take Qwen3Config's defaults, as make_model's build does)."""
        c = Qwen3Config.from_dict(raw)
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   c.num_key_value_heads, c.head_dim, c.vocab_size, c.tie_word_embeddings, c.attention_bias)

    def param_shapes(self) -> dict:
        """name -> shape of every parameter, as model.named_parameters() lists them (a tied head once)."""
        h, hd, i = self.hidden, self.head_dim, self.intermediate
        q, kv = self.heads * hd, self.kv_heads * hd
        layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
                 "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        if self.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,)})
        shapes = {"model.embed_tokens.weight": (self.vocab, h), "model.norm.weight": (h,)}
        shapes.update({f"model.layers.{n}.{k}": s for n in range(self.layers) for k, s in layer.items()})
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def numel(self, world: int = 1, part: str = "all") -> int:
        """Elements per rank when each parameter's dim 0 is sharded over `world` ranks (FSDP2 pads it to a
        multiple of the world size). part: "all", "layer" (one decoder layer) or "root" (the rest)."""
        keep = {"all": lambda n: True, "root": lambda n: not n.startswith("model.layers."),
                "layer": lambda n: n.startswith("model.layers.0.")}[part]
        return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for n, s in self.param_shapes().items() if keep(n))


# --- activations of one micro-batch (checked against torch's saved tensors in tests/test_memory.py) ------------

def layer_activation_bytes(a: Arch, tokens: int, row_tokens: int, e: int, attn: str) -> int:
    """Bytes one decoder layer saves for backward over `tokens` tokens in rows of `row_tokens`, compute dtype of
    `e` bytes. RMSNorm keeps its float32 input, its normalised output and 1/rms; the q/k/v and gate/up
    projections each read one normalised input; the MLP keeps SiLU's input and output, up's output and their
    product. Dense-mask attention (padded batches) repeats K and V to every query head and converts the bool mask
    to the compute dtype in every layer; flash-attn and flex keep K and V at their own heads and no dense mask."""
    h, q, kv, i = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim, a.intermediate
    norms = 2 * (h * (4 + e) + 4) + q * (4 + e) + a.heads * 4 + kv * (4 + e) + a.kv_heads * 4  # 2 layer + q/k norms
    per_token = norms + 2 * h * e + 4 * i * e
    if attn == "sdpa":
        per_token += 4 * q * e + a.heads * 4 + row_tokens * e  # q, K, V, output (o_proj's input); logsumexp; mask
    elif attn == "eager":  # q, K, V, o_proj's input; float32 probabilities (and their cast to the compute dtype)
        per_token += 4 * q * e + a.heads * row_tokens * (4 if e == 4 else 4 + e)
    else:  # q, K, V, output and o_proj's input (a transposed copy); logsumexp
        per_token += 3 * q * e + 2 * kv * e + a.heads * 4
    return tokens * per_token


def activation_bytes(a: Arch, tokens: int, row_tokens: int, e: int, attn: str, checkpointing: bool,
                     entropy: bool = True) -> int:
    """Bytes saved for backward (or kept for recomputation) by one forward of a micro-batch of `tokens` tokens
    through the model and the chunked log-prob head (grpo/logprobs.py: the final norm, the head's input, targets,
    logsumexp and entropy per token, never the logits). With activation checkpointing each decoder layer keeps
    only what it is called with: the hidden states, the mask, the rotary tables and the position ids."""
    head = a.hidden * (4 + e) + 4 + a.hidden * e + 8 + 4 + (4 if entropy else 0)  # final norm; head input, target,
    outside = tokens * (head + 8 + 2 * a.head_dim * e)  # logsumexp, entropy; the embedding's ids; rotary cos, sin
    if not checkpointing:
        return a.layers * layer_activation_bytes(a, tokens, row_tokens, e, attn) + outside
    mask = {"sdpa": row_tokens, "eager": row_tokens * e}.get(attn, 0)  # the dense mask: bool, float for eager
    return tokens * (a.layers * a.hidden * e + 8 + mask) + outside


def backward_work_bytes(a: Arch, tokens: int, row_tokens: int, e: int, attn: str, checkpointing: bool,
                        chunk: int) -> int:
    """Transient bytes on top of the saved activations during backward: the larger of the log-prob head's
    backward (two float32 (chunk, V) logits buffers, the float32 head-weight gradient, the hidden-state gradient)
    and one decoder layer's backward (its gradient buffers, about its saved size; with checkpointing its
    recomputed activations too)."""
    head = 2 * min(chunk, tokens) * a.vocab * 4 + a.vocab * a.hidden * 4 + tokens * a.hidden * e
    layer = layer_activation_bytes(a, tokens, row_tokens, e, attn) * (2 if checkpointing else 1)
    return max(head, layer)


def sampling_work_bytes(a: Arch, prefill_prompts: int, prompt_tokens: int, rows: int, e: int, kv_tokens: int) -> int:
    """Transient bytes while sampling (no autograd): the larger of a prefill forward of `prefill_prompts` x
    `prompt_tokens` (residual stream, one layer's MLP intermediates or its attention with the dense mask) and a
    decode step over `rows` rows: its logits (compute dtype and float32), the float64 CDF of one sampling chunk
    (rollout.sampler.SAMPLE_ELEMENTS) and one chunk of rows' gathered K/V pages, `kv_tokens` slots a row at most,
    expanded to the query heads (rollout.attention.ATTENTION_CHUNK_BYTES)."""
    from rollout.attention import ATTENTION_CHUNK_BYTES
    from rollout.sampler import SAMPLE_ELEMENTS
    h, q, i = a.hidden, a.heads * a.head_dim, a.intermediate
    per_token = 2 * h * e + h * 4 + max(3 * i * e, 4 * q * e + prompt_tokens * (1 + e))
    gathered = min(rows * 2 * kv_tokens * a.head_dim * (a.heads + a.kv_heads) * e, ATTENTION_CHUNK_BYTES)
    decode = rows * a.vocab * (e + 4) + 2 * 8 * min(rows * a.vocab, SAMPLE_ELEMENTS) + gathered
    return max(prefill_prompts * prompt_tokens * per_token, decode)
