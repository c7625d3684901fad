"""One whole GRPO step (sample G completions per prompt, score, update) with our trainer vs TRL's GRPOTrainer.

"ratio" = our median step seconds / TRL's median step seconds (< 1: ours is faster; target <= 0.4). Both sides
train a deep copy of the same seeded tiny Qwen3 on the same P prompts, G completions each, max_new_tokens,
temperature 1, beta = 0 (no reference model), one optimizer update per batch (on-policy: one mini-batch, one
epoch, no old-log-prob pass), AdamW at the same lr, constant schedule, grad clip 1, float32, no gradient
checkpointing. The reward (1 if the prompt's answer word appears in the completion) is the same function on
both sides, scored in this process. The model's head bans padding, <|im_end|> and the tags while sampling, so
both sides decode the same plain words; two length regimes:
  --lengths eos (default): EOS gets a logit bias so that a completion ends with probability --eos-rate at each
      token (mean length about 1/rate, a long tail cut at max_new_tokens), as in RL on real answers: a group
      holds short and long completions. This is where finished rows leaving the batch and length-sorted
      micro-batches (our --micro-batch-tokens budget) pay; TRL decodes every row until the longest ends and
      trains on the batch padded to its longest completion.
  --lengths fixed: EOS banned too, every completion is exactly max_new_tokens long on both sides: the same
      work, so the ratio isolates per-token costs.
Steps alternate (TRL step i, then our step i) so load drift on a shared machine hits both alike; the first
--warmup steps of each are dropped. Phases: sample = generation (TRL: _generate_and_score_completions minus
its reward call), score = decode + reward (TRL: _calculate_rewards), update = the rest (advantages, batch,
forward/backward, clip, optimizer step; ours also builds the step's metrics). "pad_share": padding tokens / all
tokens in the update's forwards (ours packs its micro-batches, grpo.pack; --no-pack pads them as before),
"trl_pad_share" the same for TRL, which pads the batch to its longest prompt and completion.

    python benchmarks/grpo_step.py                  # P x G = 8 x 8, <= 256 new tokens, hidden 256, 4 layers
    python benchmarks/grpo_step.py --lengths fixed  # every completion 128 tokens long
    python benchmarks/grpo_step.py --quick          # P x G = 4 x 8, <= 64 new tokens, hidden 128, 2 layers
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch
from packaging.version import Version

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.config import build_config  # noqa: E402
from grpo.fsdp import Dist  # noqa: E402
from grpo.optim import build_optimizer  # noqa: E402
from grpo.loop import TrainState  # noqa: E402
from grpo.trainer import grpo_step  # noqa: E402
from model import build_model  # noqa: E402
from model.tags import add_tag_tokens  # noqa: E402
from model.tokenizer import build_word_tokenizer, newline_id  # noqa: E402
from rewards import RewardPool, RewardSet  # noqa: E402
from rollout import Sampler  # noqa: E402

MIN_TRL = "1.16"  # the version this script was written against (setup.py's bench extra)
ANSWERS = ["answer", "sum", "total", "first", "product", "number", "path", "step"]


def contains_answer(response: str, gold: str, step: int) -> tuple[float, dict]:
    """Our reward_fn signature: 1 if the answer word occurs in the response."""
    hit = float(gold in response)
    return hit, {"accuracy": hit}


def trl_contains_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL's reward_funcs signature over the same function (`answer` is the dataset column)."""
    return [contains_answer(c, a, 0)[0] for c, a in zip(completions, answer)]


class BannedHead(torch.nn.Linear):
    """A bias-free lm_head whose forward adds -1e4 to banned ids and `eos_bias` to EOS. Only sampling calls
    forward: both log-prob paths (ours, TRL's fused head) read .weight alone, so they score the same plain
    head (on-policy, one update per batch: old log-probs are the trainer's own, on both sides)."""

    def __init__(self, head: torch.nn.Linear, banned: list[int], eos_id: int | None = None, eos_bias: float = 0.0):
        super().__init__(head.in_features, head.out_features, bias=False)
        with torch.no_grad():
            self.weight.copy_(head.weight)
        self.register_buffer("ban", torch.zeros(head.out_features))
        self.ban[banned] = -1e4
        if eos_id is not None:
            self.ban[eos_id] = eos_bias

    def forward(self, h):
        return super().forward(h) + self.ban


def tiny_model(tok, hidden: int, layers: int, eos_rate: float | None):
    """eos_rate None: EOS banned (fixed lengths); else EOS biased to about that probability per token."""
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
               tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(cfg, seed=0)
    banned = set(tok.all_special_ids) | set(tok.added_tokens_decoder)  # EOS, pad, chat marks, tags
    eos_bias = 0.0
    if eos_rate is not None:
        banned.discard(tok.eos_token_id)
        allowed = len(tok) - len(banned) - 1  # random-init logits are near zero: a near-uniform choice
        eos_bias = math.log(eos_rate * allowed / (1 - eos_rate))
    model.lm_head = BannedHead(model.lm_head, sorted(banned), None if eos_rate is None else tok.eos_token_id, eos_bias)
    return model


