"""One module per `deploy` subcommand (or group). Each defines register(subparsers).

Modules import heavy libraries (docker, httpx, huggingface_hub, numpy) inside their run functions, so
that `deploy plan` starts fast.
"""
