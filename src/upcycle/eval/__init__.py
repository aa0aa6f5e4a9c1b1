"""Evaluation every method shares: held-out loss, uncertainty, reports.

Reading order:
- `perplexity`   token NLL, mean loss and perplexity on packed blocks; per-document NLL scored in batches
- `stats`        the 95% t-interval over seeds, bootstrap and paired-bootstrap intervals over documents
- `report`       markdown tables, number formatting, saving matplotlib figures
A method's own adapters live with the method (the lm-eval `LM` of introvert runs: `upcycle.introvert.lm_eval`).
"""
