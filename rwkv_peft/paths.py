"""Model paths as users write them, read and recorded the same way by recipes, adapters and every command.

A *path spec* is what a recipe's ``model.path`` accepts, and what every command's model argument accepts:

- ``assets:NAME``: files that ship inside the package (``rwkv_peft/assets/NAME``), e.g. ``assets:quickstart/model``;
- ``~/...``: under the home folder;
- anything else: a file or folder (a BlinkDL ``.pth``, one of our Hugging Face folders, an fla folder), relative
  to the current directory.

Recording (:func:`portable_path`, used for the base path an adapter's manifest stores): a path inside the package
assets is kept as its ``assets:`` spec, one inside the current directory becomes relative to it (the recipe's own
convention, so a recipe's ``models/x.pth`` is recorded as ``models/x.pth``), one under the home folder becomes
``~/...``; only a path outside all three stays absolute. So an adapter folder that gets published does not carry
the local folder layout or the user's name.

Resolving a recorded base (:func:`adapter_base`): ``assets:``, ``~`` and absolute specs as they are; a relative one
against the current directory first, then against the folders that hold the adapter, nearest first (the adapter
folder, its parent, ...). An adapter at ``<project>/outputs/<run>/adapter`` trained with ``models/x.pth`` thus
finds ``<project>/models/x.pth`` from any working directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Tuple, Union

from .errors import RWKVPeftError
from .recipe import ASSETS_DIR, ASSETS_PREFIX, resolve_path

__all__ = ["resolve_path", "portable_path", "adapter_base", "BaseNotFoundError", "ASSETS_PREFIX"]

PathLike = Union[str, os.PathLike]


class BaseNotFoundError(RWKVPeftError, FileNotFoundError):
    """An adapter whose base model cannot be found (none recorded, or the recorded one is not here)."""


def _relative_to(path: Path, root: Path) -> Optional[Path]:
    try:
        return path.relative_to(root)
    except ValueError:
        return None


def portable_path(path: PathLike) -> str:
    """``path`` as a spec that holds no local folder layout where that can be helped (see the module doc).

    Specs that already are portable (``assets:...``, ``~/...``, relative paths) are returned as they are.
    """
    text = os.fspath(path)
    if text.startswith(ASSETS_PREFIX) or text.startswith("~") or not os.path.isabs(text):
        return Path(text).as_posix() if not text.startswith(ASSETS_PREFIX) else text
    p = Path(text)
    try:
        p = p.resolve()
    except OSError:
        pass
    for root, render in ((ASSETS_DIR, lambda r: ASSETS_PREFIX + r.as_posix()),
                         (Path.cwd(), lambda r: r.as_posix() if r.parts else "."),
                         (Path.home(), lambda r: "~/" + r.as_posix() if r.parts else "~")):
        try:
            root = root.resolve()
        except OSError:
            continue
        if root == Path(root.anchor):  # a home or working directory at "/" would make everything "relative"
            continue
        rel = _relative_to(p, root)
        if rel is not None:
            return render(rel)
    return str(p)


def adapter_base(adapter_dir: PathLike) -> Tuple[str, Path]:
    """(the spec an adapter folder records as its base, that base as a path here).

    Raises :class:`BaseNotFoundError` naming the manifest and the spec when none is recorded or it is not found.
    """
    from .methods.adapter_io import MANIFEST, read_manifest

    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir) if adapter_dir.is_dir() else None
    if manifest is None:
        raise BaseNotFoundError(f"{adapter_dir}: no {MANIFEST} here, so the base model is unknown")
    spec = (manifest.get("base") or {}).get("path")
    if not spec:
        raise BaseNotFoundError(f"{adapter_dir}/{MANIFEST}: records no base model path")
    spec = str(spec)
    direct = resolve_path(spec)
    if direct.exists():
        return spec, direct
    if not (spec.startswith(ASSETS_PREFIX) or spec.startswith("~") or os.path.isabs(spec)):
        try:
            here = adapter_dir.resolve()
        except OSError:
            here = adapter_dir.absolute()
        for folder in (here, *here.parents):
            candidate = folder / spec
            if candidate.exists():
                return spec, candidate
    raise BaseNotFoundError(f"{adapter_dir}/{MANIFEST}: the base model it was trained on, {spec!r}, is not here "
                            f"(looked in the current directory and the folders holding the adapter)")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: a Hub repository id


class HubError(RWKVPeftError):
    """A Hub repository that cannot be had: not on the Hub, or not in the cache while offline."""


def local_or_hub(spec: PathLike) -> Path:
    """``spec`` as a local path when it exists; else, when it reads as a Hub repository id (``owner/name``, no
    file suffix), the repository's folder in the Hugging Face cache (``huggingface_hub.snapshot_download``:
    downloaded once, read from the cache afterwards; offline, ``HF_HUB_OFFLINE=1``, only the cache is read)."""
    text = os.fspath(spec)
    path = resolve_path(text)
    if path.exists() or not HUB_ID.fullmatch(text) or Path(text).suffix:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(text))
    except RepositoryNotFoundError:
        raise HubError(f"{text!r}: no such file or folder here, and no such repository on the Hub (or it is "
                       f"private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{text!r}: no such file or folder here, and not in the Hugging Face cache while the Hub "
                       f"cannot be reached (HF_HUB_OFFLINE=1 or no network): download it once online, or pass a "
                       f"local folder") from None

