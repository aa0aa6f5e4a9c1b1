"""The mask-experts method itself, on a model in memory (no files, no corpora, no base loading).

Reading order:
- `hard_concrete`  L0 gates: sampled in training, deterministic at eval, expected L0 for the penalty
- `router`, `layer`, `surgery`   the token router, MaskedFFN, installing it (via `upcycle.models.surgery`)
- `ffn_inputs`, `cluster_init`   the FFN inputs a layer sees; masks started from neuron clusters
- `active`, `lagrangian`, `train`   expected active ratio, the CoFi-style controller, training through the shared loop
- `calibrate`      test-time gates shifted so the achieved active ratio meets the target
- `analysis`, `compact`, `export`   shared / token-specific / inactive experts, exact compaction, save / load
"""
