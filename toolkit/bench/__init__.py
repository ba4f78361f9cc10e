"""`deploy bench`: measure a live OpenAI-compatible endpoint (TabbyAPI first) the way `vllm bench serve` does.

shaping (prompts of exact token lengths, request bodies) -> loadgen (httpx async, streamed requests, a concurrency
sweep with bounded loops) -> metrics (TTFT, TPOT, ITL, E2EL, throughput, goodput; pure) -> result (vLLM's field
names) -> report (tables); ceiling: the load generator's own measured limit, read from profiles/bench_ceiling.yaml.
"""
