"""The CUDA WKV-7 kernel (``kernels/wkv7``) behind an autograd Function, built on first use.

``wkv7_cuda(r, w, k, v, a, b, initial_state)`` has the contract of ``rwkv_peft.ops.wkv7.wkv7_recurrent``:
inputs ``[B, T, H, N]`` (bf16 or fp32), an optional initial state ``[B, H, N, N]`` or ``[H, N, N]`` (shared by
the batch; its gradient is summed over the batch), returns ``(o [B, T, H, N] in the input dtype, final state
[B, H, N, N] fp32)``, differentiable with respect to every input, the initial state included, and accepting a
gradient on the final state (so chunks of one long sequence backpropagate into each other).

``is_available()`` says whether the kernel can be used here and why not; it never builds anything where CUDA
is absent, and builds (once per process, cached on disk, see ``_cuda_build``) where it is present. Where the
GPU is there but the kernel is not usable (no nvcc, an unsupported GPU, a failed build) it warns once with the
reason -- for a failed build, the path of the compiler log. ``describe()`` is the report of ``rwkv-peft doctor``.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import _cuda_build

logger = logging.getLogger(__name__)

KERNEL_NAME = "wkv7"
OPS_NAMESPACE = "rwkv_peft_wkv7"
SOURCES = ("wkv7.cu", "wkv7_op.cpp")
HEAD_SIZES = (32, 64)                          # compiled head sizes
DTYPES = (torch.float32, torch.bfloat16)       # compiled input dtypes
CHECKPOINT_INTERVAL = 16                       # CK in wkv7.cu: the forward saves the state every 16 steps
MIN_CAPABILITY = (8, 0)                        # cp.async, bf16
# Shared memory per block (bytes, N = 64, bf16 / fp32 inputs) the backward's parameter kernel needs at the least:
# with each head's columns split over four blocks (wkv7.cu ParamLayout<T, 64, 4>), what GPUs with 99 KiB per block
# run (RTX 30/40/50, L40S) and A100; a whole head per block (188,544 / 217,216 bytes) runs where it fits (H100/H200).
# The launcher chooses from the device's opt-in limit; the other kernels need less (45,056 / 67,584).
SMEM_BWD = {torch.bfloat16: 71_808, torch.float32: 85_120}
SMEM_BWD_WHOLE_HEAD = {torch.bfloat16: 188_544, torch.float32: 217_216}
# The parameter kernel's column split: 0 = chosen from the device (above); 1 or 4 forces it (tests run the split
# on a GPU that would not need it). Read at each backward.
PARAM_SPLIT = 0

_lock = threading.Lock()
_loaded: Dict[str, Path] = {}                  # arch -> build dir (this process)
_failed: Dict[str, str] = {}                   # arch -> reason (this process; a failed build is not retried)
_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("WKV-7 CUDA kernel not used: %s", reason)
        warnings.warn(f"rwkv_peft: the WKV-7 CUDA kernel is not used ({reason}); the PyTorch path runs instead",
                      RuntimeWarning, stacklevel=3)


def kernel_sources() -> List[Path]:
    folder = _cuda_build.repo_kernel_dir(KERNEL_NAME)
    return [folder / s for s in SOURCES]


def _arch(device: Optional[torch.device] = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def _static_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the kernel cannot be used, found without building anything; None if a build may be tried."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    missing = [str(p) for p in kernel_sources() if not p.is_file()]
    if missing:
        return f"kernel sources not found: {', '.join(missing)}"
    if _cuda_build.find_nvcc() is None:
        return "nvcc not found (torch's CUDA_HOME is unset or has no bin/nvcc); install the CUDA toolkit or set CUDA_HOME"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"GPU compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is not None and optin < min(SMEM_BWD.values()):
        return (f"the backward needs {min(SMEM_BWD.values()) // 1024} KiB of shared memory per block and "
                f"{props.name} allows {optin // 1024} KiB (every GPU from sm_80 on allows 99 KiB or more)")
    return None


def _load(device: Optional[torch.device] = None, cache_dir: Optional[os.PathLike] = None) -> Path:
    """Build (first time) and load the kernel library for the device's arch; cached per process."""
    arch = _arch(device)
    with _lock:
        if arch in _loaded:
            return _loaded[arch]
        if arch in _failed:
            raise _cuda_build.KernelBuildError(_failed[arch])
        if _loaded:  # the ops are registered process-wide; a second arch would need a second library
            other = next(iter(_loaded))
            raise _cuda_build.KernelBuildError(
                f"the kernel is loaded for sm_{other}; a process can use it on one GPU arch only")
        try:
            build_dir = _cuda_build.load_kernel_library(
                KERNEL_NAME, kernel_sources(), arch=arch, cache_dir=cache_dir,
                verbose=os.environ.get("RWKV_PEFT_KERNEL_VERBOSE", "") not in ("", "0"))
        except Exception as e:
            _failed[arch] = str(e)
            raise
        _loaded[arch] = build_dir
        return build_dir


