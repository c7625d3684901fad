"""The batched sampler: causal and structured (paths decoded simultaneously), under a KV budget. Uses model/ only."""
from .cache import kv_budget_bytes, kv_bytes_per_token, min_pool_rows, pool_rows
from .rows import Rollout
from .sampler import Sampler, SamplingAborted, filter_logits, logits_to_probs, sample_next
from .structured import sampler_layout
