"""TEST DOUBLE of exllamav3's safetensors collections: the base's tensors, and the variant that takes some keys
from other quants by glob (what the mix assembly uses)."""

from __future__ import annotations

import glob
import json
import os
import re
import struct

import numpy as np

from ..tensor import DTYPES, TORCH_NAMES, Tensor


def read_header(filename: str) -> dict:
    """A safetensors header with the data section's offset under _header_offset (as exllamav3 keeps it)."""
    with open(filename, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header["_header_offset"] = 8 + length
    return header


class _Keys:
    """The part of exllamav3's key trie the collections use: keys under a prefix."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = sorted(keys)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self._keys if k.startswith(prefix)]


class SafetensorsCollection:
    """Every tensor of a folder's *.safetensors files, by key."""

    def __init__(self, directory: str, **kwargs: object) -> None:
        self.directory = directory
        self.tensor_file_map: dict[str, str] = {}
        self.file_headers: dict[str, dict] = {}
        for filename in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            header = read_header(filename)
            self.file_headers[filename] = header
            for key in header:
                if key not in ("__metadata__", "_header_offset"):
                    self.tensor_file_map[key] = filename
        self._trie = _Keys(list(self.tensor_file_map))

    def get_tensor_file_map_trie(self) -> _Keys:
        return self._trie

    def find_stc(self, key: str) -> SafetensorsCollection:
        return self

    def has_tensor(self, key: str) -> bool:
        return key in self.tensor_file_map

    def _entry(self, key: str) -> dict:
        if key not in self.tensor_file_map:
            raise ValueError(f"Required tensor {key} not found in any *.safetensors file in {self.directory}")
        return self.file_headers[self.tensor_file_map[key]][key]

    def get_tensor_size(self, key: str, optional: bool = False) -> int | None:
        if optional and key not in self.tensor_file_map:
            return None
        begin, end = self._entry(key)["data_offsets"]
        return end - begin

    def get_tensor_sizes(self, prefix: str) -> list[int]:
        keys = ([prefix] if prefix in self.tensor_file_map else []) + self._trie.keys(prefix + ".")
        return [self.get_tensor_size(k) for k in keys]

    def list_tensors(self, prefix: str, only_serializable: bool = False) -> dict:
        prefix = prefix.rstrip(".")
        keys = ([prefix] if prefix in self.tensor_file_map else []) + self._trie.keys(prefix + ".")
        return {k: _described(self._entry(k)) for k in keys}

    def get_tensor(
        self, key: str, device: object = None, optional: bool = False, **kwargs: object
    ) -> Tensor | None:
        if optional and key not in self.tensor_file_map:
            return None
        entry = self._entry(key)
        filename = self.tensor_file_map[key]
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        with open(filename, "rb") as handle:
            handle.seek(self.file_headers[filename]["_header_offset"] + begin)
            data = handle.read(end - begin)
        return Tensor(np.frombuffer(data, dtype=dtype).reshape(entry["shape"]), entry["dtype"])

    def get_tensors(self, prefix: str, device: object = None, allow_bf16: bool = False) -> dict[str, Tensor]:
        keys = [k for k in self.tensor_file_map if k == prefix or k.startswith(prefix + ".")]
        return {k: self.get_tensor(k) for k in keys}

    def close(self) -> None:
        """Nothing stays open in the double."""


def _described(entry: dict) -> dict:
    begin, end = entry["data_offsets"]
    return {"shape": entry["shape"], "n_bytes": end - begin, "dtype": TORCH_NAMES[entry["dtype"]]}


class VariantSafetensorsCollection(SafetensorsCollection):
    """The base's collection in which keys matching a source's globs are read from that source instead. As in
    exllamav3: a glob's '*' matches any characters, the whole key must match, the latest add_stc is tried first,
    and which keys exist is the base's to say (sizes and tensors of a module come from the base's key list)."""

    def __init__(self, main: SafetensorsCollection, **kwargs: object) -> None:
        self.main = main
        self.stcs: list[tuple[list[str], re.Pattern[str], SafetensorsCollection]] = []

    @staticmethod
    def _pattern(globs: list[str]) -> re.Pattern[str]:
        parts = [".*".join(re.escape(piece) for piece in g.strip().split("*")) for g in globs]
        return re.compile("^(?:" + "|".join(parts) + ")$") if parts else re.compile(r"^\b\B$")

    def add_stc(self, filters: list[str], stc: SafetensorsCollection) -> None:
        self.stcs.insert(0, (filters, self._pattern(filters), stc))

    def find_stc(self, key: str) -> SafetensorsCollection:
        return next((stc for _, rx, stc in self.stcs if rx.fullmatch(key)), self.main)

    def has_tensor(self, key: str) -> bool:
        return self.find_stc(key).has_tensor(key)

    def get_tensor_size(self, key: str, optional: bool = False) -> int | None:
        return self.find_stc(key).get_tensor_size(key, optional)

    def get_tensor_sizes(self, prefix: str) -> list[int]:
        main = self.main
        keys = ([prefix] if prefix in main.tensor_file_map else []) + main.get_tensor_file_map_trie().keys(
            prefix + "."
        )
        return [self.get_tensor_size(k) for k in keys]

    def list_tensors(self, prefix: str, only_serializable: bool = False) -> dict:
        prefix = prefix.rstrip(".")
        keys: set[str] = set()
        for stc in [self.main] + [s for _, _, s in self.stcs]:
            keys |= set(([prefix] if prefix in stc.tensor_file_map else []) + stc._trie.keys(prefix + "."))
        result = {}
        for key in keys:
            stc = self.find_stc(key)
            result[key] = _described(stc.file_headers[stc.tensor_file_map[key]][key])
        return result

    def get_tensor(self, key: str, *args: object, **kwargs: object) -> Tensor | None:
        return self.find_stc(key).get_tensor(key, *args, **kwargs)

    def get_tensors(self, prefix: str, device: object = None, allow_bf16: bool = False) -> dict[str, Tensor]:
        keys = [k for k in self.main.tensor_file_map if k == prefix or k.startswith(prefix + ".")]
        return {k: self.find_stc(k).get_tensor(k) for k in keys}

    def close(self) -> None:
        for stc in [s for _, _, s in self.stcs] + [self.main]:
            stc.close()
