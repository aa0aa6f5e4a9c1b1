"""Serving introvert experts: one base model, thousands of LoRA experts, one OpenAI-compatible endpoint.

```
config.py     CacheConfig, EngineConfig, ServerConfig: the typed settings (`upcycle serve --engine.* --server.*`)
adapters.py   read a PEFT LoRA dir into tensors (refusing what cannot be served)
cache.py      three tiers: active slots in the model / CPU LRU / disk, with pinning, prefetch, eviction hooks
kv_cache.py   fixed-capacity per-row KV cache for continuous batching
sampling.py   greedy / temperature / top-p, incremental detokenisation with stop strings
engine.py     the scheduler: continuous batching of requests for different experts, one forward per step
protocol.py   OpenAI request bodies and answers
server.py     FastAPI app (completions, chat, SSE, models, admin, health, metrics) and the uvicorn server
metrics.py    Prometheus collector over the engine's and cache's counters
router.py     the SequenceRouter protocol that model "auto" uses
watch.py      keep the served experts in step with a directory
commands.py   `upcycle serve`
synthetic.py  random PEFT experts and tiny bases for tests and benchmarks
loadtest.py   bounded concurrent-client load test
ray_backend.py, vllm_backend.py   optional deployments
```
The batched multi-adapter LoRA op and the layer wrapper live in `upcycle.ops.batched_lora`.
"""
