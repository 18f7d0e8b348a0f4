"""Runs the official ``rwkv`` package (RWKV-5.2, cpu fp32) on a checkpoint; started by
tests.factories_v5.official_reference_v5 in its own process with ``RWKV_V7_ON=0``.

Request JSON: model (.pth path), out (.pt path), and any of
  full: list of token lists     -> every position's logits of one pass, and the final state
  steps: list of token lists    -> logits token by token
  greedy: [[prompt, n]]         -> n greedy tokens continued from the prompt
  state_file: path              -> "full" again, each sequence started from a runtime state file
                                   (blocks.N.att.time_state, [h, value, key]) put into the state list transposed
                                   to the package's [h, key, value], as RWKV-Runner does for v5/v6 (results in
                                   "full_from_file")
Every other sequence starts from the package's own initial state (zeros, or the checkpoint's time_state).
"""
import json
import sys

import torch

req = json.load(open(sys.argv[1]))
from rwkv.model import RWKV  # noqa: E402  (the environment chooses v4-v6 before this import)

model = RWKV(model=req["model"][:-4], strategy="cpu fp32")
assert model.version == 5.2, f"the package read this checkpoint as RWKV-{model.version}"

res = {"full": [], "full_state": [], "steps": [], "greedy": [], "full_from_file": []}
with torch.no_grad():
    if req.get("state_file"):
        start = torch.load(req["state_file"], map_location="cpu", weights_only=True)
        n_layer = model.args.n_layer
        for toks in req.get("full", []):
            state = [None] * n_layer * 3
            for i in range(n_layer):
                state[i * 3 + 0] = torch.zeros(model.args.n_embd)
                state[i * 3 + 1] = start[f"blocks.{i}.att.time_state"].transpose(1, 2).float().contiguous()
                state[i * 3 + 2] = torch.zeros(model.args.n_embd)
            logits, state = model.forward(toks, state, full_output=True)
            res["full_from_file"].append(logits.clone())
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
