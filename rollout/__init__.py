"""The batched sampler: causal and structured (paths decoded simultaneously). Uses model/ only."""
from .sampler import Rollout, Sampler, logits_to_probs, sample_next
from .structured import sampler_layout
