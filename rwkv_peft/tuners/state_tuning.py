"""State tuning: train only each layer's initial WKV state ``[H, N, N]`` (RWKV-7, RWKV-6, RWKV-5.2), and in
"full-state" tuning (``full=True``) both token-shift states ``[C]`` of every layer too.

Design
------
peft's method registry is closed: ``register_peft_method`` refuses any name outside its ``PeftType`` enum, so a
"state tuning" peft method would need a patched enum, which breaks whenever peft reorganises its internals. We
therefore keep state tuning as our own small tuner *beside* peft:

* the trainable parameters are the base model's own ``att.time_state`` (one per time mix of the version's
  class; the model starts every sequence from it when ``config.use_initial_state`` is set). peft never wraps or
  copies them, so a ``PeftModel`` reaches them by plain attribute access through ``get_base_model()`` and LoRA +
  state compose in one model without either library knowing about the other;
* ``apply_state_tuning`` creates the parameters where the model has none, marks them trainable (after
  ``get_peft_model`` too, which freezes every non-LoRA parameter) and records a ``StateTuningConfig`` on the
  base model;
* the state is saved in peft's folder style: one ``state_adapter.safetensors`` beside ``adapter_config.json``
  / ``adapter_model.safetensors``, self-describing through its safetensors metadata (architecture, layers,
  heads, head size, layout), and exported to the runtime ``.pth`` format (``blocks.N.att.time_state``).

Full-state tuning adds ``att.shift_state`` and ``ffn.shift_state`` (``[C]`` each; ``config.use_initial_shift``):
the "previous token" the first token of a sequence sees in the time mix and the channel mix (the official
package's ``state[3 * i]`` and ``state[3 * i + 2]``). They are saved beside the WKV states under the same keys
(``blocks.N.att.shift_state``, ``blocks.N.ffn.shift_state``) in our adapter and in a merged checkpoint; the runtime
``.pth`` keeps the WKV states only (RWKV-Runner counts its keys as layers), and :func:`official_state` builds the
official package's whole state list from the adapter.

What differs per version lives in its ``rwkv_peft.versions.Version`` entry (``state_layout``, ``state_file_key``,
``state_file_layout``, ``runtime_state_layout``); this module asks it. Today every version keeps its parameter
and its runtime file in ``S[h, value, key]`` (so the export is a rename with no transpose); the official package
runs RWKV-7 on that layout and RWKV-5/6 on its transpose ``S[h, key, value]``, which it (and RWKV-Runner) makes
from the file by ``.transpose(1, 2)``. A state only fits the version it was trained on: our state file records
the version, and loading it onto another version's model is refused (a runtime ``.pth`` carries no version, so
only its sizes are checked).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import versions
from ..errors import RWKVPeftError

STATE_FILE = "state_adapter.safetensors"
STATE_LAYOUT = versions.VALUE_KEY  # RWKV-7's; each version's own is ``Version.state_layout``
ARCHITECTURE = versions.DEFAULT.name  # what a state file that names no version was written for (older files)
STATE_KEY = "blocks.{}.att.time_state"
_STATE_KEY_RE = re.compile(re.escape(versions.DEFAULT.state_file_key).replace(r"\{layer\}", r"(\d+)"))


class StateMismatchError(RWKVPeftError, ValueError):
    """A state that does not fit a model; the message names the dimension and both values."""


@dataclass
class StateTuningConfig:
    """What ``apply_state_tuning`` attached; saved (as JSON) in the state file's metadata and the manifest."""
    init: str = "zeros"
    trainable_only: bool = True
    full: bool = False  # the token-shift states train too
    architecture: str = ARCHITECTURE
    num_hidden_layers: int = 0
    num_heads: int = 0
    head_size: int = 0
    hidden_size: int = 0
    layout: str = STATE_LAYOUT
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- finding the RWKV model and its time mixes -----------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The ``RWKV<N>ForCausalLM`` (or ``RWKV<N>Model``) under a ``PeftModel`` / ``LoraModel`` wrapper."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 4:
        inner = model.get_base_model()
        if inner is model:
            break
        model, seen = inner, seen + 1
    return model


