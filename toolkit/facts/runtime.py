"""Facts of the serving stack the code needs as numbers and paths, each kept once (../shared/facts/tabbyapi.md)."""

from __future__ import annotations

# TabbyAPI's network.port in the rendered config.yml: what the image exposes and health-checks, and what every
# compose file and Swarm service publishes.
CONTAINER_PORT = 5000
# The host port a deployment is published on unless --port (or a fleet's endpoint.port) says otherwise.
DEFAULT_HOST_PORT = 5000
# exllamav3 pages the KV cache in 256-token pages: TabbyAPI's cache_size must be a multiple of it (its validation
# fails otherwise), so every cache size and context step is counted in pages.
CACHE_PAGE_TOKENS = 256
# Where the image's TabbyAPI reads its files (WORKDIR /app): the config, the key file and the model folders.
CONTAINER_CONFIG = "/app/config.yml"
CONTAINER_API_TOKENS = "/app/api_tokens.yml"
CONTAINER_MODELS_DIR = "/app/models"
# The image's health probe (dockerfiles/healthcheck.py, COPY'd here): healthy means "can serve", because TabbyAPI's
# /health stays 503 after any failed generation even while it serves (benchmarks/gpu_stack/RESULTS.md section 3).
CONTAINER_HEALTHCHECK = "/usr/local/lib/glm-deploy/healthcheck.py"
