"""TEST DOUBLE: safetensors loading."""
