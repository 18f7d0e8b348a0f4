"""Greedy continuation of a prompt with the RWKV state (used for sample outputs during evaluation)."""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 48, stop: str = "\n\n", agree=None) -> str:
    """The greedy continuation of ``prompt`` until end-of-text, ``stop`` or ``max_new_tokens``.

    ``agree(token) -> token``: several processes generating together (FSDP2, DeepSpeed: every forward is a
    collective) take the main process's token, so they all stop at the same step."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    out = model(input_ids=ids, use_cache=True)
    state, new = out.state, []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].float().argmax())
        if agree is not None:
            nxt = agree(nxt)
        if nxt == 0:
            break
        new.append(nxt)
        text = tokenizer.decode(new)
        if stop and stop in text:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), state=state, use_cache=True)
        state = out.state
    model.train(was_training)
    text = tokenizer.decode(new)
    return text.split(stop)[0] if stop else text
