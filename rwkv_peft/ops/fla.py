"""flash-linear-attention's Triton kernels as a WKV path: no compiler needed (optional extra ``rwkv-peft[fla]``).

Where our CUDA kernel cannot be built (no nvcc or ninja, a build error) or does not fit the GPU, and for RWKV-6
(which has no kernel of ours), ``wkv7`` / ``wkv6`` run fla's ``chunk_rwkv7`` / ``chunk_rwkv6`` when the
``fla`` package imports and the tensors are on a GPU. The contract is ours (``ops/wkv7.py``, ``ops/wkv6.py``):
``r, w, k, v, ...`` ``[B, T, H, N]`` with ``w`` the log decay, an initial state ``[B, H, N, N]`` or ``[H, N, N]``
in our layout, ``(o, final_state)`` back, the state fp32 and differentiable. What this module converts:

- the state layout: ours is the official package's, RWKV-7 ``S[h, value, key]`` and RWKV-6 ``S[h, key, value]``;
  fla keeps ``[key, value]`` for both, so RWKV-7's state is transposed on the way in and out, RWKV-6's is not;
- ``scale``: fla scales ``r`` by ``N ** -0.5`` unless told otherwise; RWKV does not scale (``scale=1.0``);
- RWKV-6's argument order (fla: ``r, k, v, w, u``);
- packed samples: ``cu_seqlens`` (offsets into the flattened tokens, one initial state per sample), passed on as
  fla takes it (its inputs then have batch 1).

fla is imported only when one of these runs (never at import). Tested on the CPU against our references with a
stand-in that implements fla's documented semantics (tests/ops/test_fla.py); on a GPU against fla itself
(``cuda`` tests, ``scripts/gpu_check.sh``).
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
MODULES = {"rwkv7": "fla.ops.rwkv7", "rwkv6": "fla.ops.rwkv6"}


def available(version: str = "rwkv7") -> Tuple[bool, str]:
    """(whether fla's kernel for ``version`` imports, why not)."""
    try:
        importlib.import_module(MODULES[version])
    except Exception as e:  # ImportError, or triton failing to find a GPU toolchain
        return False, f"flash-linear-attention not usable ({type(e).__name__}: {e}); pip install 'rwkv-peft[fla]'"
    return True, "flash-linear-attention's Triton kernel"


def _states(initial_state: Optional[Tensor], n: int, H: int, N: int, transpose: bool) -> Optional[Tensor]:
    """Our initial state ([n, H, N, N] or shared [H, N, N]) in fla's layout, fp32, one per sequence."""
    if initial_state is None:
        return None
    s = initial_state.float()
    if s.dim() == 3:
        s = s.unsqueeze(0).expand(n, H, N, N)
    return s.transpose(-1, -2) if transpose else s


def wkv7_fla(r, w, k, v, a, b, initial_state: Optional[Tensor] = None,
             cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """RWKV-7 through fla's ``chunk_rwkv7``; with ``cu_seqlens`` (B = 1), one state per packed sample."""
    from fla.ops.rwkv7 import chunk_rwkv7
    B, T, H, N = r.shape
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o, final = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=_states(initial_state, n, H, N, True),
                           output_final_state=True, cu_seqlens=cu_seqlens)
    return o, final.float().transpose(-1, -2)


def wkv6_fla(r, w, k, v, u, initial_state: Optional[Tensor] = None,
             cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """RWKV-6 through fla's ``chunk_rwkv6`` (the same ``[key, value]`` state layout as ours)."""
    from fla.ops.rwkv6 import chunk_rwkv6
    B, T, H, N = r.shape
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o, final = chunk_rwkv6(r, k, v, w, u, scale=1.0, initial_state=_states(initial_state, n, H, N, False),
                           output_final_state=True, cu_seqlens=cu_seqlens)
    return o, final.float()