def time_mixes(model: nn.Module) -> List[nn.Module]:
    """The model's time-mix layers, by layer; refuses a version whose state tuning is not wired in."""
    base = unwrap(model)
    version = versions.of(base)
    wired = [v.title for v in versions.VERSIONS if v.state_tuning]
    if not version.state_tuning:
        raise StateMismatchError(f"state tuning is wired in for {', '.join(wired)} so far; this is a "
                                 f"{version.title} model (use LoRA, or a model of those versions)")
    mixes = [m for m in base.modules() if isinstance(m, version.time_mix_class)]
    if not mixes:
        raise StateMismatchError(f"{type(base).__name__} has no {version.title} time-mix layers")
    return sorted(mixes, key=lambda m: m.layer_idx)


def model_sizes(model: nn.Module) -> dict:
    cfg = unwrap(model).config
    return {"architecture": versions.of(cfg).name, "num_hidden_layers": cfg.num_hidden_layers,
            "num_heads": cfg.num_heads, "head_size": cfg.head_size, "hidden_size": cfg.hidden_size}


SHIFT_KEYS = ("blocks.{}.att.shift_state", "blocks.{}.ffn.shift_state")  # full-state tuning, [C] each


def trained_initial_states(model: nn.Module) -> List[nn.Parameter]:
    """The initial-state parameters being trained (WKV and token-shift; empty without state tuning; any model,
    wrapped or not)."""
    return [getattr(m, name) for m in model.modules() for name in ("time_state", "shift_state")
            if isinstance(getattr(m, name, None), nn.Parameter) and getattr(m, name).requires_grad]


