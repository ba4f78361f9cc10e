"""Verify a live TabbyAPI endpoint: health, readiness, function, and a KL spot-check against a reference."""