def make_prompts(tok, P: int):
    """P prompts of 4..8 word tokens (ids and text) and each one's answer word."""
    words = "hello world solve the problem how many apples".split()
    texts = [" ".join(words[: 3 + i % 5]) + f" {i % 10}" for i in range(P)]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    return texts, ids, [ANSWERS[i % len(ANSWERS)] for i in range(P)]


class PadCount:
    """Tokens in the forwards that build a graph (the update's; sampling and scoring run without one) and how many
    of them are padding: pad_share = padding / all. Padding is the tokenizer's pad id, which the head bans from
    sampling, so it never is a real token; both trainers pad with it."""

    def __init__(self, model, pad_id: int):
        self.pad_id, self.tokens, self.padding = pad_id, 0, 0
        model.model.embed_tokens.register_forward_pre_hook(self.count)

    def count(self, module, args):
        if torch.is_grad_enabled():
            self.tokens += args[0].numel()
            self.padding += int((args[0] == self.pad_id).sum())

    @property
    def share(self) -> float:
        return round(self.padding / max(self.tokens, 1), 4)


class Ours:
    """grpo.trainer.grpo_step as train_grpo calls it, with the reward scored in this process."""

    def __init__(self, model, tok, tags, prompt_ids, answers, a):
        self.cfg = build_config({
            "seed": 0,
            "rollout": {"group_size": a.G, "max_new_tokens": a.max_new, "temperature": 1.0},
            "grpo": {"steps": a.warmup + a.steps, "prompts_per_step": a.P, "mini_batch_prompts": a.P,
                     "ppo_epochs": 1, "kl_coef": 0.0, "micro_batch_tokens": a.micro_batch_tokens,
                     "pack": not a.no_pack},
            "optim": {"lr": a.lr, "weight_decay": 0.0, "grad_clip": 1.0, "schedule": "constant"},
            "reward": {"workers": 0},
        })
        c = self.cfg
        self.model, self.tok, self.d, self.state = model, tok, Dist(), TrainState()
        self.opt, self.sched = build_optimizer(model, c.optim.lr, c.optim.weight_decay, c.optim.betas,
                                               c.optim.warmup_steps, c.grpo.steps, c.optim.schedule)
        self.sampler = Sampler(model, tags=tags, pad_id=tok.pad_token_id, newline_id=newline_id(tok),
                               prefill_rows=c.rollout.prefill_rows)
        self.pool = RewardPool(workers=0)
        self.items = [SimpleNamespace(prompt_ids=p, answer=g) for p, g in zip(prompt_ids, answers)]
        self.steps = []  # (total seconds, metrics)

    def step(self, i: int) -> None:
        t0 = time.perf_counter()
        m = grpo_step(i, self.items, self.model, None, self.sampler, self.pool, RewardSet(contains_answer),
                      self.opt, self.sched, self.tok, self.cfg, self.d, self.state)
        self.steps.append((time.perf_counter() - t0, m))

    def phases(self, warmup: int) -> list[dict]:
        return [{"total": t, "sample": m["time/sample"], "score": m["time/reward"],
                 "update": t - m["time/sample"] - m["time/reward"], "mean_length": m["completions/mean_length"]}
                for t, m in self.steps[warmup:]]