def shift_mixes(model: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    """(time mix, channel mix) of every layer, in layer order."""
    return [(m, _block_of(model, m).ffn) for m in time_mixes(model)]


def _block_of(model: nn.Module, att: nn.Module) -> nn.Module:
    return unwrap(model).model.blocks[att.layer_idx]


def add_initial_shift(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give both mixes of every layer a ``shift_state`` parameter ``[C]`` (zeros) where they have none, and set
    ``config.use_initial_shift``; existing ones are kept (cast to ``dtype``)."""
    for pair in shift_mixes(model):
        for m in pair:
            p = getattr(m, "shift_state", None)
            if p is None:
                device = next((q.device for q in m.parameters() if q.device.type != "meta"), torch.device("cpu"))
                m.shift_state = nn.Parameter(torch.zeros(unwrap(model).config.hidden_size, dtype=dtype,
                                                         device=device), requires_grad=False)
            elif p.dtype != dtype:
                m.shift_state = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    unwrap(model).config.use_initial_shift = True
    return model


def get_shift_states(model: nn.Module) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Every layer's (time-mix, channel-mix) initial shift state ``[C]`` (detached, fp32, CPU); None without."""
    pairs = shift_mixes(model)
    if any(getattr(m, "shift_state", None) is None for pair in pairs for m in pair):
        return None
    return [tuple(m.shift_state.detach().float().cpu().clone() for m in pair) for pair in pairs]


def set_shift_states(model: nn.Module, shifts: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                     where: str = "state") -> nn.Module:
    """Copy ``shifts`` (per layer: time-mix and channel-mix ``[C]``) into the model, creating them where missing."""
    C, pairs = unwrap(model).config.hidden_size, shift_mixes(model)
    if len(shifts) != len(pairs):
        raise StateMismatchError(f"{where}: layers differ: the shift states have {len(shifts)} layers, the model "
                                 f"{len(pairs)}")
    for i, pair in enumerate(shifts):
        for s in pair:
            if tuple(s.shape) != (C,):
                raise StateMismatchError(f"{where}: layer {i} shift state has shape {list(s.shape)}; expected "
                                         f"[C] = [{C}]")
    add_initial_shift(model)
    with torch.no_grad():
        for pair, values in zip(pairs, shifts):
            for m, s in zip(pair, values):
                m.shift_state.copy_(s.to(m.shift_state.dtype))
    return model


def has_initial_state(model: nn.Module) -> bool:
    return all(getattr(m, "time_state", None) is not None for m in time_mixes(model))


def add_initial_state(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give every time mix an ``att.time_state`` parameter (zeros) where it has none, in ``dtype`` (fp32: the
    state is small and trained in full precision even on a bf16 / quantized base), and set
    ``config.use_initial_state``. An existing state is kept (cast to ``dtype``)."""
    for m in time_mixes(model):
        ts = getattr(m, "time_state", None)
        if ts is None:
            device = next((p.device for p in m.parameters() if p.device.type != "meta"), torch.device("cpu"))
            m.time_state = nn.Parameter(torch.zeros(m.num_heads, m.head_size, m.head_size, dtype=dtype,
                                                    device=device), requires_grad=False)
        elif ts.dtype != dtype:
            m.time_state = nn.Parameter(ts.detach().to(dtype), requires_grad=ts.requires_grad)
    unwrap(model).config.use_initial_state = True
    return model


def get_states(model: nn.Module) -> List[torch.Tensor]:
    """Every layer's initial state ``[H, N, N]`` (detached, fp32, CPU), in layer order."""
    out = []
    for m in time_mixes(model):
        if m.time_state is None:
            raise ValueError(f"layer {m.layer_idx} has no initial state (apply_state_tuning or load one first)")
        out.append(m.time_state.detach().float().cpu().clone())
    return out


def check_states(states: Sequence[torch.Tensor], sizes: dict, where: str = "state") -> None:
    """Raise ``StateMismatchError`` naming the dimension when ``states`` do not fit a model of ``sizes``."""
    L, H, N = sizes["num_hidden_layers"], sizes["num_heads"], sizes["head_size"]
    if len(states) != L:
        raise StateMismatchError(f"{where}: layers differ: the state has {len(states)} layers, the model {L}")
    for i, s in enumerate(states):
        if s.dim() != 3:
            raise StateMismatchError(f"{where}: layer {i} state has shape {list(s.shape)}; expected [H, N, N] = "
                                     f"[{H}, {N}, {N}]")
        if s.shape[0] != H:
            raise StateMismatchError(f"{where}: heads differ: the state has {s.shape[0]} heads, the model {H}")
        if s.shape[1] != N or s.shape[2] != N:
            raise StateMismatchError(f"{where}: head size differs: the state has {s.shape[1]}x{s.shape[2]}, "
                                     f"the model {N}x{N}")


def check_state_version(architecture: Optional[str], model: nn.Module, where: str = "state") -> None:
    """Raise ``StateMismatchError`` when a state recorded for one version (``architecture``: "rwkv6") is put on
    a model of another; ``None`` (a runtime ``.pth``, which records no version) passes."""
    if architecture is None:
        return
    have = versions.of(unwrap(model))
    if architecture != have.name:
        theirs = versions.by_name(architecture)
        raise StateMismatchError(
            f"{where}: version differs: the state was trained on {theirs.title if theirs else architecture} "
            f"({architecture}), the model is {have.title} ({have.name}); a state only fits the RWKV version it "
            f"was trained on")


def set_states(model: nn.Module, states: Sequence[torch.Tensor], architecture: Optional[str] = None,
               where: str = "state") -> nn.Module:
    """Copy ``states`` (``[H, N, N]`` each, in the version's ``state_layout``) into the model's initial states,
    creating them where missing. ``architecture``: the version the states were recorded for (checked)."""
    check_state_version(architecture, model, where)
    check_states(states, model_sizes(model), where)
    add_initial_state(model)
    with torch.no_grad():
        for m, s in zip(time_mixes(model), states):
            m.time_state.copy_(s.to(m.time_state.dtype))
    return model


# ---- applying ---------------------------------------------------------------------------------------------------

def apply_state_tuning(model: nn.Module, init: Union[str, os.PathLike] = "zeros", trainable_only: bool = True,
                       full: bool = False):
    """Make every layer's initial WKV state a trainable parameter; returns ``model`` (changed in place).

    init: ``"zeros"``; ``"keep"`` (start from the state the checkpoint already has, zeros if none); or a path to
    a state file (runtime ``.pth``, our ``state_adapter.safetensors``, or an adapter folder holding one).
    trainable_only: freeze everything else. On a ``PeftModel`` the LoRA parameters stay trainable (LoRA + state
    in one run); peft has already frozen the base.
    full: "full-state" tuning: both token-shift states of every layer train too (a state file's shift states,
    where it has them, are their starting point; zeros otherwise).
    """
    base = unwrap(model)
    from .trl_support import follow_adapter
    follow_adapter(model)  # the base's own states come back whenever peft's adapter is off (TRL's reference pass)
    add_initial_state(model)
    if full:
        add_initial_shift(model)
    if isinstance(init, (str, os.PathLike)) and str(init) not in ("zeros", "keep"):
        if not Path(init).exists():
            raise ValueError(f"state init {str(init)!r}: expected 'zeros', 'keep' or a path to a state file "
                             f"(no such file or folder)")
        states, meta = load_state_any(init, versions.of(base).name)
        set_states(model, states, meta.get("architecture"), where=str(init))
        shifts = load_shift_states(init)
        if shifts is not None:
            set_shift_states(model, shifts, where=str(init))
        from ..paths import portable_path
        init_name = portable_path(str(init))  # recorded in files that get published: no local folder layout
    elif str(init) == "zeros":
        with torch.no_grad():
            for m in time_mixes(model):
                m.time_state.zero_()
            for pair in (shift_mixes(model) if full else []):
                for m in pair:
                    m.shift_state.zero_()
        init_name = "zeros"
    elif str(init) == "keep":
        init_name = "keep"
    else:
        raise ValueError(f"state init {init!r}: expected 'zeros', 'keep' or a path to a state file")
    if trainable_only:
        is_peft = model is not base
        for p in model.parameters():
            if is_peft and p.requires_grad:
                continue  # the adapter's own weights (LoRA, MiSS, saved modules): peft decides
            p.requires_grad_(False)
    base._rwkv_state_tuning = config_for(model, init=init_name, trainable_only=trainable_only, full=full)
    mark_states_trainable(model)
    return model


def config_for(model: nn.Module, **kw) -> StateTuningConfig:
    """The ``StateTuningConfig`` describing ``model``'s states (version, sizes, layout)."""
    sizes = model_sizes(model)
    return StateTuningConfig(**kw, architecture=sizes["architecture"], num_hidden_layers=sizes["num_hidden_layers"],
                             num_heads=sizes["num_heads"], head_size=sizes["head_size"],
                             hidden_size=sizes["hidden_size"], layout=versions.of(unwrap(model)).state_layout)


def state_tuning_config(model: nn.Module) -> Optional[StateTuningConfig]:
    return getattr(unwrap(model), "_rwkv_state_tuning", None)


def mark_states_trainable(model: nn.Module) -> None:
    """Re-enable the state's gradient (``get_peft_model`` freezes every non-LoRA parameter)."""
    st = state_tuning_config(model)
    if st is not None:
        for m in time_mixes(model):
            if m.time_state is not None:
                m.time_state.requires_grad_(True)
        for pair in (shift_mixes(model) if st.full else []):
            for m in pair:
                if getattr(m, "shift_state", None) is not None:
                    m.shift_state.requires_grad_(True)


# ---- files ------------------------------------------------------------------------------------------------------

def _metadata(sizes: dict, extra: Optional[dict] = None) -> Dict[str, str]:
    from .. import __version__
    version = versions.by_name(sizes.get("architecture"))
    meta = {"format": "pt", "layout": (version or versions.DEFAULT).state_layout,
            "layers": str(sizes["num_hidden_layers"]), "heads": str(sizes["num_heads"]),
            "head_size": str(sizes["head_size"]), "hidden_size": str(sizes["hidden_size"]),
            "key_format": (version or versions.DEFAULT).state_file_key, "dtype": "float32",
            "rwkv_peft_version": __version__}
    if version is not None:  # a state of unknown version (from a runtime .pth) records none
        meta.update(architecture=version.name, version=version.blinkdl,
                    runtime_layout=version.runtime_state_layout)
    if extra:
        meta["state_tuning"] = json.dumps(extra, sort_keys=True)
    return meta


def states_to_dict(states: Sequence[torch.Tensor], version: Optional[versions.Version] = None,
                   shifts: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """``{'blocks.N.att.time_state': [H, N, N] fp32}``: the runtime state file of ``version`` (its key and
    ``state_file_layout``) from states in its ``state_layout``; ``None``: the tensors as they are. ``shifts``
    (full-state tuning) adds ``blocks.N.att.shift_state`` and ``blocks.N.ffn.shift_state`` ``[C]``."""
    if version is None:
        out = {STATE_KEY.format(i): s.detach().float().cpu().contiguous() for i, s in enumerate(states)}
    else:
        out = {version.state_key(i): version.state_to_file(s.detach().float().cpu()).contiguous()
               for i, s in enumerate(states)}
    for i, pair in enumerate(shifts or ()):
        for key, t in zip(SHIFT_KEYS, pair):
            out[key.format(i)] = t.detach().float().cpu().contiguous()
    return out


def shifts_from_dict(sd: Dict[str, torch.Tensor], layers: int, where: str
                     ) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The shift states of a state dict (full-state tuning), or None when it has none."""
    if not any(k.endswith(".shift_state") for k in sd):
        return None
    missing = [k.format(i) for i in range(layers) for k in SHIFT_KEYS if k.format(i) not in sd]
    if missing:
        raise StateMismatchError(f"{where}: layers differ: no '{missing[0]}' (a full state has both shift states "
                                 f"of every layer)")
    return [tuple(sd[k.format(i)].float() for k in SHIFT_KEYS) for i in range(layers)]


def load_shift_states(path: os.PathLike) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The shift states stored with a state (our state file, a runtime ``.pth``, or an adapter folder); None when
    it holds only WKV states."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        from ..convert import load_pth
        sd = load_pth(path)
    layers = len([k for k in sd if _STATE_KEY_RE.fullmatch(k)])
    return shifts_from_dict(sd, layers, str(path))


def states_from_dict(sd: Dict[str, torch.Tensor], where: str,
                     version: Optional[versions.Version] = None) -> List[torch.Tensor]:
    """The states (in ``version``'s ``state_layout``; ``None``: as stored) of a state dict."""
    found = {}
    for k, v in sd.items():
        m = _STATE_KEY_RE.fullmatch(k)
        if m:
            found[int(m.group(1))] = v
    if not found:
        raise StateMismatchError(f"{where}: no 'blocks.N.att.time_state' tensors found")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise StateMismatchError(f"{where}: layers differ: no state for layer {missing[0]} "
                                 f"(found layers {sorted(found)})")
    states = [found[i].float() for i in range(len(found))]
    return states if version is None else [version.state_from_file(x) for x in states]


def sizes_of_states(states: Sequence[torch.Tensor], architecture: Optional[str] = None) -> dict:
    """The sizes of ``states``; ``architecture``: the version they were recorded for (None: unknown)."""
    H, N = states[0].shape[0], states[0].shape[-1]
    return {"architecture": architecture, "num_hidden_layers": len(states), "num_heads": H, "head_size": N,
            "hidden_size": H * N}


def save_state_file(states: Sequence[torch.Tensor], path: os.PathLike, extra: Optional[dict] = None,
                    architecture: Optional[str] = None,
                    shifts: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
    """Our state adapter: safetensors with ``blocks.N.att.time_state`` [H, N, N] fp32 (the version's
    ``state_layout``) and metadata naming the version (``architecture``: "rwkv6"; None: unknown) (atomic).
    ``shifts``: full-state tuning's shift states (``blocks.N.att.shift_state``, ``blocks.N.ffn.shift_state``)."""
    from safetensors.torch import save_file
    from ..convert import atomic_path
    sizes = sizes_of_states(states, architecture)
    check_states(states, sizes, where=str(path))
    with atomic_path(path) as tmp:
        save_file(states_to_dict(states, shifts=shifts), str(tmp), metadata=_metadata(sizes, extra))


def read_state_file(path: os.PathLike) -> Tuple[List[torch.Tensor], dict]:
    """Read our state adapter; checks the metadata against the tensors. Returns (states, metadata)."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise StateMismatchError(f"{path}: not a readable safetensors state file ({type(e).__name__}: {e})") from e
    arch = meta.get("architecture")
    if arch is not None:
        version = versions.by_name(arch)
        if version is None or not version.state_tuning:
            wired = ", ".join(repr(v.name) for v in versions.VERSIONS if v.state_tuning)
            raise StateMismatchError(f"{path}: architecture differs: the file says {arch!r}; states are read for "
                                     f"{wired}")
    states = states_from_dict(sd, str(path))  # stored in the version's state_layout (the parameter's)
    sizes = sizes_of_states(states, arch)
    for key, name in (("layers", "num_hidden_layers"), ("heads", "num_heads"), ("head_size", "head_size")):
        if key in meta and int(meta[key]) != sizes[name]:
            raise StateMismatchError(f"{path}: {key} differ: metadata says {meta[key]}, tensors give {sizes[name]}")
    return states, meta


def export_state_pth(model_or_states, path: os.PathLike, architecture: Optional[str] = None) -> None:
    """Write the runtime state file of the states' version: ``{'blocks.N.att.time_state': [H, N, N] fp32}`` as a
    ``.pth`` (WKV states only, even from a full state: RWKV-Runner counts the file's keys as layers) (the keys and layout RWKV runtimes load: ``Version.state_file_key`` / ``state_file_layout``).
    Accepts a model (plain or PeftModel), a list of states (``architecture`` names their version; RWKV-7 when
    None), or a state file/folder (its recorded version)."""
    from ..convert import save_pth
    if isinstance(model_or_states, nn.Module):
        states, architecture = get_states(model_or_states), versions.of(unwrap(model_or_states)).name
    elif isinstance(model_or_states, (str, os.PathLike)):
        states, meta = load_state_any(model_or_states)
        architecture = architecture or meta.get("architecture")
    else:
        states = list(model_or_states)
    check_states(states, sizes_of_states(states), where=str(path))
    save_pth(states_to_dict(states, versions.by_name(architecture) or versions.DEFAULT), path)


def official_state(path: os.PathLike, architecture: Optional[str] = None) -> List[torch.Tensor]:
    """The official ``rwkv`` package's state list (``RWKV.forward(tokens, state)``) that starts a sequence from a
    state file or adapter (v5, v6, v7; a full state or WKV only): per layer ``[att_x [C], wkv, ffn_x [C]]``, the WKV
    state in the package's layout (``Version.runtime_state_layout``), the shift states zeros when the file has
    none. ``architecture``: the file's version (a runtime ``.pth`` records none; RWKV-7 when None)."""
    version = versions.by_name(architecture) or versions.DEFAULT
    states, _ = load_state_any(path, version.name)
    shifts = load_shift_states(path)
    out = []
    for i, s in enumerate(states):
        C = s.shape[0] * s.shape[-1]
        att_x, ffn_x = shifts[i] if shifts is not None else (torch.zeros(C), torch.zeros(C))
        wkv = version.file_to_runtime_state(version.state_to_file(s)).float().contiguous()
        out += [att_x.float().clone(), wkv, ffn_x.float().clone()]
    return out


def load_state_pth(path: os.PathLike, architecture: Optional[str] = None) -> List[torch.Tensor]:
    """Read a runtime state ``.pth`` (only its ``blocks.N.att.time_state`` keys; a whole checkpoint works too),
    as states in the layout of version ``architecture`` (RWKV-7 when None; the file records no version)."""
    from ..convert import load_pth
    sd = load_pth(path)
    return states_from_dict({k: v for k, v in sd.items() if k.endswith("att.time_state")}, str(path),
                            versions.by_name(architecture))


def load_state_any(path: os.PathLike, architecture: Optional[str] = None) -> Tuple[List[torch.Tensor], dict]:
    """A runtime ``.pth``, our ``.safetensors`` state adapter, or an adapter folder holding one; returns (states
    in their version's ``state_layout``, metadata with ``architecture``: the recorded version or None).
    ``architecture``: the version a runtime ``.pth`` (which records none) is read as (its layouts)."""
    path = Path(path)
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {STATE_FILE} in this folder (the adapter holds no state)")
        return read_state_file(path / STATE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such state file")
    if path.suffix == ".safetensors":
        return read_state_file(path)
    states = load_state_pth(path, architecture)  # a runtime file records no version: only sizes can be checked
    version = versions.by_name(architecture) or versions.DEFAULT
    return states, {"architecture": None, "layout": version.state_layout}


def combine_states(states_list: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> List[torch.Tensor]:
    """Weighted sum ``S = sum_i w_i * S_i`` per layer (weights are used as given, not renormalised).

    Within one layer the WKV readout is linear in the initial state (``S_t = S_0 P_t + token terms``, with
    ``P_t`` the product of the transitions), so at each layer's WKV output the weighted sum of states gives the
    weighted sum of their effects; the group norm and later layers are nonlinear, so for the whole model it
    is an approximation, as weight-space merging of LoRA adapters is. Weights summing to 1 keep the state's
    scale; other sums scale the learned effect up or down.
    """
    if len(states_list) != len(weights):
        raise ValueError(f"{len(states_list)} states but {len(weights)} weights")
    first = sizes_of_states(states_list[0])  # (versions are checked where the states are read)
    for i, st in enumerate(states_list[1:], 1):
        check_states(st, first, where=f"state #{i}")
    return [sum(float(w) * st[layer].float() for st, w in zip(states_list, weights))
            for layer in range(len(states_list[0]))]
