"""Runs the official ``rwkv`` package (RWKV-5.2, cpu fp32) on a checkpoint; started by
tests.factories_v5.official_reference_v5 in its own process with ``RWKV_V7_ON=0``.

Request JSON: model (.pth path), out (.pt path), and any of
  full: list of token lists     -> every position's logits of one pass, and the final state
  steps: list of token lists    -> logits token by token
  greedy: [[prompt, n]]         -> n greedy tokens continued from the prompt
Every sequence starts from the package's own initial state (zeros, or the checkpoint's time_state).
"""
import json
import sys

import torch

req = json.load(open(sys.argv[1]))
from rwkv.model import RWKV  # noqa: E402  (the environment chooses v4-v6 before this import)

model = RWKV(model=req["model"][:-4], strategy="cpu fp32")
assert model.version == 5.2, f"the package read this checkpoint as RWKV-{model.version}"

res = {"full": [], "full_state": [], "steps": [], "greedy": []}
with torch.no_grad():
    for toks in req.get("full", []):
        logits, state = model.forward(toks, None, full_output=True)
        res["full"].append(logits.clone())
        res["full_state"].append([s.clone() for s in state])
    for toks in req.get("steps", []):
        state, outs = None, []
        for t in toks:
            logits, state = model.forward([t], state)
            outs.append(logits.clone())
        res["steps"].append(torch.stack(outs))
    for prompt, n in req.get("greedy", []):
        logits, state = model.forward(prompt, None)
        gen = []
        for _ in range(n):
            t = int(torch.argmax(logits))
            gen.append(t)
            logits, state = model.forward([t], state)
        res["greedy"].append(gen)
torch.save(res, req["out"])
