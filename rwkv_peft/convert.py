"""Reading and writing RWKV checkpoints as files: BlinkDL ``.pth``, our Hugging Face folders, fla folders.

``convert(src, dst)`` is what ``rwkv-peft convert SRC DST`` runs. Every write goes to a temporary name in the
destination's folder and is renamed into place at the end, so a failed conversion never leaves a half-written
checkpoint where a good one was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from . import versions
from .models.rwkv7.configuration_rwkv7 import RWKV7Config
from .models.rwkv7.convert_rwkv7 import CheckpointError, detect_version, fla_to_hf

StateDict = Dict[str, torch.Tensor]
WEIGHTS_NAME = "model.safetensors"


# ---- atomic writes ------------------------------------------------------------------------------------------

@contextmanager
def atomic_path(dst: os.PathLike, is_dir: bool = False):
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on error it is removed.

    A file is written as ``<hidden temp folder>/<dst name>`` (torch.save stores the file's name inside the
    archive, so this keeps the bytes those of a direct save), then renamed over ``dst``.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    tmp = tmp_dir if is_dir else tmp_dir / dst.name
    try:
        yield tmp
        if is_dir and dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_pth(sd: StateDict, path: os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)


# ---- reading ------------------------------------------------------------------------------------------------

def load_pth(path: os.PathLike) -> StateDict:
    """Load a BlinkDL ``.pth`` safely (``weights_only=True``) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, pickled code, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"
                              .split("\n")[0]) from e
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: key '{bad}' holds a {type(sd[bad]).__name__}, not a tensor")
    return sd


def load_folder_state_dict(folder: os.PathLike) -> StateDict:
    """All tensors of a HF folder: ``model.safetensors``, a sharded index, or ``pytorch_model.bin``."""
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    index = folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(load_file(str(folder / shard)))
            return sd
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot read the safetensors weights ({type(e).__name__}: {e})") from e
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return load_pth(bin_file)
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}, sharded index or pytorch_model.bin found")


def read_folder_config(folder: os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def load_any(src: os.PathLike) -> Tuple[RWKV7Config, StateDict, str]:
    """Read ``src`` (a ``.pth``, one of our folders, or an fla folder) as (config, our state dict, kind)."""
    src = Path(src)
    if src.is_dir():
        raw = read_folder_config(src)
        sd = load_folder_state_dict(src)
        version = versions.by_model_type(raw.get("model_type"))
        if version is not None:
            config = version.config_class.from_dict({k: v for k, v in raw.items()
                                                     if k not in ("architectures", "auto_map")})
            return config, sd, "hf"
        from .models.rwkv7.convert_rwkv7 import is_fla_state_dict
        if is_fla_state_dict(sd):
            config, hf = fla_to_hf(sd, raw, where=str(src))
            return config, hf, "fla"
        ours = ", ".join(repr(v.model_type) for v in versions.VERSIONS)
        raise CheckpointError(f"{src}/config.json: model_type {raw.get('model_type')!r} is not an RWKV "
                              f"checkpoint this package reads ({ours}, or fla's 'rwkv7')")
    sd = load_pth(src)
    try:
        version = detect_version(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    shifts = {k: sd.pop(k) for k in [k for k in sd if _SHIFT_KEY.fullmatch(k)]}  # full-state tuning, any version
    config, hf = versions.by_blinkdl(version, where=str(src)).blinkdl_to_hf(sd, where=str(src))
    if shifts:
        config.use_initial_shift = True
        hf.update({"model." + k: v.reshape(-1).contiguous() for k, v in shifts.items()})
    return config, hf, "pth"


# ---- writing ------------------------------------------------------------------------------------------------

def causal_lm_class(config):
    """The ``...ForCausalLM`` class of a config ``load_any`` returned."""
    return versions.of(config).causal_lm_class


_SHIFT_KEY = re.compile(r"blocks\.\d+\.(att|ffn)\.shift_state")


def to_blinkdl(sd: StateDict, config) -> StateDict:
    """Our state dict -> BlinkDL keys, for any version. Learned initial shift states (full-state tuning, merged)
    keep their names (``blocks.N.att.shift_state``, ``blocks.N.ffn.shift_state``, ``[C]``) after the rest."""
    shifts = {k[len("model."):]: v for k, v in sd.items() if _SHIFT_KEY.fullmatch(k[len("model."):])}
    out = versions.of(config).hf_to_blinkdl({k: v for k, v in sd.items() if k[len("model."):] not in shifts},
                                            config)
    return {**out, **shifts}


def save_hf_folder(config: RWKV7Config, sd: StateDict, dst: os.PathLike, tokenizer: Optional[bool] = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (tensors byte for byte) (+ the World tokenizer)."""
    dtypes = {t.dtype for t in sd.values()}
    config.dtype = str(next(iter(dtypes))).replace("torch.", "") if len(dtypes) == 1 else "float32"
    config.architectures = [causal_lm_class(config).__name__]
    with atomic_path(dst, is_dir=True) as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer if tokenizer is not None else config.vocab_size == 65536:
            _save_world_tokenizer(tmp)


def _save_world_tokenizer(folder: Path) -> None:
    from .tokenization import RWKVWorldTokenizer
    RWKVWorldTokenizer().save_pretrained(folder)


def save_model_pth(model, path: os.PathLike) -> None:
    """Write a loaded ``RWKV7ForCausalLM`` as a BlinkDL ``.pth`` (the official package loads it)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_pth(to_blinkdl(sd, model.config), path)


def convert(src: os.PathLike, dst: os.PathLike, dtype: Optional[str] = None) -> str:
    """``.pth`` -> HF folder, HF/fla folder -> ``.pth`` (when ``dst`` ends in ``.pth``) or -> our HF folder."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the destination is the source")
    config, sd, kind = load_any(src)
    if dtype is not None:
        target = getattr(torch, dtype, None)
        if not isinstance(target, torch.dtype):
            raise CheckpointError(f"--dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        sd = {k: v.to(target) for k, v in sd.items()}
    if dst.suffix == ".pth":
        save_pth(to_blinkdl(sd, config), dst)
        return f"{src} ({kind}) -> {dst} (BlinkDL .pth): {config.describe()}"
    save_hf_folder(config, sd, dst)
    return f"{src} ({kind}) -> {dst} (Hugging Face folder): {config.describe()}"
