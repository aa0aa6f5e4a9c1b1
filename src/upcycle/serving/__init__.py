"""Serving LoRA experts of any method: one base model, thousands of adapters, one OpenAI-compatible endpoint.

Serving knows no method: a method hands it a `ServedModel` (base, {expert name: adapter dir}, optional router);
introvert runs do so through `upcycle.introvert.serving.served_run`. Reading order:
```
config.py       CacheConfig, EngineConfig, ServerConfig, RoutingConfig: the typed settings (`upcycle serve
                --engine.* --server.* --routing.*`)
source.py       ServedModel: what a method hands the server; `open_source` finds the factory for a directory
router.py       the ExpertRouter protocol that model "auto" uses; RouteDecision (top-k mixture, out-of-domain)
adapters.py     read a PEFT LoRA dir into tensors (refusing what cannot be served)
cache.py        three tiers: active slots in the model / CPU LRU / disk, with pinning, prefetch, eviction hooks
kv_cache.py     fixed-capacity per-row KV cache for continuous batching
sampling.py     greedy / temperature / top-p, incremental detokenisation with stop strings
engine.py       the scheduler: continuous batching of requests for different experts, one forward per step
protocol.py     OpenAI request bodies and answers
completions.py  the /v1 request path: resolve the expert, sampling parameters, run, respond (JSON or SSE)
server.py       FastAPI wiring (body limit, keys, errors, health, metrics, admin) and the draining uvicorn server
admin.py        /admin/experts: add and remove experts at runtime
metrics.py      Prometheus collector over the engine's and cache's counters
watch.py        keep the served experts in step with a directory
commands.py     `upcycle serve`
synthetic.py    random PEFT experts and tiny bases for tests and benchmarks
loadtest.py     bounded concurrent-client load test
ray_backend.py, vllm_backend.py   optional deployments
```
The batched multi-adapter LoRA op and the layer wrapper live in `upcycle.ops.batched_lora`.
"""
