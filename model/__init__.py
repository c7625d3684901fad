"""Qwen3 loading and saving, the parallel tags, the structure of a sequence and the attention patch.
Imports nothing else from this project (the bottom of the import ladder)."""
from .load import (build_model, check_tokenizer_fits, export_info, load_for_inference, load_model, load_tokenizer,
                   save_model)
from .patch import apply_structured_attention, remove_structured_attention, structured_tags
from .structure import BatchStructure, Structure, build_structure, build_structure_batch
from .tags import TAG_TEXTS, TagIds, add_tag_tokens
