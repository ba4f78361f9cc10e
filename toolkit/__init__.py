"""glm-deploy: plan, render, deploy and verify GLM-4.7 EXL3 endpoints on TabbyAPI."""

__version__ = "0.1.0"
