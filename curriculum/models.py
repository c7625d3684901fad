"""Which model to evaluate: a path (an HF directory, a checkpoint, a run directory) resolved to a ModelRef
with the variant and prompt settings it was trained with, every checkpoint of a run (`--across`), and the
model loaded for evaluation."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import yaml

from grpo.checkpoint import defect, export_fields, latest, list_checkpoints
from model import check_tokenizer_fits, export_info, load_model, load_tokenizer

from .report import EvalError

VARIANTS = ("causal", "structured")
PROMPT_KEYS = ("template", "prompt_style", "instruction")  # data.* keys a model is trained with and evaluated with


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: its HF directory, variant, names, and the prompt settings it was trained with."""
    path: str  # config.json + safetensors (+ tokenizer)
    variant: str  # causal | structured
    name: str  # "step-N", "final" or the directory name
    label: str  # the row label of tables, e.g. "stage2/step-100"
    step: int | None = None
    template: str | None = None  # data.template / data.prompt_style saved with the model (None: not saved);
    prompt_style: str | None = None  # used unless the eval config or --set names its own (evaluate_ref)
    instruction: str | None = None  # data.instruction, when the model was trained with one


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _saved_settings(hf_dir: str, *config_files: str) -> dict:
    """variant, template, prompt_style and instruction of the first resolved config.yaml that exists (read as
    checkpoints and exports write them: export_fields), else of the parallel_r1 entry of the model's
    config.json (an export copied away from its run)."""
    for path in config_files:
        if os.path.isfile(path):
            with open(path) as f:
                found = export_fields(yaml.safe_load(f) or {})
            break
    else:
        found = export_info(hf_dir)
    return {"variant": found.get("variant") if found.get("variant") in VARIANTS else None,
            "template": found.get("template"), "prompt_style": found.get("prompt_style"),
            "instruction": found.get("instruction")}


def _ref(path: str, variant: str | None, name: str, label: str, *config_files: str, step: int | None = None):
    saved = _saved_settings(path, *config_files)
    return ModelRef(path, variant or saved["variant"] or "causal", name, label, step, saved["template"],
                    saved["prompt_style"], saved["instruction"])


def resolve_model(path: str, variant: str | None = None) -> ModelRef:
    """An HF directory (config.json; a checkpoint's model/ or a run's final/ take the variant and prompt
    settings from the config.yaml beside them, else from config.json's parallel_r1 entry), a checkpoint
    `step-N` (its model/ and config.yaml), or a run directory (final/, else its latest complete
    checkpoint). `variant` overrides the saved one."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise EvalError(f"--model {path}: no such directory")
    base, parent = os.path.basename(path), os.path.dirname(path)
    if _is_hf(path) and base == "model" and os.path.basename(parent).startswith("step-"):
        return resolve_model(parent, variant)  # a checkpoint's model/: the checkpoint
    if _is_hf(path):
        beside = (os.path.join(path, "config.yaml"), os.path.join(parent, "config.yaml"))
        label = f"{os.path.basename(parent)}/final" if base == "final" else base
        return _ref(path, variant, base, label, *beside)
    if _is_hf(os.path.join(path, "model")):
        step = int(base[5:]) if base.startswith("step-") and base[5:].isdigit() else None
        run = os.path.basename(os.path.dirname(parent))
        return _ref(os.path.join(path, "model"), variant, base, f"{run}/{base}", os.path.join(path, "config.yaml"),
                    step=step)
    if _is_hf(os.path.join(path, "final")):
        return resolve_model(os.path.join(path, "final"), variant)
    ckpt = latest(path)
    if ckpt is not None:
        return resolve_model(ckpt, variant)
    subdirs = [os.path.join(path, d) for d in sorted(os.listdir(path))]
    stages = [os.path.basename(d) for d in subdirs if _is_hf(os.path.join(d, "final")) or latest(d)]
    hint = f"; it holds stage run directories, pass one of them: {stages}" if stages else ""
    raise EvalError(f"--model {path}: not a Hugging Face model directory (no config.json), a checkpoint (no "
                    f"model/config.json) or a run directory (no final/ and no complete checkpoints/step-N){hint}")


def run_models(run_dir: str, variant: str | None = None) -> list[ModelRef]:
    """Every complete checkpoint of a run in step order, then final/ (for --across)."""
    refs = []
    for _, path in list_checkpoints(run_dir):
        problem = defect(path)
        if problem is not None:
            warnings.warn(f"skipping checkpoint {path}: {problem}")
        elif _is_hf(os.path.join(path, "model")):
            refs.append(resolve_model(path, variant))
    if _is_hf(os.path.join(run_dir, "final")):
        refs.append(resolve_model(os.path.join(run_dir, "final"), variant))
    if not refs:
        raise EvalError(f"--across {run_dir}: no complete checkpoints/step-N/model and no final/ to evaluate; "
                        "pass a stage's run directory")
    return refs


def load_for_eval(ref: ModelRef, cfg):
    """(model, tokenizer, tags) of `ref` on cfg.model.device; model.dtype applies on CUDA (fp32 on CPU). The
    tokenizer: model.tokenizer when it names a directory, else the one saved with the model."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.model.device == "auto"
                          else cfg.model.device)
    if cfg.model.tokenizer not in (None, "words"):
        tokenizer, tags = load_tokenizer(cfg.model.tokenizer)
    elif any(os.path.isfile(os.path.join(ref.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer, tags = load_tokenizer(ref.path)  # checkpoints and final/ carry the tokenizer they trained with
    else:
        raise EvalError(f"{ref.path} holds no tokenizer; point model.tokenizer at one (--set model.tokenizer=<dir>)")
    dtype = cfg.model.dtype if device.type == "cuda" else "float32"
    model = load_model(ref.path, dtype, cfg.model.attn_implementation, device, ref.variant == "structured")
    check_tokenizer_fits(model, tokenizer, ref.path)
    return model, tokenizer, tags


def prompt_settings(ref: ModelRef, cfg, explicit=()) -> dict:
    """template and prompt_style for evaluating `ref`: the config's where it names them (`explicit`, see
    explicit_prompt_keys), else those the model was trained with, else the config's defaults."""
    return {key: getattr(cfg.data, key) if key in explicit or getattr(ref, key) is None else getattr(ref, key)
            for key in PROMPT_KEYS}
