"""Verify: a live TabbyAPI endpoint -> VerifyReport. The HTTP client (client.py), the checks -- liveness,
readiness, function, tokenizer, KL spot-check (checks.py, kl.py) --, reference distributions to compare against
(reference.py, exl3_backend.py) and the report as JSON or JUnit (report.py).
"""
