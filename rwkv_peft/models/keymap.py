"""BlinkDL ``.pth`` keys <-> our Hugging Face keys, for every version: one driver, one table per version.

Every mapping is a rename plus, for some tensors, a reshape or a transpose; nothing is recomputed, so a
``.pth -> HF -> .pth`` round trip gives back the same bytes (dtype, shape and values of every tensor), and the
``.pth`` keys come out in the order of the official training code.

What every version shares: ``emb.weight`` -> ``model.emb.weight``, ``head.weight`` -> ``head.weight``,
``ln_out.*`` -> ``model.ln_out.*``, ``blocks.0.ln0.*`` -> ``model.ln0.*``, ``blocks.i.ln{1,2}.*`` and every
block tensor -> ``model.blocks.i.*``. What differs is a :class:`KeyMap`: which time-mix (``att.``) and channel-mix
(``ffn.``) tensors are per-channel vectors stored ``[1, 1, C]`` (ours ``[C]``), which keep their shape, which
low-rank matrices are stored transposed or under another name, and the official order of a block's tensors.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence, Tuple

import torch

from ..errors import CheckpointError

StateDict = Dict[str, torch.Tensor]
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"model\.blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class KeyMap:
    """One version's tensor names (without the ``att.`` / ``ffn.`` part) and how each changes."""
    title: str                            # "RWKV-5.2", in error messages
    model_class: str                      # "rwkv_peft.models.rwkv5.modeling_rwkv5:RWKV5ForCausalLM"
    config_from_blinkdl: Callable         # (sd, where) -> config, every size read from the tensors
    att_vec: Tuple[str, ...]              # [1, 1, C] in the .pth, [C] ours
    ffn_vec: Tuple[str, ...]
    att_same: Tuple[str, ...]             # the same tensor under the same name
    ffn_same: Tuple[str, ...]
    block_order: Sequence[str]            # a block's tensors in the official training code's order
    att_transposed: Dict[str, str] = field(default_factory=dict)  # .pth name -> ours, stored transposed
    att_renamed: Dict[str, str] = field(default_factory=dict)     # .pth name -> ours, the same tensor

    # ---- .pth -> ours ----------------------------------------------------------------------------------------

    def key_to_hf(self, key: str) -> Tuple[str, str]:
        """(our key, how the tensor changes: 'same' | 'flatten' | 'transpose'); KeyError for a key not known."""
        if key in ("emb.weight",) or key.startswith("ln_out."):
            return "model." + key, "same"
        if key == "head.weight":
            return key, "same"
        m = _BLOCK.fullmatch(key)
        if not m:
            raise KeyError(key)
        i, rest = m.groups()
        p = f"model.blocks.{i}."
        if rest in ("ln0.weight", "ln0.bias") and i == "0":
            return "model." + rest, "same"
        if re.fullmatch(r"ln[12]\.(weight|bias)", rest):
            return p + rest, "same"
        part, _, name = rest.partition(".")
        if part == "ffn" and name in self.ffn_vec or part == "att" and name in self.att_vec:
            return p + rest, "flatten"
        if part == "ffn" and name in self.ffn_same or part == "att" and name in self.att_same:
            return p + rest, "same"
        if part == "att" and name in self.att_transposed:
            return p + "att." + self.att_transposed[name], "transpose"
        if part == "att" and name in self.att_renamed:
            return p + "att." + self.att_renamed[name], "same"
        raise KeyError(key)

    def blinkdl_to_hf(self, sd: StateDict, where: str = "checkpoint"):
        """(config, our state dict) of a BlinkDL state dict; every tensor checked against the model's."""
        config = self.config_from_blinkdl(sd, where)
        out: StateDict = {}
        for key, t in sd.items():
            try:
                new, how = self.key_to_hf(key)
            except KeyError:
                raise CheckpointError(f"{where}: unexpected key '{key}' (not part of an {self.title} checkpoint "
                                      f"this converter knows)") from None
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{where}: key '{key}' holds a {type(t).__name__}, not a tensor")
            out[new] = t.reshape(-1) if how == "flatten" else t.t() if how == "transpose" else t
        check_complete(out, config, where, self.causal_lm_class())
        return config, {k: v.contiguous() for k, v in out.items()}

    # ---- ours -> .pth ----------------------------------------------------------------------------------------

    def hf_to_blinkdl(self, sd: StateDict, config) -> StateDict:
        """Our state dict -> BlinkDL keys and shapes (the exact inverse of ``blinkdl_to_hf``), in official order."""
        C = config.hidden_size
        transposed = {v: k for k, v in self.att_transposed.items()}
        renamed = {v: k for k, v in self.att_renamed.items()}
        out: StateDict = {}
        for key, t in sd.items():
            if key in ("model.emb.weight", "head.weight") or key.startswith("model.ln_out."):
                out[key[len("model."):] if key.startswith("model.") else key] = t
                continue
            if key.startswith("model.ln0."):
                out["blocks.0." + key[len("model."):]] = t
                continue
            m = _OUR_BLOCK.fullmatch(key)
            if not m:
                raise CheckpointError(f"unexpected key '{key}' in the model's {self.title} state dict")
            i, rest = m.groups()
            part, _, name = rest.partition(".")
            p = f"blocks.{i}."
            if part == "att" and name in transposed:
                out[p + "att." + transposed[name]] = t.t()
            elif part == "att" and name in renamed:
                out[p + "att." + renamed[name]] = t
            elif part == "ffn" and name in self.ffn_vec or part == "att" and name in self.att_vec:
                out[p + rest] = t.reshape(1, 1, C)
            else:
                out[p + rest] = t
        return {k: out[k].contiguous() for k in sorted(out, key=self.official_order)}

    def official_order(self, key: str):
        """Sort key: emb, then each block's tensors in ``block_order``, then ln_out, then head."""
        if key == "emb.weight":
            return (0, 0, 0)
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            order = self.block_order
            return (1, int(i), order.index(rest) if rest in order else len(order))
        return (2, 0, int(key.endswith("bias"))) if key.startswith("ln_out") else (3, 0, 0)

    # ---- a model ---------------------------------------------------------------------------------------------

    def causal_lm_class(self):
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)

    def load_blinkdl_model(self, sd: StateDict, where: str = "checkpoint", dtype=None):
        """The ``...ForCausalLM`` holding the tensors of a BlinkDL state dict (for tests and scripts)."""
        config, hf = self.blinkdl_to_hf(sd, where)
        with torch.device("meta"):
            model = self.causal_lm_class()(config)
        model.load_state_dict(hf, assign=True, strict=True)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()


def expected_hf_keys(config, model_class) -> Dict[str, Tuple[int, ...]]:
    """Every key of our state dict and its shape, for checks (built from the model itself on 'meta')."""
    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_complete(sd: StateDict, config, where: str, model_class) -> None:
    """Every tensor the model needs, in its shape, and no other."""
    expected = expected_hf_keys(config, model_class)
    for k, shape in expected.items():
        if k not in sd:
            raise CheckpointError(f"{where}: missing tensor for '{k}' (expected shape {list(shape)})")
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{where}: '{k}' has shape {list(sd[k].shape)}; the sizes read from the "
                                  f"checkpoint give {list(shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected key '{extra[0]}'{more}")


def require(sd: StateDict, keys, where: str) -> None:
    """CheckpointError naming the first of ``keys`` the state dict lacks."""
    for k in keys:
        if k not in sd:
            raise CheckpointError(f"{where}: missing key '{k}'")


def layer_count(sd: StateDict) -> int:
    """How many blocks a BlinkDL state dict has (from the block indices of its keys)."""
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