_available: Dict[int, Tuple[bool, str]] = {}    # device index -> answer (this process)


def is_available(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """``(True, why)`` if the kernel can run on ``device`` (default: the current CUDA device), else ``(False, why)``.

    Never builds where CUDA is absent. Where it is present, the first call builds (or loads the cached build);
    the answer is then remembered for the process (the dispatch asks on every call)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return _is_available(device)
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _available:
        _available[index] = _is_available(torch.device("cuda", index))
    return _available[index]


def _is_available(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    reason = _static_reason(device)
    if reason is not None:
        if torch.version.cuda is not None and torch.cuda.is_available():
            _warn_once(reason)   # a GPU is there, so the user would expect the kernel: say why not
        return False, reason
    try:
        build_dir = _load(device)
    except Exception as e:
        text = str(e) or type(e).__name__
        log = getattr(e, "log_path", None)
        reason = text.splitlines()[0] + (f" (log: {log})" if log and str(log) not in text.splitlines()[0] else "")
        _warn_once(text if text.startswith(reason) else f"{reason}\n{text}")   # the compiler output's tail too
        return False, reason
    return True, f"CUDA kernel for sm_{_arch(device)} (build {build_dir})"


# ----------------------------------------------------------------------------------------------- the op


def _ops():
    return getattr(torch.ops, OPS_NAMESPACE)


def _prep(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous, of ``dtype``, 16-byte aligned (what the kernel's cp.async copies need)."""
    x = x.to(dtype).contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    return x


class WKV7Function(torch.autograd.Function):
    """Autograd over the forward/backward ops; ``s0`` is None, ``[B,H,N,N]`` or ``[H,N,N]`` fp32."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0):
        ctx.set_materialize_grads(False)
        save = any(ctx.needs_input_grad)
        y, sT, sa, ckpt = _ops().forward(r, w, k, v, a, b, s0, save)
        if save:
            ctx.save_for_backward(r, w, k, v, a, b, sa, ckpt)
        ctx.s0_dim = None if s0 is None else s0.dim()
        return y, sT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, sa, ckpt = ctx.saved_tensors
        if dy is None and dsT is None:
            return (None,) * 7
        dy = torch.zeros_like(r) if dy is None else _prep(dy, r.dtype)
        dsT = None if dsT is None else _prep(dsT, torch.float32)
        dr, dw, dk, dv, da, db, ds0 = _ops().backward(r, w, k, v, a, b, dy, dsT, sa, ckpt, PARAM_SPLIT)
        if ctx.s0_dim is None or not ctx.needs_input_grad[6]:
            ds0 = None
        elif ctx.s0_dim == 3:
            ds0 = ds0.sum(0)
        return dr, dw, dk, dv, da, db, ds0


_fallback_warned: set = set()


def wkv7_cuda(r, w, k, v, a, b, initial_state: Optional[torch.Tensor] = None):
    """The WKV-7 recurrence on the CUDA kernel (see the module docstring). Cases the kernel is not compiled
    for (another head size, fp16/fp64 inputs) run ``wkv7_chunked`` instead, with a one-time warning."""
    from .wkv7 import _check_inputs, _initial_state, wkv7_chunked

    B, T, H, N = _check_inputs(r, w, k, v, a, b)
    dtypes = {x.dtype for x in (r, w, k, v, a, b)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if N not in HEAD_SIZES or dtype not in DTYPES:
        why = f"head size {N}, dtype {dtype}"
        if why not in _fallback_warned:
            _fallback_warned.add(why)
            warnings.warn(f"rwkv_peft: the WKV-7 CUDA kernel is compiled for head sizes {HEAD_SIZES} and "
                          f"float32/bfloat16 inputs; {why} runs the chunked PyTorch path", RuntimeWarning, stacklevel=2)
        return wkv7_chunked(r, w, k, v, a, b, initial_state)
    if T == 0:
        return r.new_zeros(B, 0, H, N), _initial_state(initial_state, B, H, N, r.float()).clone()
    _load(r.device)
    xs = [_prep(x, dtype) for x in (r, w, k, v, a, b)]
    s0 = None
    if initial_state is not None:
        if initial_state.dim() == 3:
            if tuple(initial_state.shape) != (H, N, N):
                raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; expected {(B, H, N, N)} "
                                 f"or {(H, N, N)}")
        elif tuple(initial_state.shape) != (B, H, N, N):
            raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; expected {(B, H, N, N)} "
                             f"or {(H, N, N)}")
        s0 = _prep(initial_state, torch.float32)
    with torch.cuda.device(r.device):
        if torch.is_grad_enabled() and any(x.requires_grad for x in xs + ([s0] if s0 is not None else [])):
            o, sT = WKV7Function.apply(*xs, s0)
        else:  # inference: nothing is saved for a backward (no sa, no checkpoints)
            o, sT, _, _ = _ops().forward(*xs, s0, False)
    return o.to(r.dtype), sT


# ----------------------------------------------------------------------------------------------- report


def build_info(build: bool = True) -> str:
    """Human-readable report for ``rwkv-peft doctor``: which WKV-7 path CUDA tensors take, and why.

    With ``build=False`` nothing is compiled (the report then says whether a build would be tried)."""
    from .wkv7 import KERNEL_ENV

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    forced = os.environ.get(KERNEL_ENV)
    lines.append(f"{KERNEL_ENV}={forced}" if forced else f"{KERNEL_ENV} unset (auto)")
    nvcc = _cuda_build.find_nvcc()
    if nvcc:
        lines.append(f"nvcc: {nvcc} ({_cuda_build.nvcc_version(nvcc)})")
    else:
        import shutil
        on_path = shutil.which("nvcc")
        lines.append("nvcc: not found by torch's extension builder (CUDA_HOME)"
                     + (f"; {on_path} is on PATH but torch does not use it" if on_path else ""))
    lines.append(f"sources: {_cuda_build.repo_kernel_dir(KERNEL_NAME)}")
    lines.append(f"cache: {_cuda_build.cache_root()} (override with ${_cuda_build.CACHE_ENV})")
    if torch.version.cuda is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        lines.append(f"GPU: {props.name}, sm_{props.major}{props.minor}, {optin // 1024} KiB shared memory per block")
        layout = {dt: "a whole head per block" if optin >= need else "each head's columns over four blocks"
                  for dt, need in SMEM_BWD_WHOLE_HEAD.items()}
        lines.append(f"backward parameter kernel: {layout[torch.bfloat16]} (bf16), {layout[torch.float32]} (fp32)")
    reason = _static_reason()
    if reason is not None:
        lines.append(f"WKV-7 path: torch (chunked) -- {reason}")
    elif not build:
        lines.append("WKV-7 path: cuda if the build succeeds (not attempted: build=False)")
    else:
        ok, why = is_available()
        lines.append(f"WKV-7 path: {'cuda' if ok else 'torch (chunked)'} -- {why}")
        for build_dir in _loaded.values():
            lines.append(f"build log: {Path(build_dir) / 'build.log'}")
    if forced == "torch":
        lines.append(f"(but {KERNEL_ENV}=torch forces the PyTorch path)")
    return "\n".join(lines)


describe = build_info
