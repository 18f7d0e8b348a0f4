"""State files for inference runtimes: RWKV-Runner's ``.pth`` and Ai00's ``.state``, for RWKV-7, -6 and -5.2.

A learned initial state (state tuning) is one WKV matrix ``[H, N, N]`` per layer. Each runtime reads it from a
file of its own; what differs between them (container, key, axis order, dtype, token shifts) is recorded once per
version in the registry (``rwkv_peft.versions.Version.runtime_state_files``, entries
:data:`rwkv_peft.versions.RUNNER_STATE` and :data:`rwkv_peft.versions.AI00_STATE`), and this module only applies
it:

- **RWKV-Runner** (``runner``, ``.pth``): ``torch.save`` of ``{'blocks.N.att.time_state': [H, N, N] fp32}`` in
  ``S[h, value, key]``; Runner uses the tensor as it is for RWKV-7 and transposes it for RWKV-5/6 into the
  official package's state list. Same file as ``rwkv-peft export ADAPTER state.pth``.
- **Ai00** (``ai00``, ``.state``): a safetensors file with the same keys, ``S[h, key, value]`` (transposed) in
  **float16** (web-rwkv's ``load_matrix_f16`` refuses any other dtype), metadata ``{"format": "pt"}`` as Ai00's
  own converter writes it.

Neither runtime reads token-shift vectors from its file (both start them from zeros); a source holding more than
the WKV states (full-state tuning's ``blocks.N.att.shift_state`` / ``blocks.N.ffn.shift_state``) is exported
with a note saying what the runtime leaves out. RWKV-Runner counts a ``.pth``'s keys as layers, so a runtime
``.pth`` that carries shift states too is refused by it ("state shape mismatch"): ``--format runner`` writes the
WKV states only.

Public functions: :func:`export_runtime_state` (what ``rwkv-peft export --format`` runs),
:func:`write_runtime_state`, :func:`read_runtime_state`, :func:`load_any` (any state source, ``.state`` included)
and :func:`format_for_output`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import versions
from .errors import RWKVPeftError
from .tuners.state_tuning import (
    STATE_FILE, check_states, get_states, load_state_any, sizes_of_states, unwrap,
)

FORMATS: Dict[str, versions.RuntimeStateFile] = {f.name: f for f in versions.RUNTIME_STATE_FILES}
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_FP16_MAX = 65504.0

PathLike = Union[str, os.PathLike]


class RuntimeStateError(RWKVPeftError, ValueError):
    """A runtime state file that cannot be written or read as asked; the message names the file, key or value."""


def _key_re(fmt: versions.RuntimeStateFile) -> "re.Pattern[str]":
    return re.compile(re.escape(fmt.key).replace(r"\{layer\}", r"(\d+)"))


def format_names() -> List[str]:
    """The names ``--format`` takes: ``['runner', 'ai00']``."""
    return list(FORMATS)


def format_for_suffix(path: PathLike) -> Optional[versions.RuntimeStateFile]:
    """The runtime format whose files end like ``path`` (``.pth`` -> runner, ``.state`` -> ai00), else None."""
    suffix = Path(path).suffix.lower()
    return next((f for f in FORMATS.values() if f.suffix == suffix), None)


def format_for_output(out: PathLike, name: Optional[str] = None, arg: str = "OUT") -> versions.RuntimeStateFile:
    """The format to write ``out`` in: ``name`` when given (and ``out`` must end in its suffix), else the one its
    suffix names. :class:`RuntimeStateError` naming the file and the suffixes otherwise."""
    out_text = os.fspath(out)
    suffix = "" if out_text.endswith(("/", os.sep)) else Path(out_text).suffix.lower()
    listed = ", ".join(f"{f.suffix} ({f.runtime}, --format {f.name})" for f in FORMATS.values())
    if name is None:
        fmt = format_for_suffix(out_text) if suffix else None
        if fmt is None:
            raise RuntimeStateError(f"{arg} {out_text!r}: not a runtime state file name; runtime state files end in "
                                    f"{listed}")
        return fmt
    fmt = FORMATS.get(name)
    if fmt is None:
        raise RuntimeStateError(f"--format {name!r}: expected one of {', '.join(FORMATS)}")
    if suffix != fmt.suffix:
        what = f"a {suffix} file" if suffix else "a folder"
        raise RuntimeStateError(f"{arg} {out_text!r}: {fmt.runtime} reads its state from a {fmt.suffix} file, not "
                                f"{what}; name the output NAME{fmt.suffix}")
    return fmt


def version_and_format(architecture: Optional[str], name: str, where: str = "state"
                       ) -> Tuple[versions.Version, versions.RuntimeStateFile]:
    """The registry entries to write runtime format ``name`` for states of ``architecture`` ("rwkv6"). A state
    that records no version (a runtime ``.pth``) is accepted while every version with that format lays it out
    the same way (and keeps its own states the same way); else :class:`RuntimeStateError`."""
    if architecture is not None:
        version = versions.by_name(architecture)
        if version is None or not version.runtime_state_files:
            have = ", ".join(v.name for v in versions.VERSIONS if v.runtime_state_files)
            raise RuntimeStateError(f"{where}: version {architecture!r} has no runtime state files (those that do: "
                                    f"{have})")
        try:
            return version, version.runtime_state_file(name)
        except ValueError as e:
            raise RuntimeStateError(f"{where}: {e}") from None
    candidates = [v for v in versions.VERSIONS if any(f.name == name for f in v.runtime_state_files)]
    if not candidates:
        raise RuntimeStateError(f"{where}: no version has a runtime state file format {name!r}")
    shapes = {(v.state_layout, v.runtime_state_file(name)) for v in candidates}
    if len(shapes) != 1:
        raise RuntimeStateError(
            f"{where}: records no RWKV version, and the {candidates[0].runtime_state_file(name).runtime} file "
            f"differs between {', '.join(v.title for v in candidates)}; export from the adapter folder or a "
            f".safetensors state adapter (they record the version)")
    return candidates[0], candidates[0].runtime_state_file(name)


# ---- writing -----------------------------------------------------------------------------------------------------

def _states_and_version(model_or_states, architecture: Optional[str]):
    if isinstance(model_or_states, nn.Module):
        return get_states(model_or_states), versions.of(unwrap(model_or_states)).name
    if isinstance(model_or_states, (str, os.PathLike)):
        states, meta = load_any(model_or_states, architecture)
        return states, meta.get("architecture") or architecture
    return [torch.as_tensor(s) for s in model_or_states], architecture


def runtime_tensors(states: Sequence[torch.Tensor], fmt: versions.RuntimeStateFile, version: versions.Version,
                    where: str = "state") -> Dict[str, torch.Tensor]:
    """``{key: tensor}`` of runtime file ``fmt`` from ``states`` in ``version``'s ``state_layout``: relaid out and
    cast to the file's dtype. A value the dtype cannot hold (beyond +-65504 in float16) is an error naming the
    layer and the value."""
    dtype = _DTYPES[fmt.dtype]
    out = {}
    for i, s in enumerate(states):
        s = s.detach().float().cpu()
        if not torch.isfinite(s).all():
            raise RuntimeStateError(f"{where}: layer {i} state holds a NaN or an infinity")
        if dtype == torch.float16 and s.abs().max() > _FP16_MAX:
            raise RuntimeStateError(f"{where}: layer {i} state holds {float(s.abs().max()):.6g}, beyond float16's "
                                    f"{_FP16_MAX:g}: a {fmt.runtime} state file is float16 and cannot hold it")
        out[fmt.key.format(layer=i)] = version.state_to_runtime_file(s, fmt).to(dtype).contiguous()
    return out


def write_runtime_state(model_or_states, path: PathLike, fmt: Union[str, versions.RuntimeStateFile],
                        architecture: Optional[str] = None) -> Tuple[versions.Version, versions.RuntimeStateFile]:
    """Write the state file runtime ``fmt`` ("runner", "ai00") loads, atomically (a temporary file, then rename).

    ``model_or_states``: a model (plain or PeftModel), a list of ``[H, N, N]`` states in their version's
    ``state_layout`` (``architecture`` names the version), or a state source (adapter folder, ``.safetensors``,
    runtime ``.pth`` / ``.state``). Returns the (version, format) registry entries used."""
    from .convert import atomic_path
    path = Path(path)
    name = fmt if isinstance(fmt, str) else fmt.name
    states, arch = _states_and_version(model_or_states, architecture)
    if not states:
        raise RuntimeStateError(f"{path}: no states to write")
    check_states(states, sizes_of_states(states), where=str(path))
    version, fmt = version_and_format(arch, name, where=str(path))
    tensors = runtime_tensors(states, fmt, version, where=str(path))
    with atomic_path(path) as tmp:
        if fmt.container == "torch":
            torch.save(tensors, tmp)
        elif fmt.container == "safetensors":
            from safetensors.torch import save_file
            from . import __version__
            meta = dict(fmt.metadata)
            meta.update(rwkv_peft_version=__version__, layout=fmt.layout, dtype=fmt.dtype)
            if arch is not None:  # what a later read needs; the runtime ignores it. No paths, no user names.
                meta["architecture"] = version.name
            save_file(tensors, str(tmp), metadata=meta)
        else:  # a registry entry this module does not know how to write
            raise RuntimeStateError(f"{path}: container {fmt.container!r} of {fmt.runtime} is not written yet")
    return version, fmt


# ---- reading -----------------------------------------------------------------------------------------------------

def read_runtime_state(path: PathLike, fmt: Optional[Union[str, versions.RuntimeStateFile]] = None,
                       architecture: Optional[str] = None) -> Tuple[List[torch.Tensor], dict]:
    """Read a runtime state file back as states in their version's ``state_layout`` (fp32), with metadata
    ``{architecture, format, dtype, layout}``. ``fmt``: by suffix when None. ``architecture``: the version of a
    file that records none (a runtime ``.pth``, an Ai00 file from elsewhere)."""
    path = Path(path)
    if fmt is None:
        fmt = format_for_suffix(path)
        if fmt is None:
            raise RuntimeStateError(f"{path}: not a runtime state file name (expected "
                                    f"{' or '.join(f.suffix for f in FORMATS.values())})")
    elif isinstance(fmt, str):
        if fmt not in FORMATS:
            raise RuntimeStateError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
        fmt = FORMATS[fmt]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such state file")
    meta: dict = {}
    if fmt.container == "torch":
        from .convert import load_pth
        sd = load_pth(path)
    else:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise RuntimeStateError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"
                                    .split("\n")[0]) from e
    key_re = _key_re(fmt)
    found = {}
    for k, v in sd.items():
        m = key_re.fullmatch(k)
        if m:
            found[int(m.group(1))] = v
    if not found:
        raise RuntimeStateError(f"{path}: no '{fmt.key.format(layer='N')}' tensors (keys: "
                                f"{', '.join(sorted(sd)[:5]) or 'none'})")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise RuntimeStateError(f"{path}: no '{fmt.key.format(layer=missing[0])}' (found layers {sorted(found)})")
    arch = meta.get("architecture") or architecture
    version, fmt = version_and_format(arch, fmt.name, where=str(path))
    states = [version.state_from_runtime_file(found[i].float(), fmt) for i in range(len(found))]
    check_states(states, sizes_of_states(states), where=str(path))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in found.values()})
    return states, {"architecture": arch, "format": fmt.name, "dtype": ",".join(dtypes), "layout": fmt.layout}


def load_any(path: PathLike, architecture: Optional[str] = None) -> Tuple[List[torch.Tensor], dict]:
    """Any state source: an adapter folder, our ``.safetensors`` state adapter, a runtime ``.pth``
    (``state_tuning.load_state_any``) or an Ai00 ``.state``. Returns (states in their version's
    ``state_layout``, metadata with ``architecture``: the recorded version or None)."""
    fmt = format_for_suffix(path)
    if fmt is not None and fmt.container == "safetensors" and not Path(path).is_dir():
        return read_runtime_state(path, fmt, architecture)
    return load_state_any(path, architecture)


def _left_out(src: Path) -> List[str]:
    """Tensors a state source holds beside the WKV states (e.g. full-state tuning's learned token shifts,
    ``blocks.N.att.shift_state`` / ``blocks.N.ffn.shift_state``), which no runtime file here carries."""
    file = src / STATE_FILE if src.is_dir() else src
    if not file.is_file():
        return []
    wkv = re.compile(re.escape(versions.DEFAULT.state_file_key).replace(r"\{layer\}", r"\d+"))
    if file.suffix == ".pth":
        from .convert import load_pth
        keys = list(load_pth(file))
    elif file.suffix in (".safetensors", ".state"):
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    else:
        return []
    return sorted(k for k in keys if not wkv.fullmatch(k))


def export_runtime_state(src: PathLike, out: PathLike, fmt: Optional[str] = None,
                         architecture: Optional[str] = None) -> str:
    """State source ``src`` (adapter folder, ``.safetensors``, ``.pth``, ``.state``) -> the state file of runtime
    ``fmt`` ("runner", "ai00"; by ``out``'s suffix when None), written atomically and read back as a check.
    Returns a one-line description (plus a note when the source holds tensors the runtime file cannot carry)."""
    src, out = Path(src), Path(out)
    chosen = format_for_output(out, fmt)
    states, meta = load_any(src, architecture)
    arch = meta.get("architecture") or architecture
    version, chosen = write_runtime_state(states, out, chosen, architecture=arch)
    back, _ = read_runtime_state(out, chosen, architecture=arch)  # self-check of what we just wrote
    tol = 1e-3 if chosen.dtype == "float16" else 0.0
    for i, (a, b) in enumerate(zip(states, back)):
        if not torch.allclose(a.float(), b, rtol=tol, atol=tol * float(a.abs().max().clamp_min(1.0))):
            raise RuntimeStateError(f"{out}: layer {i} did not read back as written")
    sizes = sizes_of_states(states)
    desc = (f"{version.title + ', ' if arch else 'version not recorded, '}{sizes['num_hidden_layers']} layers x "
            f"[{sizes['num_heads']}, {sizes['head_size']}, {sizes['head_size']}]")
    msg = (f"{src} -> {out} ({chosen.runtime} state file: {chosen.key.format(layer='N')} {chosen.layout} "
           f"{chosen.dtype}, {desc})")
    extra = _left_out(src)
    if extra:
        shown_keys = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        msg += (f"; note: {chosen.runtime} reads only the WKV states: {shown_keys} are not in the file (the runtime "
                f"starts token shifts from zeros), so its answers can differ from rwkv-peft chat's")
        if chosen.container == "torch":  # a .pth with more keys than layers is refused by RWKV-Runner's check
            msg += " (a .pth that kept them would fail RWKV-Runner's check: it counts the file's keys as layers)"
    return msg
