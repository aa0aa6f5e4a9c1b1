"""Baselines the mask experts are compared with: MoEfication (clustered neurons + a learned router), structured
magnitude pruning (+ fine-tuning) and TEAL-style training-free activation thresholding."""
