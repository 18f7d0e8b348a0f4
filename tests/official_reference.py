"""Runs the official ``rwkv`` package on a checkpoint; started by tests.factories.official_reference.

Request JSON: model (.pth path), out (.pt path), and any of
  full: list of token lists     -> every position's logits of one pass from a zero state, and the final state
  steps: list of token lists    -> logits token by token
  greedy: [[prompt, n]]         -> n greedy tokens continued from the prompt
  state_init: bool              -> start from the checkpoint's time_state (merged state) instead of zeros
  state_file: path              -> start from a runtime state file (blocks.N.att.time_state, [h, value, key]),
                                   put into the state list as it is, as RWKV-7 runtimes (RWKV-Runner) do
"""
import json
import sys

import torch

req = json.load(open(sys.argv[1]))
from rwkv.model import RWKV  # noqa: E402  (the environment chooses v7 before this import)

model = RWKV(model=req["model"][:-4], strategy="cpu fp32")
raw = torch.load(req["model"], map_location="cpu", weights_only=True)


start = (torch.load(req["state_file"], map_location="cpu", weights_only=True) if req.get("state_file")
         else raw if req.get("state_init") else None)


def zero_state():
    state = model.generate_zero_state()
    if start is not None:
        for i in range(model.n_layer):
            state[i * 3 + 1] = start[f"blocks.{i}.att.time_state"].float().clone()
    return state


res = {"full": [], "full_state": [], "steps": [], "greedy": []}
with torch.no_grad():
    for toks in req.get("full", []):
        logits, state = model.forward(toks, zero_state(), full_output=True)
        res["full"].append(logits.clone())
        res["full_state"].append([s.clone() for s in state])
    for toks in req.get("steps", []):
        state, outs = zero_state(), []
        for t in toks:
            logits, state = model.forward([t], state)
            outs.append(logits.clone())
        res["steps"].append(torch.stack(outs))
    for prompt, n in req.get("greedy", []):
        logits, state = model.forward(prompt, zero_state())
        gen = []
        for _ in range(n):
            t = int(torch.argmax(logits))
            gen.append(t)
            logits, state = model.forward([t], state)
        res["greedy"].append(gen)
torch.save(res, req["out"])
