"""Mask experts (MoM): each FFN keeps its weights; experts are learned hard-concrete masks over its neurons.

Reading order:
- `config`         MaskConfig (experts, top-k, routing, initialisation), MaskTrainConfig, LagrangianConfig,
                   BaselineSettings: every setting, importable without torch
- `method/`        the method on an in-memory model: gates, router, MaskedFFN, training, analysis, compaction, export
- `baselines/`     what the masks are compared with: MoEfication, structured pruning, TEAL-style thresholds
- `experiments/`   runs on disk: one run end to end, the run directory, the sweep against the baselines, latency
- `commands`       `upcycle masks train | analyze | sweep`: each signature is its command line
Arrows point one way: experiments → baselines → method (tests/test_architecture.py). The fast sparse FFN and its
plain reference live in `upcycle.ops.sparse_ffn` / `upcycle.ops.reference_ffn`.
"""
