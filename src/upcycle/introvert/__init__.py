"""Introvert experts (MoIN): cluster whole documents, train one LoRA expert per cluster, route each sequence to one.

Reading order:
- `run`                     the run directory, the contract between the steps
- `embedding`, `clustering/`  embed documents; k-means clusters, the `cluster` step, cluster summaries
- `data`, `experts`         each document's split and cluster; one LoRA expert per cluster through the shared loop
- `router`                  nearest-centroid (or c-BTM top-k) routing; the run's EmbeddingRouter (embed + route)
- `model`, `lm_eval`        IntrovertExperts (the routed model as a Python API) and its lm-eval `LM`
- `baselines`, `evaluate`, `ablation`, `report`   matched baselines, held-out scoring, the K ablation, report.md
- `commands`                the CLI
"""
