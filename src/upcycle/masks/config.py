"""How a dense FFN is turned into mask experts: a typed config, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import UserError

ROUTINGS = ("topk", "soft")
INITS = ("clusters", "open")


@dataclass
class MaskConfig:
    """Mask experts added to every FFN of the base model."""

    experts: int = 128
    """Mask experts per FFN layer (E). Each is a hard-concrete mask over the FFN's intermediate neurons. With the
    'clusters' init more experts are finer clusters, which kept helping with diminishing returns; 128 because 512
    needs a slower k-means and a larger router (results: docs/masks.md, round 3)."""
    top_k: int = 1
    """Experts each token uses with `routing=topk`; its neuron mask is the union (max) of theirs."""
    routing: str = "topk"
    """'topk': hard top-k choice (straight-through gradient to the router); 'soft': the probability-weighted mixture
    of all experts' masks (differentiable, but nothing can be skipped at inference)."""
    init: str = "clusters"
    """'clusters': expert e starts as k-means cluster e of the FFN's inputs on training tokens (the router is the
    nearest-centroid rule; the gates are open, log α ranked by each neuron's mean |activation| in the cluster, see
    upcycle.masks.cluster_init). 'open': every gate at `init_log_alpha` (+ noise) and a random router."""
    rank_spread: float = 2.0
    """'clusters' init: log α runs from just above open (least used neuron of the cluster) to this much higher."""
    init_log_alpha: float = 3.0
    """'open' init: initial log α of every gate; >= log 11 ≈ 2.4 keeps every mask fully open, so step 0 equals the
    dense model (the 'clusters' init keeps them open too)."""
    init_noise: float = 0.01
    """'open' init: std of Gaussian noise added to the initial log α, so that experts are not exact copies."""
    router_bias: bool = True
    """Give the router's linear layer a bias (the 'clusters' init needs it)."""

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise UserError(f"--experts must be >= 1, got {self.experts}")
        if self.routing not in ROUTINGS:
            raise UserError(f"--routing must be one of {', '.join(ROUTINGS)}, got '{self.routing}'")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"--top_k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        if self.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got '{self.init}'")
        if self.init == "clusters" and not self.router_bias:
            raise UserError("--init clusters needs --router_bias true (the nearest-centroid rule has a bias)")
        if self.rank_spread < 0:
            raise UserError(f"--rank_spread must be >= 0, got {self.rank_spread}")
        if self.init_noise < 0:
            raise UserError(f"--init_noise must be >= 0, got {self.init_noise}")
