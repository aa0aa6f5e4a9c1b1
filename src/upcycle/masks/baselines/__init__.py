"""Baselines the mask experts are compared with.

Reading order:
- `moefication`   neurons clustered into experts (balanced k-means, `upcycle.ops.kmeans`) + a learned router
- `pruning`       structured magnitude pruning, then fine-tuning
- `teal`          TEAL-style training-free activation thresholds
"""
