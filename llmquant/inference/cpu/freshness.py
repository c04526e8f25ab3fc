"""Whether something converted from a module's tensors (a packed kernel, a float16 copy) still
matches those tensors.

An address and a version number alone can be fooled: a tensor freed and a new one allocated in its
place (a load_state_dict with assign, a move away and back) has the old one's data_ptr, and a fresh
tensor's version is 0 like the old one's may have been; and tensors made under
torch.inference_mode() have no version counter at all (reading it raises). So a stamp holds each
source tensor's identity (a weak reference: it keeps no memory alive and a new object is never taken
for the old one), its data_ptr (an assignment to `.data` keeps the object and swaps the memory,
without a version bump) and its version where it has one (writes in place). What no stamp can see,
writes in place into inference tensors, is covered where it happens in llmquant: load_state_dict
drops the conversion explicitly (selection.py registers the hook).
"""
from __future__ import annotations

import weakref

import torch


def version_of(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


class Stamp:
    """The identity, address and version of some tensors, to tell later whether they are the same."""

    __slots__ = ("_refs", "_marks")

    def __init__(self, tensors):
        self._refs = tuple(weakref.ref(t) for t in tensors)
        self._marks = tuple((t.data_ptr(), version_of(t)) for t in tensors)

    def __reduce__(self):
        # Weak references neither pickle nor deep-copy: a copy of a model (torch.save, deepcopy) is
        # converted again from its own tensors at its first CPU call.
        return (_stale, ())

    def matches(self, tensors) -> bool:
        if self._refs is None or len(tensors) != len(self._refs):
            return False
        for ref, (pointer, version), tensor in zip(self._refs, self._marks, tensors):
            # The same object keeps its inference-ness: a None version means it has no counter.
            if ref() is not tensor or tensor.data_ptr() != pointer \
                    or (version is not None and tensor._version != version):
                return False
        return True


def _stale() -> Stamp:
    stamp = Stamp(())
    stamp._refs = None
    return stamp
