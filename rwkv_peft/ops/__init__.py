"""Functional ops: each fast path beside its plain reference (see ``wkv7.py``)."""
from .wkv7 import select_backend, wkv7, wkv7_chunked, wkv7_recurrent

__all__ = ["wkv7", "wkv7_chunked", "wkv7_recurrent", "select_backend"]
