"""Runs the official ``rwkv`` package (RWKV-4, cpu fp32) on a checkpoint; started by
tests.factories_v4.official_reference_v4 in its own process with ``RWKV_V7_ON=0``.

Request JSON: model (.pth path), out (.pt path), and any of
  full: list of token lists     -> every position's logits of one pass, and the final state
  steps: list of token lists    -> logits token by token
  greedy: [[prompt, n]]         -> n greedy tokens continued from the prompt
  att: {"x", "sx", "aa", "bb", "pp"} (a .pt path) -> the package's own ``att_seq`` of layer 0 on those inputs
                                   (results in "att": out, xx, aa, bb, pp)
Every sequence starts from the package's own initial state (v4: per layer att_x, aa, bb, pp = -1e30, ffn_x).
"""
import json
import sys

import torch

req = json.load(open(sys.argv[1]))
from rwkv.model import RWKV  # noqa: E402  (the environment chooses v4-v6 before this import)

model = RWKV(model=req["model"][:-4], strategy="cpu fp32")
assert model.version == 4, f"the package read this checkpoint as RWKV-{model.version}"

res = {"full": [], "full_state": [], "steps": [], "greedy": [], "att": None}
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
    if req.get("att"):
        inp = torch.load(req["att"], weights_only=True)
        w, a = model.w, "blocks.0.att."
        x = inp["x"].float()
        dummy = x  # the quantization arguments the fp32 path ignores
        res["att"] = model.att_seq(
            x, inp["sx"].float(), inp["aa"].float(), inp["bb"].float(), inp["pp"].float(),
            w["blocks.0.ln1.weight"], w["blocks.0.ln1.bias"],
            w[a + "time_mix_k"], w[a + "time_mix_v"], w[a + "time_mix_r"], w[a + "time_decay"], w[a + "time_first"],
            w[a + "key.weight"], w[a + "value.weight"], w[a + "receptance.weight"], w[a + "output.weight"],
            *([dummy] * 16))
torch.save(res, req["out"])
