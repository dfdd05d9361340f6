"""JSON as weightslab writes it: one byte-exact rendering, and the key that tags what JSON cannot hold.

Experiment hashes (:mod:`weightslab.fingerprint`), the self-digests of manifests and records
(:mod:`weightslab.storage.manifest`) and the comparison of ranks' states (:mod:`weightslab.distributed.ranks`) all hash
JSON; they must agree on its bytes. Values plain JSON cannot hold exactly (a tuple, a NaN, a tensor)
are written by the codec (:mod:`weightslab.codec`) as objects tagged with :data:`TAG`; readers that
must not import torch (the catalog, the manifest's metrics) recognise them by it. A module of its
own, below all of them, so that none of them imports another layer to get it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json", "TAG"]

#: The key of a tagged object: ``{"__wl__": "float", "value": "nan"}``, ``{"__wl__": "tensor", "key": ...}``.
TAG = "__wl__"


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 characters as they are; NaN and infinities are refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
