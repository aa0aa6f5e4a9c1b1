"""Mask experts (MoM): each FFN keeps its weights; experts are learned hard-concrete masks over its neurons.

Reading order:
- `hard_concrete`  L0 gates: sampled in training, deterministic at eval, expected L0 for the penalty
- `config`         MaskConfig (experts, top-k, routing, initialisation), MaskTrainConfig, LagrangianConfig,
                   BaselineSettings: every setting, importable without torch
- `router`, `layer`, `surgery`   the token router, MaskedFFN, installing it (via `upcycle.models.surgery`)
- `active`, `lagrangian`, `train`   expected active ratio, the CoFi-style controller, training through the shared loop
- `analysis`, `compact`, `export`   shared / token-specific / inactive experts, exact compaction, save / load
- `run`, `pipeline`, `commands`   the run directory and the `upcycle masks train|analyze|sweep` commands
- `baselines/`     MoEfication, structured pruning, TEAL-style thresholds
- `latency`, `sweep`   side-by-side timing; every method at every target, the report and the Pareto plots
The fast sparse FFN and its plain reference live in `upcycle.ops.sparse_ffn` / `upcycle.ops.reference_ffn`.
"""
