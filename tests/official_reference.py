"""Runs the official ``rwkv`` package (cpu fp32) on a checkpoint; started by tests.factories.official_reference in
its own process, with ``RWKV_V7_ON`` set for the version before the package is imported.

Request JSON: model (.pth path), out (.pt path), version ("7", "6", "5.2", "4"; default "7"), and any of
  full: list of token lists     -> every position's logits of one pass, and the final state
  steps: list of token lists    -> logits token by token
  greedy: [[prompt, n]]         -> n greedy tokens continued from the prompt
v7 only (every sequence starts from zeros unless one of these is given):
  state_init: bool              -> start from the checkpoint's time_state (merged state) instead of zeros
  state_file: path              -> start from a runtime state file (blocks.N.att.time_state, [h, value, key]),
                                   put into the state list as it is, as RWKV-7 runtimes (RWKV-Runner) do
v4-v6 (every sequence starts from the package's own initial state: ``forward(..., None)``; v5/v6: zeros or the
checkpoint's time_state; v4: per layer att_x, aa, bb, pp = -1e30, ffn_x):
  state_file: path              -> (v5/v6) "full" again, each sequence started from a runtime state file
                                   (blocks.N.att.time_state, [h, value, key]) put into the state list transposed
                                   to the package's [h, key, value], as RWKV-Runner does for v5/v6 (results in
                                   "full_from_file")
any version:
  state_list: path              -> "full" again, each sequence started from this state list (a .pt list of
                                   tensors in the package's own layout, e.g. rwkv_peft's official_state; results
                                   in "full_from_list")
  att: {"x", "sx", "aa", "bb", "pp"} (a .pt path) -> (v4) the package's own ``att_seq`` of layer 0 on those inputs
                                   (results in "att": out, xx, aa, bb, pp)
"""
import json
import sys

import torch

req = json.load(open(sys.argv[1]))
from rwkv.model import RWKV  # noqa: E402  (the environment chooses v7 or v4-v6 before this import)

version = req.get("version", "7")
model = RWKV(model=req["model"][:-4], strategy="cpu fp32")
if version != "7":
    assert model.version == float(version), f"the package read this checkpoint as RWKV-{model.version}"

start = None
if version == "7":
    raw = torch.load(req["model"], map_location="cpu", weights_only=True)
    start = (torch.load(req["state_file"], map_location="cpu", weights_only=True) if req.get("state_file")
             else raw if req.get("state_init") else None)


def zero_state():
    if version != "7":
        return None  # the package's own initial state
    state = model.generate_zero_state()
    if start is not None:
        for i in range(model.n_layer):
            state[i * 3 + 1] = start[f"blocks.{i}.att.time_state"].float().clone()
    return state


res = {"full": [], "full_state": [], "steps": [], "greedy": [], "full_from_file": [], "full_from_list": [],
       "att": None}
with torch.no_grad():
    if req.get("state_list"):
        start_list = torch.load(req["state_list"], map_location="cpu", weights_only=True)
        for toks in req.get("full", []):
            logits, _ = model.forward(toks, [t.clone() for t in start_list], full_output=True)
            res["full_from_list"].append(logits.clone())
    if version != "7" and req.get("state_file"):
        from_file = torch.load(req["state_file"], map_location="cpu", weights_only=True)
        n_layer = model.args.n_layer
        for toks in req.get("full", []):
            state = [None] * n_layer * 3
            for i in range(n_layer):
                state[i * 3 + 0] = torch.zeros(model.args.n_embd)
                state[i * 3 + 1] = from_file[f"blocks.{i}.att.time_state"].transpose(1, 2).float().contiguous()
                state[i * 3 + 2] = torch.zeros(model.args.n_embd)
            logits, state = model.forward(toks, state, full_output=True)
            res["full_from_file"].append(logits.clone())
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
