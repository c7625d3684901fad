"""grpo/logprobs.py: the chunked head equals the naive full-logits path in value and gradient, keeps the
model's lm_head intact, works under the structured patch, and never builds (B, T, V) logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from grpo.logprobs import token_logprobs
from model import apply_structured_attention


def naive_logprobs(model, input_ids, attention_mask=None, temperature=1.0, **kwargs):
    """Reference: full (B, T, V) logits -> log_softmax -> gather; logp and entropy (B, T), column 0 = 0."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float() / temperature
    logq = F.log_softmax(logits, dim=-1)  # (B, T, V)
    logp = logq[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    entropy = -(logq.exp() * logq).sum(-1)[:, :-1]  # (B, T-1)
    return F.pad(logp, (1, 0)), F.pad(entropy, (1, 0))


def batch(vocab, padding, B=3, T=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[0, :4], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[0, -4:], mask[1, -2:] = 0, 0
    return input_ids.masked_fill(mask == 0, 1), mask  # pad id 1


def value_and_grads(fn, model, input_ids, mask):
    """Run fn -> (logp, entropy), backprop a weighted sum over real tokens, return values and param grads."""
    model.zero_grad(set_to_none=True)
    logp, entropy = fn()
    gen = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(logp.shape, generator=gen), torch.randn(logp.shape, generator=gen)
    valid = mask.bool() & mask.roll(1, 1).bool()  # token and its predecessor are real
    valid[:, 0] = False
    loss = torch.where(valid, w1 * logp + w2 * entropy, torch.zeros(())).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), valid, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(model, input_ids, mask, temperature, chunk_size, **kwargs):
    ours = value_and_grads(lambda: token_logprobs(model, input_ids, mask, temperature=temperature,
                                                  chunk_size=chunk_size, with_entropy=True, **kwargs),
                           model, input_ids, mask)
    naive = value_and_grads(lambda: naive_logprobs(model, input_ids, mask, temperature, **kwargs),
                            model, input_ids, mask)
    valid = ours[2]
    torch.testing.assert_close(ours[0][valid], naive[0][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1][valid], naive[1][valid], atol=1e-5, rtol=1e-5)
    assert (ours[0][:, 0] == 0).all() and (ours[1][:, 0] == 0).all()
    for name, grad in ours[3].items():
        torch.testing.assert_close(grad, naive[3][name], atol=1e-5, rtol=1e-5, msg=name)
    return ours[0]


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("chunk_size,temperature", [(5, 0.7), (7, 1.0), (1024, 1.3)])
def test_matches_naive_values_and_gradients(tiny_model, tiny_config, padding, chunk_size, temperature):
    # B * (T-1) = 36 scored tokens: chunks of 5 and 7 leave a ragged last chunk, 1024 is one chunk
    input_ids, mask = batch(tiny_config["vocab_size"], padding)
    assert_same(tiny_model, input_ids, mask, temperature, chunk_size)


def test_without_entropy_and_without_mask(tiny_model, tiny_config):
    input_ids, _ = batch(tiny_config["vocab_size"], None)
    logp = token_logprobs(tiny_model, input_ids, chunk_size=4)
    assert isinstance(logp, torch.Tensor) and logp.shape == input_ids.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, naive_logprobs(tiny_model, input_ids)[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # scoring old / reference log-probs
        torch.testing.assert_close(token_logprobs(tiny_model, input_ids, chunk_size=4), logp.detach())
    one = token_logprobs(tiny_model, input_ids[:, :1])
    assert one.shape == (3, 1) and (one == 0).all()


def test_scored_tokens_only(tiny_model, tiny_config):
    """`scored`: the head runs on the asked tokens alone (flat indices into (B, T)), with the values and the
    gradients of the full path at those tokens."""
    input_ids, mask = batch(tiny_config["vocab_size"], "right")
    scored = torch.tensor([1, 2, 5, 14, 20, 27, 38])  # (M,) none in column 0 of its row (T = 13)
    gen = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
    grads = []
    for run in ("scored", "full"):
        tiny_model.zero_grad(set_to_none=True)
        if run == "scored":
            logp, entropy = token_logprobs(tiny_model, input_ids, mask, chunk_size=3, with_entropy=True, scored=scored)
        else:
            logp, entropy = (t.reshape(-1)[scored] for t in token_logprobs(tiny_model, input_ids, mask,
                                                                          chunk_size=3, with_entropy=True))
        (w1 * logp + w2 * entropy).sum().backward()
        grads.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in tiny_model.parameters()]))
    (a, b, ga), (c, d, gc) = grads
    assert a.shape == (7,) and b.shape == (7,)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    torch.testing.assert_close(b, d, atol=1e-6, rtol=0)
    for x, y in zip(ga, gc):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_structured_patch(tiny_model, tok, tags):
    text = ("q : add 2 and 3 <Parallel> <Path> 2 plus 3 is 5 </Path> <Path> 3 plus 2 is 5 </Path> "
            "</Parallel> <Summary> 5 </Summary> Final Answer: 5")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tags.parallel_open in ids and tags.path_open in ids
    input_ids = torch.tensor([ids, ids])
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding in the second row
    causal = token_logprobs(tiny_model, input_ids[:1], chunk_size=6).detach()
    apply_structured_attention(tiny_model, tags)
    structured = assert_same(tiny_model, input_ids, mask, 1.0, 6, response_start=0)
    # the patch really acted: the second path cannot see the first, so its log-probs change
    second_path = ids.index(tags.path_open, ids.index(tags.path_close))
    assert not torch.allclose(structured[0, second_path + 1:], causal[0, second_path + 1:])


