"""Deadlines and size caps of verification, kept once and light (the CLI shows them in --help)."""

from __future__ import annotations

# One request may take this long (a loaded GPU server answers a batch of top-100 requests in seconds); the whole
# run has its own deadline on top.
REQUEST_TIMEOUT_S = 120.0
# `deploy verify` ends within this many seconds after any --wait unless --timeout says otherwise: the KL
# spot-check costs 7-20 s of server time on one H200 (README), a loaded GLM-4.7 server more; a server that stalls
# or trickles its answers fails at this deadline instead of holding the run.
VERIFY_TIMEOUT_S = 900.0
# `deploy reference record` asks for the prompt set's token cuts one /v1/token/encode at a time (about 20 per
# prompt) and then the distributions: more requests than verify, hence a longer default.
RECORD_TIMEOUT_S = 1800.0
# No TabbyAPI answer verification asks for is near this size (top-100 logprobs for a prompt's positions are
# ~40 KB); a larger body, as sent or inflated, is refused instead of read.
MAX_ANSWER_BYTES = 16 << 20
