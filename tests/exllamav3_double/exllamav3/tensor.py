"""A tensor as the double carries it: a numpy array and its safetensors dtype tag (numpy has no bfloat16)."""

from __future__ import annotations

import numpy as np

DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": np.uint16,  # raw bits
    "F32": np.float32,
    "F64": np.float64,
}
# How exllamav3 names the dtypes in quantization_config.json (str() of the torch dtype).
TORCH_NAMES = {
    "BOOL": "torch.bool",
    "U8": "torch.uint8",
    "I8": "torch.int8",
    "I16": "torch.int16",
    "I32": "torch.int32",
    "I64": "torch.int64",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F32": "torch.float32",
    "F64": "torch.float64",
}


class Tensor:
    """The few tensor methods compile_model and save_file use."""

    def __init__(self, array: np.ndarray, tag: str) -> None:
        self.array = array
        self.tag = tag

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def nelement(self) -> int:
        return int(self.array.size)

    def element_size(self) -> int:
        return int(self.array.itemsize)

    def contiguous(self) -> Tensor:
        return Tensor(np.ascontiguousarray(self.array), self.tag)
