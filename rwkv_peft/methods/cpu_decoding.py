"""Weights laid out and stored for decoding on the CPU (``rwkv-peft chat`` / ``generate``).

A decode step is one matrix-vector product per ``nn.Linear``: its speed is how fast the weights stream from
memory. Three ways to store them, chosen with ``--cpu-weights`` (docs/benchmarks.md has the measurements):

===========  ====================================================================  =========================
``weights``  what is stored                                                        error of the logits
===========  ====================================================================  =========================
``fp32``     every weight as it is, laid out ``[in, out]`` in memory (MKL reads    exact (float rounding)
             that layout about twice as fast as ``nn.Linear``'s ``[out, in]``)
``fp16``     the big projections and the head in float16, packed for fbgemm's      about 1e-3 relative
             fp16 GEMM; activations stay float32
``int8``     the big projections and the head in int8, one scale per output        about the official
             channel, packed for fbgemm; each call quantizes its input to 8 bits   package's bf16 mode
             with one scale (per token when decoding one token)
===========  ====================================================================  =========================

"Big projections" are the modules LoRA targets by default for the model's RWKV version (the registry's
``default`` preset: receptance, key, value, output, ...) plus the head; the small low-rank maps (decay, a, v,
gate) are a few percent of the bytes and feed exponentials, so they stay float32 (relaid).

fp16 and int8 go through PyTorch's fbgemm operators (``torch.ops.quantized.linear_prepack[_fp16]`` and
``linear_dynamic[_fp16]``, what ``torch.ao.nn.quantized.dynamic.Linear`` calls): x86 CPUs only. A peft adapter
is merged into the weights first (``merge_and_unload``); a state adapter is untouched. With ``int8`` a batch
shares one activation scale per call, so rows generated together can differ from rows generated one by one.
"""
from __future__ import annotations

import warnings
from typing import Dict

import torch
from torch import nn

from ..errors import RWKVPeftError

CPU_WEIGHTS = ("fp32", "fp16", "int8")
_FBGEMM_ENGINES = ("x86", "fbgemm")


class CPUDecodingError(RWKVPeftError, ValueError):
    """Weights that cannot be stored as asked (the engine, the device or the dtype does not allow it)."""


def fbgemm_engine() -> bool:
    """Whether this PyTorch's quantized engine is fbgemm's (x86), which fp16 / int8 weights need."""
    return torch.backends.quantized.engine in _FBGEMM_ENGINES


