"""FBGEMM's packed weights behind integer handles.

A packed weight is a TorchScript object, which torch.compile cannot trace: a compiled graph passes its
handle to a custom op (fbgemm_int8.py, fbgemm_half.py), which looks the weight up here. The entry goes
when its owner does.
"""
from __future__ import annotations

import itertools
import weakref

_PACKED: dict[int, object] = {}
_handles = itertools.count()


def register(owner, packed) -> int:
    """A handle to `packed`, valid while `owner` lives."""
    handle = next(_handles)
    _PACKED[handle] = packed
    weakref.finalize(owner, _PACKED.pop, handle, None)
    return handle


def packed_weight(handle: int):
    return _PACKED[handle]
