"""Finding and reading datasets: local files, folders, ``save_to_disk`` folders, binidx corpora, hub names.

``load_source(spec)`` returns a ``datasets.Dataset`` of raw rows (or a :class:`BinIdxRows` for a binidx
corpus). ``build_datasets(data_cfg, tokenizer)`` goes all the way to the train and eval rows the loop uses.

Local files: ``.jsonl``/``.json``, ``.parquet``, ``.csv``/``.tsv``, ``.txt``/``.md`` (one row per line), ``.arrow``.
A folder is read as a ``save_to_disk`` folder when it is one, else every supported file in it (one kind).
Anything that is not a local path and looks like ``owner/name`` is taken as a hub dataset name; offline
(``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) or unreachable, it fails with an error that says so.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from . import DataError
from .binidx import BinIdx, BinIdxRows, binidx_prefix, is_binidx

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
            ".txt": "text", ".md": "text", ".text": "text", ".arrow": "arrow"}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_name(spec: str) -> bool:
    if spec.startswith(("assets:", ".", "/", "~")) or Path(spec).suffix.lower() in BUILDERS:
        return False
    return bool(HUB_NAME.match(spec))


def _offline() -> bool:
    truthy = ("1", "true", "yes", "on")
    return any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _is_saved_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _files_in(folder: Path) -> List[Path]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no data files in this folder (looked for {', '.join(sorted(BUILDERS))})")
    return files


def _pick_split(dd, split: str, where: str):
    from datasets import DatasetDict
    if not isinstance(dd, DatasetDict):
        return dd
    if split not in dd:
        raise DataError(f"{where}: no split '{split}' (it has {', '.join(dd)}); set data.split")
    return dd[split]


def _json_rows_fallback(files: Sequence[Path], on_bad_row: str, log):
    """Read JSON/JSONL files line by line when arrow cannot (a bad line, or rows of different shapes).

    Each row is kept as its JSON text (``_json``) with its line number (``_line``); the formats parse it, so a
    bad row is reported with its line and handled by ``on_bad_row``.
    """
    from datasets import Dataset
    texts, lines = [], []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix.lower() == ".json" and raw.lstrip().startswith("["):
            try:
                rows = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{e.lineno}: invalid JSON ({e.msg}); the whole file is one JSON list, so it "
                                f"cannot be read row by row - fix it, or write it as JSON lines") from None
            for i, r in enumerate(rows):
                texts.append(json.dumps(r, ensure_ascii=False))
                lines.append(i + 1)
            continue
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                texts.append(line)
                lines.append(n)
    if not texts:
        raise DataError(f"{', '.join(map(str, files))}: no rows")
    return Dataset.from_dict({"_json": texts, "_line": lines})


def _load_files(files: List[Path], split: str, cache_dir: Optional[str], on_bad_row: str, log):
    from datasets import load_dataset
    kinds = {BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"mixed kinds of data files ({', '.join(str(f) for f in files[:4])}...): use one kind")
    kind = kinds.pop()
    kwargs = {}
    if kind == "csv" and all(f.suffix.lower() == ".tsv" for f in files):
        kwargs["sep"] = "\t"
    try:
        return load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # noqa: BLE001 - turned into a DataError that names the file
        if kind == "json":
            return _json_rows_fallback(files, on_bad_row, log)
        msg = str(e).strip().splitlines()
        raise DataError(f"{', '.join(map(str, files))}: cannot read as {kind} ({type(e).__name__}: "
                        f"{msg[-1] if msg else ''})") from None


def load_source(spec: Union[str, Sequence[str]], split: str = "train", cache_dir: Optional[str] = None,
                on_bad_row: str = "fail", log=print):
    """Raw rows of ``spec``: a file, a list of files, a folder, a saved dataset, a binidx prefix or a hub name.

    Returns a ``datasets.Dataset`` (a :class:`BinIdx` for a binidx corpus).
    """
    from ..recipe import resolve_path
    if not isinstance(spec, str):
        specs = list(spec)
        if not specs:
            raise DataError("an empty list of data files")
        if len(specs) == 1:
            return load_source(specs[0], split, cache_dir, on_bad_row, log)
        paths = [resolve_path(s) for s in specs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: no such file")
        bad = [str(p) for p in paths if p.suffix.lower() not in BUILDERS]
        if bad:
            raise DataError(f"{bad[0]}: unsupported file type (supported: {', '.join(sorted(BUILDERS))})")
        return _load_files(paths, split, cache_dir, on_bad_row, log)
    path = resolve_path(spec)
    if path.suffix in (".bin", ".idx") or (not path.exists() and is_binidx(path)):
        if not is_binidx(path):
            raise DataError(f"{spec}: a binidx corpus needs both {binidx_prefix(path)}.idx and .bin")
        return BinIdx(path)
    if path.is_dir():
        if _is_saved_folder(path):
            from datasets import load_from_disk
            try:
                return _pick_split(load_from_disk(str(path)), split, str(path))
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: cannot read the saved dataset ({type(e).__name__}: {e})") from None
        return _load_files(_files_in(path), split, cache_dir, on_bad_row, log)
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (supported: "
                            f"{', '.join(sorted(BUILDERS))}, a save_to_disk folder, or a binidx prefix)")
        return _load_files([path], split, cache_dir, on_bad_row, log)
    if not looks_like_hub_name(spec):
        raise DataError(f"{spec}: no such file or folder")
    if _offline():
        raise DataError(f"{spec}: not a local file or folder, so it was taken as a hub dataset name, but the hub is "
                        f"off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set). Download it once with network "
                        f"access, or save it with save_to_disk and point data.train at that folder")
    from datasets import load_dataset
    try:
        return load_dataset(spec, split=split, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{spec}: not a local file or folder, and loading it as a hub dataset failed "
                        f"({type(e).__name__}: {first}). Check the name and the network, or use local files") from None


def _split(ds, eval_split: float, seed: int):
    n = len(ds)
    k = int(eval_split) if eval_split >= 1 else int(round(n * eval_split))
    k = max(1, min(k, n - 1))
    import torch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    ev, tr = sorted(perm[:k]), sorted(perm[k:])
    if hasattr(ds, "select"):
        return ds.select(tr), ds.select(ev)
    return Rows(ds, tr), Rows(ds, ev)


class Rows:
    """A view of some rows of a sequence (for sources that are not ``datasets.Dataset``)."""

    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def _prepare(raw, cfg, tokenizer, source: str, log):
    from .formats import tokenize_dataset
    from .packing import pack_dataset
    if isinstance(raw, BinIdx):
        if cfg.format != "text":
            raise DataError(f"{source}: a binidx corpus is pre-tokenized text; set data.format: text")
        return BinIdxRows(raw, cfg.max_length)
    ds = tokenize_dataset(raw, cfg, tokenizer, source=source, log=log)
    if cfg.pack:
        ds = pack_dataset(ds, cfg.max_length, pack_state=cfg.pack_state)
    return ds


def build_datasets(cfg, tokenizer, seed: int = 42, log=print) -> Tuple[object, Optional[object]]:
    """``(train_rows, eval_rows or None)`` for the recipe's data section ``cfg``.

    Each is indexable (``rows[i] -> {"input_ids": [...], "labels": [...]}``) with ``len``.
    """
    def name(spec):
        return spec if isinstance(spec, str) else f"{spec[0]} (+{len(spec) - 1} more)"

    raw = load_source(cfg.train, cfg.split, cfg.cache_dir, cfg.on_bad_row, log)
    raw_eval = load_source(cfg.eval, cfg.split, cfg.cache_dir, cfg.on_bad_row, log) if cfg.eval else None
    if raw_eval is None and cfg.eval_split:
        if len(raw) < 2:
            raise DataError(f"{name(cfg.train)}: {len(raw)} row(s) cannot be split for eval_split")
        if isinstance(raw, BinIdx):
            train = _prepare(raw, cfg, tokenizer, name(cfg.train), log)
            return _split(train, cfg.eval_split, seed)
        raw, raw_eval = _split(raw, cfg.eval_split, seed)
    train = _prepare(raw, cfg, tokenizer, name(cfg.train), log)
    ev = _prepare(raw_eval, cfg, tokenizer, name(cfg.eval) if cfg.eval else "eval split", log) \
        if raw_eval is not None else None
    return train, ev
