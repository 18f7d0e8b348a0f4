"""The step on its own (one process): chunk mode with a trained initial state."""
import contextlib
from types import SimpleNamespace

import torch

import rwkv_peft.methods as methods
from rwkv_peft.data.packing import IGNORE
from rwkv_peft.training.step import micro_batch_loss
from rwkv_peft.tuners.state_tuning import apply_state_tuning, trained_initial_states

ACC = SimpleNamespace(device=torch.device("cpu"), distributed_type="NO", backward=lambda loss: loss.backward(),
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
