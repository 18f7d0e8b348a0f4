"""The step on its own (one process): chunk mode with a trained initial state."""
import contextlib
from types import SimpleNamespace

import torch

import rwkv_peft.methods as methods
from rwkv_peft.data.packing import IGNORE
from rwkv_peft.training.step import micro_batch_loss
from rwkv_peft.tuners.state_tuning import apply_state_tuning, trained_initial_states

ACC = SimpleNamespace(device=torch.device("cpu"), distributed_type="NO", backward=lambda loss: loss.backward(), scaler=None,
                      no_sync=lambda model: contextlib.nullcontext())


def _state_tuned(tiny_model):
    model = methods.load_base_model(str(tiny_model), dtype="float32")
    return apply_state_tuning(model, init="zeros")


def test_state_learns_from_a_rows_first_window_only(tiny_model):
    """Chunk mode, grad_chunks 1, a 40-token row in 8-token chunks: the state's gradient is that of the first
    chunk's loss (later windows start from a detached state), and the later windows' backward do not fail
    although nothing they compute reaches a trained weight."""
    model = _state_tuned(tiny_model)
    torch.manual_seed(0)
    ids = torch.randint(1, 257, (2, 40))
    labels = ids.clone()
    labels[1, :5] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    lc = SimpleNamespace(chunk_len=8, grad_chunks=1)
    total = micro_batch_loss(ACC, model, batch, denom=10.0, lc=lc, chunked=True, sync=True)
    grads = [p.grad.clone() for p in trained_initial_states(model)]
    assert total.requires_grad is False and torch.isfinite(total)
    assert all(g.abs().sum() > 0 for g in grads)

    model.zero_grad()
    first = {k: v[:, :9] for k, v in batch.items()}  # the first chunk and the target of its last position
    micro_batch_loss(ACC, model, first, denom=10.0, lc=SimpleNamespace(chunk_len=8, grad_chunks=1), chunked=True,
                     sync=True)
    for g, want in zip(grads, [p.grad for p in trained_initial_states(model)]):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def test_recompute_carries_the_gradient_through_the_whole_row(tiny_model):
    """long_context.recompute: 8-token chunks of a 37-token row give the loss and the gradients (LoRA, learned
    state) of one pass over the row, though each backward holds one chunk's graph."""
    torch.manual_seed(0)
    model = methods.apply_lora(_state_tuned(tiny_model), r=4, alpha=8, targets="all")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # LoRA B starts at zero: give it values so every gradient shows
    ids = torch.randint(1, 257, (2, 37))
    labels = ids.clone()
    labels[0, :6] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    trained = [p for p in model.parameters() if p.requires_grad]

    def grads_of(lc, chunked):
        model.zero_grad()
        loss = micro_batch_loss(ACC, model, batch, denom=50.0, lc=lc, chunked=chunked, sync=True)
        return loss, [p.grad.clone() for p in trained]

    one_loss, one = grads_of(SimpleNamespace(chunk_len=8, grad_chunks=1, recompute=False), chunked=False)
    loss, got = grads_of(SimpleNamespace(chunk_len=8, grad_chunks=1, recompute=True), chunked=True)
    torch.testing.assert_close(loss, one_loss, rtol=1e-5, atol=1e-5)
    assert len(got) > 10 and all(g.abs().sum() > 0 for g in one)
    for g, want in zip(got, one):
        torch.testing.assert_close(g, want, rtol=2e-4, atol=1e-7)
    _, truncated = grads_of(SimpleNamespace(chunk_len=8, grad_chunks=1, recompute=False), chunked=True)
    assert any((t - w).abs().max() > 1e-3 * w.abs().max() for t, w in zip(truncated, one))  # the test can tell


def test_freed_cpu_memory_goes_back_between_chunks():
    """release_freed_memory trims the C library's heap on the CPU (glibc here) and leaves GPUs alone."""
    from rwkv_peft.training.memory import release_freed_memory
    assert release_freed_memory(torch.device("cpu")) is True
    assert release_freed_memory(torch.device("cuda")) is False
    assert release_freed_memory("meta") is False
