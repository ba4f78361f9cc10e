"""TEST DOUBLE of exllamav3's save_file: a safetensors file from the double's tensors."""

from __future__ import annotations

import json
import struct

from ..tensor import Tensor


def save_file(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """Header (offsets relative to the data section, padded to 8 bytes), then each tensor's bytes in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.nelement() * tensor.element_size()
        header[name] = {
            "dtype": tensor.tag,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(filename, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for tensor in tensors.values():
            handle.write(tensor.array.tobytes())