def reduce_range_needed() -> bool:
    """Whether int8 activations must keep to 7 bits: fbgemm's int8 kernels without VNNI (AVX2) add pairs of
    8-bit products in 16 bits, which can saturate at full range; with VNNI they add in 32 bits. PyTorch's own
    x86 defaults keep 7 bits everywhere; full range halves the error (docs/benchmarks.md). Unknown: 7 bits."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (callable(is_vnni) and is_vnni())


class PackedLinear(nn.Module):
    """An ``nn.Linear`` stored for CPU inference: float16 (``kind="fp16"``) or per-output-channel int8
    (``kind="int8"``) weights packed for fbgemm; no gradients.

    forward: x [..., in_features] (any float dtype; computed in float32) -> [..., out_features] in x's dtype.
    int8 quantizes x to 8 bits with one scale per call (7 bits on CPUs without VNNI: ``reduce_range_needed``);
    fp16 computes in float32 from float16 weights.
    """

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        if kind not in ("fp16", "int8"):
            raise CPUDecodingError(f"PackedLinear: kind {kind!r} is not one of 'fp16', 'int8'")
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        self._reduce_range = reduce_range_needed()
        w = linear.weight.detach().float().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float()
        try:
            if kind == "fp16":
                self._packed = torch.ops.quantized.linear_prepack_fp16(w, bias)
            else:
                scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
                with warnings.catch_warnings():  # torch 2.13 announces that qint8 tensors will go, not when
                    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
                    qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                    torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        except (AttributeError, RuntimeError) as e:  # an operator this PyTorch no longer has, or cannot run
            raise CPUDecodingError(f"--cpu-weights {kind}: PyTorch {torch.__version__} cannot pack weights for "
                                   f"fbgemm ({type(e).__name__}: {str(e).splitlines()[0]}); use --cpu-weights "
                                   f"fp32") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the operators take [..., in] as it is; decoding calls this ~40 times per token, so nothing else is done
        x32 = x if x.dtype == torch.float32 else x.float()
        if self.kind == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(x32, self._packed)
        else:
            y = torch.ops.quantized.linear_dynamic(x32, self._packed, self._reduce_range)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def relayout_for_cpu_decoding(model: nn.Module) -> int:
    """Store every plain ``nn.Linear`` weight of a model on the CPU as ``[in, out]`` in memory (its transpose made
    contiguous, seen transposed again): values, shapes and modules stay as they are, so peft's layers keep working
    around them. CPU decoding is a matrix-vector product per weight, bound by reading the weights, and MKL reads
    this layout (the official package's) about twice as fast as ``nn.Linear``'s ``[out, in]`` (docs/benchmarks.md:
    the 65,536-token head, 134 MB, in 5.6 ms against 12.5 ms). For inference (``chat``, ``generate``): such a
    weight is not contiguous, and whoever saves it raw must call ``.contiguous()`` first. Quantized layers and
    weights on other devices are left alone. Returns how many weights were laid out."""
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if type(mod) is not nn.Linear or type(w) is not nn.Parameter or w.device.type != "cpu" or w.dim() != 2:
                continue
            if w.is_contiguous():
                w.data = w.data.t().contiguous().t()
                n += 1
    return n


def _big_projection_names(model: nn.Module):
    """Module-name suffixes stored packed: the version's default LoRA targets and the head."""
    from .. import versions
    return tuple(versions.of(model).lora_presets["default"]) + ("head",)


def _check_packable(model: nn.Module, weights: str) -> None:
    if weights not in CPU_WEIGHTS:
        raise CPUDecodingError(f"--cpu-weights {weights!r}: expected one of {', '.join(CPU_WEIGHTS)}")
    if not fbgemm_engine():
        raise CPUDecodingError(
            f"--cpu-weights {weights}: needs PyTorch's fbgemm operators (x86 CPUs); this PyTorch's quantized "
            f"engine is {torch.backends.quantized.engine!r} (available: {', '.join(torch.backends.quantized.supported_engines)}); use "
            f"--cpu-weights fp32")
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            raise CPUDecodingError(f"--cpu-weights {weights}: the model is on {p.device} ({name}); it is for "
                                   f"decoding on the CPU (--device cpu)")
        if p.dtype != torch.float32 and p.is_floating_point():
            raise CPUDecodingError(f"--cpu-weights {weights}: the model is loaded in {p.dtype} ({name}); load it in "
                                   f"float32 (--dtype float32): the packed weights compute in float32")


def prepare_for_cpu_decoding(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """The model made ready for decoding on the CPU, as ``weights`` (``fp32``, ``fp16``, ``int8``) asks; see the
    module docstring. Merges a peft adapter first when packing (the result is the merged base model, state
    adapter included). Returns the model to use; raises :class:`CPUDecodingError` naming what does not allow it.
    """
    if weights == "fp32":
        relayout_for_cpu_decoding(model)
        return model
    _check_packable(model, weights)
    if hasattr(model, "merge_and_unload"):  # a peft model: its adapter folded into the weights
        model = model.merge_and_unload()
    suffixes = _big_projection_names(model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and any(full == s or full.endswith("." + s) for s in suffixes):
                setattr(parent, child_name, PackedLinear(child, weights))
    relayout_for_cpu_decoding(model)  # what is left in float32: the small low-rank maps
    return model


def packed_summary(model: nn.Module) -> Dict[str, int]:
    """How many Linear layers are stored each way: ``{"fp32": n, "fp16": n, "int8": n}``."""
    counts = dict.fromkeys(CPU_WEIGHTS, 0)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            counts[m.kind] += 1
        elif type(m) is nn.Linear:
            counts["fp32"] += 1
    return counts
