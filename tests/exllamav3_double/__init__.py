"""The exllamav3 TEST DOUBLE (exllamav3/) and the test image that carries it (Dockerfile, image.py)."""