def test_lm_head_restored(tiny_model, tiny_config):
    head = tiny_model.lm_head
    input_ids, mask = batch(tiny_config["vocab_size"], None)
    token_logprobs(tiny_model, input_ids, mask)
    assert tiny_model.lm_head is head
    bad = input_ids.clone()
    bad[0, 0] = tiny_config["vocab_size"] + 5  # out of the embedding's range: the forward raises
    with pytest.raises(IndexError):
        token_logprobs(tiny_model, bad, mask)
    assert tiny_model.lm_head is head
    assert isinstance(tiny_model(input_ids=input_ids).logits, torch.Tensor)  # the stock forward still works


def test_bad_arguments(tiny_model, tiny_config):
    input_ids, _ = batch(tiny_config["vocab_size"], None)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(tiny_model, input_ids, temperature=-0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(tiny_model, input_ids, chunk_size=0)


class VocabRows(TorchDispatchMode):
    """Records, for every tensor an op produces with the vocabulary as its last dim, how many token rows
    it spans (numel / V); the head weight's own (H, V) transpose is not a logits tensor and is skipped."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab):
                self.rows.append(t.numel() // self.vocab)
        return out


def test_logits_are_never_materialised_whole(tiny_model, tiny_config):
    B, T, chunk = 4, 40, 8
    input_ids, mask = batch(tiny_config["vocab_size"], "right", B=B, T=T)
    recorder = VocabRows(tiny_config["vocab_size"], tiny_config["hidden_size"])
    with recorder:
        logp, entropy = token_logprobs(tiny_model, input_ids, mask, chunk_size=chunk, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    assert recorder.rows and max(recorder.rows) <= chunk, max(recorder.rows)
    # the recorder does see full logits when they exist: the naive path fails the same check
    naive = VocabRows(tiny_config["vocab_size"], tiny_config["hidden_size"])
    with naive:
        naive_logprobs(tiny_model, input_ids, mask)[0].sum().backward()
    assert max(naive.rows) >= B * (T - 1)


def test_bfloat16_model(tiny_config):
    from model import build_model

    model = build_model(tiny_config, seed=0, dtype="bfloat16")
    input_ids, mask = batch(tiny_config["vocab_size"], "left")
    logp = token_logprobs(model, input_ids, mask, chunk_size=5)
    assert logp.dtype == torch.float32
    ref = naive_logprobs(model, input_ids, mask)[0]
    torch.testing.assert_close(logp[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
    logp.sum().backward()
    ours = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16
    for name, p in model.named_parameters():  # ours sums the head's chunks in float32: close, not equal
        assert (ours[name] - p.grad.float()).norm() <= 1e-2 * p.grad.float().norm(), name
