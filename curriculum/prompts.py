"""Prompt templates (every instruction the project sends to a model lives in this file) and the
encoders that turn a prompt, and an SFT target, into token ids with left truncation."""
from __future__ import annotations

# The instructions name the tags in words, never as "<Parallel>" etc.: a tag written in the prompt
# would be tokenized as the tag token and the structured variant would then read the prompt
# as a (malformed) block, silently turning the whole sequence causal. The format itself is taught by
# the cold-start SFT stage.
PARALLEL_INSTRUCTION = """Solve the problem below step by step.
At any step where separate, independent lines of reasoning could help (two different methods, or a \
computation and a check), reason in parallel: open a Parallel block, write two or more Path sections \
inside it, each complete on its own and never referring to another path, then close the Parallel block. \
Directly after the block, write a Summary section stating what the paths found and which result holds. \
Mark each part with its tag name in angle brackets (Parallel, Path, Summary), and close it with the same \
tag preceded by a slash. Do this wherever it helps, as often as needed.
End with a line of the form "Final Answer: <answer>".

Problem: {question}"""

PLAIN_INSTRUCTION = """Solve the problem below step by step.
End with a line of the form "Final Answer: <answer>".

Problem: {question}"""

# The CPU demo (curriculum/synthetic.py): every word is in synthetic.DEMO_WORDS, and short on purpose.
DEMO_INSTRUCTION = "{question}\nuse paths."
DEMO_PLAIN_INSTRUCTION = "{question}\nstep by step."

STYLES = {"parallel": PARALLEL_INSTRUCTION, "plain": PLAIN_INSTRUCTION, "none": "{question}",
          "demo": DEMO_INSTRUCTION, "demo_plain": DEMO_PLAIN_INSTRUCTION}
TEMPLATES = ("chat", "raw")


def format_prompt(question: str, style: str = "parallel", instruction: str | None = None) -> str:
    """The prompt text for `question`: the style's template ("parallel" | "plain" | "none" = the bare
    question), or `instruction` when given (a template holding "{question}" once)."""
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; valid styles: {sorted(STYLES)}")
    template = STYLES[style] if instruction is None else instruction
    if template.count("{question}") != 1:
        raise ValueError(f"prompt instruction must hold '{{question}}' exactly once: {template[:80]!r}")
    # replace, not str.format: instructions may contain other braces (LaTeX such as \boxed{})
    return template.replace("{question}", question)


def example_prompt(example, style: str = "parallel", instruction: str | None = None) -> str | list:
    """The prompt of a data example (curriculum.data.Example): the messages of a conversational row as written
    (TRL's form; style and instruction do not apply), else its question in the style's or `instruction`'s text."""
    if isinstance(example.prompt, list):
        return example.prompt
    return format_prompt(example.question, style, instruction)


def _prompt_ids(tokenizer, text: str | list, template: str) -> list[int]:
    """`text` (or a list of {role, content} messages, which needs the chat template) as token ids."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' but the tokenizer has no chat template; use template='raw' "
                             "for base models without one")
        messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)
    if isinstance(text, list):
        raise ValueError("a conversational prompt (a list of messages) needs template='chat'")
    if template == "raw":
        return tokenizer.encode(text + "\n", add_special_tokens=False)
    raise ValueError(f"unknown prompt template {template!r}; valid templates: {list(TEMPLATES)}")


def encode_prompt(tokenizer, text: str | list, template: str = "chat",
                  max_tokens: int | None = None) -> tuple[list[int], bool]:
    """Token ids of one prompt and whether it was truncated.

    template: "chat" renders one user message (or `text`'s messages, when it is a list) with the generation
        prompt (the assistant turn is opened); "raw" encodes the text plus a newline, for base models. No
        BOS/EOS is added.
    max_tokens: an over-long prompt is cut FROM THE LEFT, keeping its end (the question and the
        generation prompt); the second return value is then True.
    """
    ids = _prompt_ids(tokenizer, text, template)
    if max_tokens is not None and len(ids) > max_tokens:
        return ids[len(ids) - max_tokens:], True
    return ids, False


def encode_prompts(tokenizer, texts: list, template: str = "chat",
                   max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """`encode_prompt` over a list: (ids per prompt, number of prompts that were truncated)."""
    pairs = [encode_prompt(tokenizer, t, template, max_tokens) for t in texts]
    return [ids for ids, _ in pairs], sum(cut for _, cut in pairs)


def encode_sft_example(tokenizer, prompt_text: str | list, solution: str, template: str = "chat",
                       max_prompt_tokens: int | None = None,
                       max_total_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of prompt + solution + EOS, loss_mask 1 exactly on the solution and EOS.

    The prompt is encoded as `encode_prompt` does (so SFT sees what sampling sees) and cut from the
    left to `max_prompt_tokens`; a sequence over `max_total_tokens` loses the end of its solution
    (and then its EOS, since the answer did not end there).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one so SFT can teach the model to stop")
    prompt_ids, _ = encode_prompt(tokenizer, prompt_text, template, max_prompt_tokens)
    target = tokenizer.encode(solution, add_special_tokens=False) + [tokenizer.eos_token_id]
    if max_total_tokens is not None:
        room = max_total_tokens - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"max_total_tokens={max_total_tokens} leaves no room for the solution after a "
                             f"{len(prompt_ids)}-token prompt; raise it or lower max_prompt_tokens")
        target = target[:room]
    return prompt_ids + target, [0] * len(prompt_ids) + [1] * len(target)
