"""The `deploy` command line: a thin shell over the pipeline stages.

It owns argument parsing, the shared options (plan flags, "GPUs from --gpus or NVML", number and port parsing:
options.py), the tables people read (views.py) and the mapping of errors to exit codes (main.py). Each command
module only parses, calls a stage and prints; command modules never import each other, and no stage imports this
package. Heavy libraries (docker, httpx, huggingface_hub, numpy) are imported inside run functions, so that
`deploy plan` starts fast.
"""

from .main import main

__all__ = ["main"]
