"""Stamps for cached benchmark inputs: rebuilt when the code that wrote them changes."""
from __future__ import annotations

import hashlib
import importlib


def source_stamp(*modules: str) -> str:
    """SHA-1 (12 hex digits) of catalogpred's version and the source files of ``modules`` (dotted names):
    inputs cached under an older stamp were written by other code and are rebuilt."""
    import catalogpred

    h = hashlib.sha1(catalogpred.__version__.encode())
    for name in modules:
        with open(importlib.import_module(name).__file__, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]
