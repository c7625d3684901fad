"""GRPO: advantages and losses (pure functions), chunked log-probs, the train loop, FSDP, checkpoints."""
