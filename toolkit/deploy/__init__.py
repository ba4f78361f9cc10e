"""Deploy: a rendered out folder -> a running, ready Deployment. The adapters (Hugging Face hub download, Docker
engine, compose.yaml read into a run spec), the checks around them (preflight, readiness, diagnosis of a failed
container), the state file, the steps fetch-model/build/up/status/down with the out-of-memory retry policy, and
`deploy auto`'s whole pipeline. The CLI only parses, calls these and prints.
"""
