"""A strict reader of one .safetensors file: the header is checked before any tensor is trusted,
and each tensor is read with plain file reads when asked for.

Plain reads, not a memory map, so a tensor costs its own bytes once: mapped pages of a large file
would count in the process's resident memory on top of the copy. Every malformed input (truncated
file, header that is not JSON, unknown dtype, shape and byte range that disagree, ranges that
overlap, leave gaps or run past the end) raises CheckpointError naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20  # the format's own limit


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    self._fail("is shorter than the 8-byte header length")
                header_len = int.from_bytes(prefix, "little")
                if header_len > MAX_HEADER or 8 + header_len > size:
                    self._fail(f"declares a header of {header_len} bytes, more than the file holds")
                raw = f.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"{self.path} cannot be read: {exc}") from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self._fail(f"has a header that is not JSON ({exc})")
        if not isinstance(header, dict):
            self._fail("has a header that is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                self._fail(f"has a malformed entry for tensor {name!r}: {exc!r}")
            if any(d < 0 for d in shape):
                self._fail(f"gives tensor {name!r} a negative dimension {shape}")
            expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if not 0 <= begin <= end <= data_size or end - begin != expected:
                self._fail(f"gives tensor {name!r} bytes [{begin}, {end}) but its shape {shape} and dtype "
                           f"{entry['dtype']} need {expected} bytes within the {data_size} bytes of data")
            self.entries[name] = (dtype, shape, begin, end)
        spans = sorted((begin, end) for _, _, begin, end in self.entries.values())
        position = 0
        for begin, end in spans:
            if begin != position:
                self._fail("has tensor byte ranges that overlap or leave gaps")
            position = end
        if position != data_size:
            self._fail(f"holds {data_size} bytes of data but its tensors cover {position}")

    def _fail(self, problem: str):
        raise CheckpointError(f"{self.path} is not a valid safetensors file: it {problem}")

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][1])

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buffer = bytearray(end - begin)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(buffer) != len(buffer):
                    self._fail(f"ends inside tensor {name!r} (was it changed while being read?)")
        except OSError as exc:
            raise CheckpointError(f"{self.path} cannot be read: {exc}") from exc
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
