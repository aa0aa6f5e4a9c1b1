"""How a dense FFN is turned into mask experts: a typed config, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import UserError

ROUTINGS = ("topk", "soft")


@dataclass
class MaskConfig:
    """Mask experts added to every FFN of the base model."""

    experts: int = 8
    """Mask experts per FFN layer (E). Each is a hard-concrete mask over the FFN's intermediate neurons."""
    top_k: int = 1
    """Experts each token uses with `routing=topk`; its neuron mask is the union (max) of theirs."""
    routing: str = "topk"
    """'topk': hard top-k choice (straight-through gradient to the router); 'soft': the probability-weighted mixture
    of all experts' masks (differentiable, but nothing can be skipped at inference)."""
    init_log_alpha: float = 3.0
    """Initial log α of every gate; >= log 11 ≈ 2.4 keeps every mask fully open, so step 0 equals the dense model."""
    init_noise: float = 0.01
    """Std of Gaussian noise added to the initial log α, so that experts are not exact copies of each other."""
    router_bias: bool = False
    """Give the router's linear layer a bias."""

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise UserError(f"--experts must be >= 1, got {self.experts}")
        if self.routing not in ROUTINGS:
            raise UserError(f"--routing must be one of {', '.join(ROUTINGS)}, got '{self.routing}'")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"--top_k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        if self.init_noise < 0:
            raise UserError(f"--init_noise must be >= 0, got {self.init_noise}")
