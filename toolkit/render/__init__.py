"""Render: Plan -> the files of one deployment (Dockerfile, config.yml, api_tokens.yml, compose.yaml, .env,
plan.json, render.json). render_files() is the pure part (text in memory, every value validated or quoted);
render_bundle() writes them atomically into the out folder. One module per file kind: dockerfile.py, config.py,
compose.py.
"""
