"""Mask-expert experiments: what runs the method on a base and a corpus, and what reports it.

Reading order:
- `run_dir`        the run directory (masks.json, masks.safetensors, analysis, compact/) and loading masks onto a base
- `end_to_end`     one run: train → evaluate → calibrate → analyse → compact → export; analyse a run again
- `latency`        side-by-side timing of several models in one process
- `sweep`, `sweep_report`   every method at every target on equal training tokens; the report and the Pareto plots
"""
