"""The names of the files glm-deploy writes, kept once: a rendered out folder, its state, a model folder's marker.

No imports: the reference entry point reads these names inside the deployment's image, where only the standard
library, numpy, yaml, torch and exllamav3 are installed.
"""

from __future__ import annotations

# `deploy render --out DIR`
DOCKERFILE = "Dockerfile"
PR295_SCRIPT = "ensure-pr295.sh"  # the PR #295 build step, COPY'd by the Dockerfile
CHECK_STACK_SCRIPT = "check_stack.py"  # the build step checking the installed stack's versions
HEALTHCHECK_SCRIPT = "healthcheck.py"  # the image's health probe (runtime.CONTAINER_HEALTHCHECK)
DOCKERIGNORE = ".dockerignore"
CONFIG = "config.yml"  # TabbyAPI's config
COMPOSE = "compose.yaml"
ENV = ".env"  # the values compose.yaml reads (bind, port, models folder, uid/gid)
API_TOKENS = "api_tokens.yml"  # TabbyAPI's key file (0600)
API_KEY_HEADER = "api_key.header"  # "X-API-Key: <key>" for `curl -H @file` (0600): the key stays off argv
PLAN = "plan.json"  # the plan rendered
MANIFEST = "render.json"  # written last: what was rendered, with file hashes
MODELS = "models"  # default models folder inside the out folder
# `deploy up`
STATE = "deploy-state.json"
# `deploy reference deployment` (and `deploy auto` before `up`); also what the reference entry point writes into --out
DEPLOYMENT_REFERENCE = "deployment-reference.json.gz"  # computed from the deployed weights before serving
REFERENCE_STAGING_PREFIX = ".reference-"  # the reference container writes here; the host checks, then renames
# `deploy fetch-model`: written into the model folder once every file is downloaded and checked
MODEL_MARKER = ".glm-deploy-complete.json"
# `deploy cluster render --out DIR`
STACK = "stack.yml"
CLUSTER_MANIFEST = "cluster.json"
