"""The loss without [B, T, V] logits: the fused head + cross-entropy against the plain full-logits loss and the
checkpointed chunks, gradients included (hidden states and a trainable head), with ignored targets and chunks
that hold none."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.models.loss import (IGNORE, checkpointed_cross_entropy, chunk_rows, chunked_causal_lm_loss,
                                   fused_head, fused_linear_cross_entropy, shift_targets)


def _case(n=37, c=12, v=50, dtype=torch.float64, seed=0, ignore_first=9):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, c, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    y[:ignore_first] = IGNORE          # the first chunk(s) carry no target: skipped, their gradient is zero
    y[20] = IGNORE
    return h, w, y


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("rows", [1, 8, 10, 37, 100])
def test_fused_equals_full_logits(rows):
    h, w, y = _case()
    want = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE, reduction="sum")
    got = fused_linear_cross_entropy(h, w, y, rows)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    scale = torch.tensor(0.37, dtype=torch.float64)  # the backward scales by the incoming gradient
    for a, b in zip(_grads(got * scale, h, w), _grads(want * scale, h, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_equals_checkpointed_in_fp32():
    h, w, y = _case(dtype=torch.float32)
    head = nn.Linear(12, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    ref = checkpointed_cross_entropy(h, head, y, 8)
    ref_grads = _grads(ref, h, head.weight)
    got = fused_linear_cross_entropy(h, head.weight, y, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(got, h, head.weight), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_head_and_no_target_still_reach_the_inputs():
    """A frozen head gets no gradient buffer; a batch without targets gives a zero that still reaches h (a DDP
    backward expects every trained parameter to take part)."""
    h, w, y = _case(dtype=torch.float32)
    w = w.detach()
    loss = fused_linear_cross_entropy(h, w, torch.full_like(y, IGNORE), 8)
    assert loss.item() == 0 and loss.requires_grad
    (gh,) = _grads(loss, h)
    assert torch.count_nonzero(gh) == 0
    loss = fused_linear_cross_entropy(h, w, y, 8)
    (gh,) = _grads(loss, h)
    assert torch.count_nonzero(gh[:9]) == 0 and torch.count_nonzero(gh[9:20]) > 0


def test_no_grad_evaluation_matches():
    h, w, y = _case(dtype=torch.float32)
    with torch.no_grad():
        got = fused_linear_cross_entropy(h, w, y, 8)
    want = F.cross_entropy((h @ w.t()).detach(), y, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    h, w, y = _case(n=64, c=32, v=300, dtype=torch.float32)
    want = fused_linear_cross_entropy(h, w, y, 16)
    want_grads = _grads(want, h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(h, w, y, 16)
    grads = _grads(got, h, w)
    assert got.dtype == torch.float32 and grads[0].dtype == h.dtype and grads[1].dtype == w.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.0)
    for a, b in zip(grads, want_grads):
        assert (a - b).norm() / b.norm() < 3e-2


def test_which_heads_fuse_and_the_fallback_agrees():
    """A LoRA head (or any module that is not a plain bias-free Linear) takes the checkpointed path; both give
    the same mean loss through chunked_causal_lm_loss."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 50, bias=False))
    assert fused_head(plain[0]) and not fused_head(nn.Linear(12, 50)) and not fused_head(nn.Embedding(3, 3))
    lora = get_peft_model(nn.Sequential(nn.Linear(12, 50, bias=False)), LoraConfig(r=2, target_modules=["0"]))
    head = lora.base_model.model[0]
    assert not fused_head(head)
    with torch.no_grad():
        head.base_layer.weight.copy_(plain[0].weight)
    hidden = torch.randn(2, 19, 12)
    labels = torch.randint(0, 50, (2, 19))
    labels[0, :4] = IGNORE
    a = chunked_causal_lm_loss(hidden, plain[0], labels, chunk_size=8)
    b = chunked_causal_lm_loss(hidden, head, labels, chunk_size=8)
    want = F.cross_entropy((hidden @ plain[0].weight.t()).reshape(-1, 50), shift_targets(labels).reshape(-1),
                           ignore_index=IGNORE)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-6)


def test_default_chunk_keeps_logits_within_the_budget():
    assert chunk_rows(65536) == 256 and chunk_rows(257) > 10_000 and chunk_rows(65536, 100) == 100
    assert chunk_rows(10 ** 9) == 16
