"""Datasets for training: loading (files, saved folders, hub names, binidx), formats and chat templates,
tokenization with loss masks, packing and long-context chunking.

The usual entry point is :func:`build_datasets`, which turns the ``data`` section of a recipe and a tokenizer
into ``(train, eval)`` sequences of rows ``{"input_ids": [...], "labels": [...]}`` (``labels`` is ``-100``
where no loss is taken; the model predicts ``labels[t + 1]`` from position ``t``).
"""

from ..errors import RWKVPeftError


class DataError(RWKVPeftError, ValueError):
    """A dataset that cannot be used as the recipe says: the message names the file, row and field."""


from .binidx import BinIdx, BinIdxRows  # noqa: E402
from .formats import render_segments, tokenize_dataset, tokenize_row  # noqa: E402
from .loading import build_datasets, load_source, looks_like_hub_name  # noqa: E402
from .packing import IGNORE, chunk_spans, collate, pack_dataset, shifted_targets  # noqa: E402

__all__ = ["DataError", "BinIdx", "BinIdxRows", "render_segments", "tokenize_row", "tokenize_dataset",
           "build_datasets", "load_source", "looks_like_hub_name", "IGNORE", "chunk_spans", "collate",
           "pack_dataset", "shifted_targets"]