def build_trl(model, tok, prompt_texts, answers, a, on_step, out_dir: str):
    """GRPOTrainer doing the same work per optimizer step; `on_step(i)` runs after TRL's step i is timed."""
    try:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"benchmarks/grpo_step.py needs TRL ({e}): pip install -e '.[bench]'")
    if Version(trl.__version__) < Version(MIN_TRL):  # older GRPOConfigs lack loss_type="dapo", scale_rewards="group"
        raise SystemExit(f"benchmarks/grpo_step.py needs trl>={MIN_TRL}, found {trl.__version__}: "
                         "pip install -e '.[bench]'")
    from transformers import PrinterCallback, TrainerCallback

    args = GRPOConfig(
        output_dir=out_dir, seed=0, use_cpu=True, bf16=False, fp16=False,
        # one optimizer step = one generation batch of P prompts x G completions, one backward over all of it
        per_device_train_batch_size=a.P * a.G, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=1, num_generations=a.G, max_completion_length=a.max_new, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2,  # = our token-mean, clip 0.2
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=False, use_vllm=False, max_steps=a.warmup + a.steps,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    data = Dataset.from_dict({"prompt": prompt_texts, "answer": answers})
    times = {"total": [], "gen_and_score": [], "score": [], "mean_length": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times["total"].append(time.perf_counter() - self.t0)
            on_step(state.global_step - 1)

    trainer = GRPOTrainer(model=model, reward_funcs=trl_contains_answer, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # it would print the end-of-training metrics

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times[key].append(time.perf_counter() - t0)
            return out
        return wrapper

    gen_and_score = trainer._generate_and_score_completions

    def gen_and_score_with_length(*args, **kwargs):
        out = gen_and_score(*args, **kwargs)
        times["mean_length"].append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    trainer._generate_and_score_completions = timed(gen_and_score_with_length, "gen_and_score")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "score")
    return trainer, times


def trl_phases(times: dict, warmup: int) -> list[dict]:
    rows = zip(times["total"], times["gen_and_score"], times["score"], times["mean_length"])
    return [{"total": t, "sample": g - s, "score": s, "update": t - g, "mean_length": n}
            for t, g, s, n in list(rows)[warmup:]]


def median_split(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per side (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--lengths", choices=["eos", "fixed"], default="eos", help="see the module docstring")
    ap.add_argument("--eos-rate", type=float, default=1 / 32, help="--lengths eos: P(EOS) per token")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096, help="our trainer's micro-batch token budget")
    ap.add_argument("--no-pack", action="store_true", help="our update padded (grpo.pack false), as before packing")
    a = ap.parse_args()
    a.P, a.G, a.max_new, hidden, layers, steps = (4, 8, 64, 128, 2, 5) if a.quick else (8, 8, 128, 256, 4, 7)
    if a.lengths == "eos":
        a.max_new *= 2  # room for the tail: lengths vary from a few tokens to the cap
    a.steps, a.lr = a.steps or steps, 1e-6
    if a.steps < 1 or a.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {a.steps} and {a.warmup}")
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing renames
    tok = build_word_tokenizer()
    tags = add_tag_tokens(tok)
    if not 0 < a.eos_rate < 1:
        ap.error(f"--eos-rate must be in (0, 1), got {a.eos_rate}")
    model = tiny_model(tok, hidden, layers, a.eos_rate if a.lengths == "eos" else None)
    texts, prompt_ids, answers = make_prompts(tok, a.P)
    assert [tok(t)["input_ids"] for t in texts] == prompt_ids, "TRL would tokenize the prompts differently"

    ours = Ours(copy.deepcopy(model), tok, tags, prompt_ids, answers, a)
    ours_pad = PadCount(ours.model, tok.pad_token_id)
    with tempfile.TemporaryDirectory(prefix="grpo_step_bench_") as out_dir:  # TRL wants one; it saves nothing
        trainer, times = build_trl(copy.deepcopy(model), tok, texts, answers, a, ours.step, out_dir)
        trl_pad = PadCount(trainer.model, tok.pad_token_id)
        # TRL leaves use_cache unset, so generate takes the model's generation_config (build_model's
        # use_cache=False is on model.config and only concerns our training forwards)
        assert trainer.model.generation_config.use_cache, "TRL would generate without a KV cache"
        trainer.train()  # TRL step i, then (in its step-end callback, outside its timing) our step i
    for side in (ours.model, trainer.model):  # both really trained
        assert not torch.equal(side.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)

    ours_rows, trl_rows = ours.phases(a.warmup), trl_phases(times, a.warmup)
    o, t = median_split(ours_rows), median_split(trl_rows)
    for name, m in (("ours", o), ("trl", t)):
        print(f"{name}: step {m['total']:.3f}s (sample {m['sample']:.3f}, score {m['score']:.3f}, "
              f"update {m['update']:.3f}), mean completion length {m['mean_length']:.1f}")
    print(json.dumps({
        "ratio": round(o["total"] / t["total"], 3), "ours_step_s": o["total"], "trl_step_s": t["total"],
        "ours_phases_s": {k: o[k] for k in ("sample", "score", "update")},
        "trl_phases_s": {k: t[k] for k in ("sample", "score", "update")},
        "sample_ratio": round(o["sample"] / t["sample"], 3), "update_ratio": round(o["update"] / t["update"], 3),
        "ours_mean_length": o["mean_length"], "trl_mean_length": t["mean_length"],
        "ours_tokens_per_s": round(a.P * a.G * o["mean_length"] / o["total"], 1),
        "trl_tokens_per_s": round(a.P * a.G * t["mean_length"] / t["total"], 1),
        "ours_steps_s": [round(r["total"], 4) for r in ours_rows],
        "trl_steps_s": [round(r["total"], 4) for r in trl_rows],
        "pad_share": ours_pad.share, "trl_pad_share": trl_pad.share, "pack": not a.no_pack,
        "lengths": a.lengths, "eos_rate": a.eos_rate if a.lengths == "eos" else None,
        "micro_batch_tokens": a.micro_batch_tokens, "prompts": a.P, "group_size": a.G, "max_new_tokens": a.max_new,
        "hidden": hidden, "layers": layers,
        "vocab": len(tok), "warmup": a.warmup, "steps": a.steps, "threads": torch.get_num_threads(),
        "trl_version": __import__("trl").__version__,
    }))


if __name__ == "__main__":
    main()
