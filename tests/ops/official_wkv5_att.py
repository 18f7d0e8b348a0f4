"""Runs the official ``rwkv`` package's RWKV-5.2 time-mix functions (``att_seq_v5_2`` for a sequence,
``att_one_v5_1`` for one token, which the package also uses for 5.2) on given tensors; started by
tests/ops/test_wkv5.py in its own process with ``RWKV_V7_ON=0 RWKV_JIT_ON=0`` (the functions are then plain
functions that never touch ``self``).

argv: input .pt (x [T, C], sx [C], s [H, N, N] as S[h, key, value], the block's weights as the package holds
them after loading: projections [in, out], mixes [C], time_decay and time_faaaa [H, N] as in the .pth), output .pt.
"""
import sys

import torch

from rwkv.model import RWKV  # noqa: E402  (the environment chooses v4-v6 and no JIT before this import)

z = torch.load(sys.argv[1], weights_only=True)
H, N = z["time_decay"].shape
t_decay = torch.exp(-torch.exp(z["time_decay"].float())).reshape(H, N, 1)  # what the package's loader makes
t_first = z["time_faaaa"].float().reshape(H, N, 1)                            # time_faaaa is used as it is
args = [z[n] for n in ("ln_w", "ln_b", "lx_w", "lx_b", "k_mix", "v_mix", "r_mix", "g_mix")] + [t_decay, t_first]
args += [z[n] for n in ("kw", "vw", "rw", "gw", "ow")] + [z["x"]] * 20  # the uint8 arguments: unused in fp32
with torch.no_grad():
    seq = RWKV.att_seq_v5_2(None, z["x"], z["sx"], z["s"].clone(), *args)
    one = RWKV.att_one_v5_1(None, z["x"][0], z["sx"], z["s"].clone(), *args)
torch.save({"seq": list(seq), "one": list(one)}, sys.argv[2])
