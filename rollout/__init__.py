"""The batched sampler: causal and structured (paths decoded simultaneously), on a paged KV cache under a budget.
Uses model/ only."""
from .cache import DEFAULT_PAGE_SIZE, kv_budget_bytes, kv_bytes_per_token, pages_for, pool_pages, sample_pages
from .rows import Rollout
from .sampler import Sampler, SamplingAborted, describe, filter_logits, logits_to_probs, sample_next
from .structured import sampler_layout
