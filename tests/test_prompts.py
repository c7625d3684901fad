"""curriculum/prompts.py: prompt styles, chat/raw encoding, left truncation, SFT loss masks."""
import pytest

from curriculum.prompts import (PARALLEL_INSTRUCTION, PLAIN_INSTRUCTION, encode_prompt, encode_prompts,
                                encode_sft_example, format_prompt)
from model.tags import TAG_TEXTS
from model.tokenizer import build_word_tokenizer

Q = "how many are left after he has 3 and she has 4 ?"  # BASIC_WORDS only: decodes exactly


@pytest.fixture(scope="module")
def wtok():
    return build_word_tokenizer()


def test_styles():
    assert format_prompt(Q, "none") == Q
    parallel, plain = format_prompt(Q), format_prompt(Q, "plain")
    for text in (parallel, plain):
        assert text.endswith(Q) and "Final Answer:" in text and "{question}" not in text
    assert "Parallel" in parallel and "Summary" in parallel and "Parallel" not in plain
    assert format_prompt(Q, instruction="{question} \\boxed{}") == Q + " \\boxed{}"  # other braces survive
    assert format_prompt("x^{2}", "plain").endswith("x^{2}")
    with pytest.raises(ValueError, match="none.*parallel.*plain"):
        format_prompt(Q, "fancy")
    with pytest.raises(ValueError, match="exactly once"):
        format_prompt(Q, instruction="no placeholder")


def test_instructions_hold_no_tag_tokens(wtok):
    # a tag in the prompt would be read as structure by the structured variant
    tag_ids = {wtok.convert_tokens_to_ids(t) for t in TAG_TEXTS}
    for instruction in (PARALLEL_INSTRUCTION, PLAIN_INSTRUCTION):
        ids, _ = encode_prompt(wtok, format_prompt(Q, instruction=instruction))
        assert not tag_ids & set(ids)


def test_chat_template_applied(wtok):
    ids, truncated = encode_prompt(wtok, Q, "chat")
    expected = wtok.encode(f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert ids == expected and not truncated
    assert ids[0] == wtok.convert_tokens_to_ids("<|im_start|>")
    assert wtok.decode(ids) == f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"


def test_raw_template(wtok):
    ids, truncated = encode_prompt(wtok, Q, "raw")
    assert wtok.decode(ids) == Q + "\n" and not truncated
    assert wtok.eos_token_id not in ids
    with pytest.raises(ValueError, match="chat.*raw"):
        encode_prompt(wtok, Q, "jinja")


def test_left_truncation_keeps_the_end(wtok):
    full, _ = encode_prompt(wtok, Q, "chat")
    ids, truncated = encode_prompt(wtok, Q, "chat", max_tokens=6)
    assert truncated and ids == full[-6:]
    assert wtok.decode(ids).endswith("<|im_start|>assistant\n")  # the generation prompt survives
    assert encode_prompt(wtok, Q, "chat", max_tokens=len(full)) == (full, False)
    short, _ = encode_prompt(wtok, "hi", "chat")
    batch, n_truncated = encode_prompts(wtok, [Q, "hi", Q], "chat", max_tokens=len(full) - 1)
    assert n_truncated == 2 and batch == [full[1:], short, full[1:]]


def test_sft_mask_covers_solution_and_eos(wtok):
    solution = "3 + 4 = 7 .\nFinal answer : 7"
    prompt_ids, _ = encode_prompt(wtok, Q, "chat")
    sol_ids = wtok.encode(solution, add_special_tokens=False)
    ids, mask = encode_sft_example(wtok, Q, solution, "chat")
    assert ids == prompt_ids + sol_ids + [wtok.eos_token_id]
    assert mask == [0] * len(prompt_ids) + [1] * (len(sol_ids) + 1)
    assert [i for i, m in zip(ids, mask) if m] == sol_ids + [wtok.eos_token_id]


def test_sft_truncation(wtok):
    solution = "3 + 4 = 7 .\nFinal answer : 7"
    prompt_ids, _ = encode_prompt(wtok, Q, "raw")
    sol_ids = wtok.encode(solution, add_special_tokens=False)
    ids, mask = encode_sft_example(wtok, Q, solution, "raw", max_prompt_tokens=4)
    assert ids[:4] == prompt_ids[-4:] and mask[:4] == [0] * 4 and ids[-1] == wtok.eos_token_id
    ids, mask = encode_sft_example(wtok, Q, solution, "raw", max_total_tokens=len(prompt_ids) + 5)
    assert ids == prompt_ids + sol_ids[:5] and mask == [0] * len(prompt_ids) + [1] * 5  # EOS dropped
    ids, _ = encode_sft_example(wtok, Q, solution, "raw", max_total_tokens=len(prompt_ids) + len(sol_ids) + 1)
    assert ids[-1] == wtok.eos_token_id  # exactly fits: nothing cut
    with pytest.raises(ValueError, match="no room"):
        encode_sft_example(wtok, Q, solution, "raw", max_total_tokens=len(prompt_ids))
