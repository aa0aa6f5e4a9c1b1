"""Typed settings of an MoE layer, of sparse upcycling and of the Flan-MoE experiment (importable without torch)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from upcycle.data.instructions import MixtureConfig
from upcycle.errors import UserError
from upcycle.training.config import TrainConfig

log = logging.getLogger(__name__)

ROUTERS = ("switch", "gshard", "st_moe", "expert_choice")
ROUTER_ALIASES = {"top1": "switch", "top2": "gshard"}
DISPATCHES = ("capacity", "dropless")
SECOND_EXPERT_POLICIES = ("all", "random")
GROUPED_BACKENDS = ("auto", "grouped_mm", "loop", "padded_bmm")
DEFAULT_TOP_K = {"switch": 1, "gshard": 2, "st_moe": 2}
DEFAULT_Z_LOSS = {"st_moe": 1e-3}


@dataclass
class MoEConfig:
    """One sparse MoE layer: E SwiGLU experts, a router, a dispatch mode, and its auxiliary-loss weights."""

    num_experts: int = 8
    """E, experts per MoE layer (>= 1)."""
    router: str = "gshard"
    """switch (top-1), gshard (top-2, gates renormalised over the two), st_moe (gshard + router z-loss),
    expert_choice (each expert picks its top-C tokens). Aliases: top1 = switch, top2 = gshard."""
    top_k: int | None = None
    """k, experts per token for token-choice routers (default: 1 for switch, 2 for gshard / st_moe)."""
    normalize_gates: bool | None = None
    """Renormalise the chosen probabilities to sum to 1 (default: True), so an upcycled model starts equal to the
    dense one. For k = 1 (switch) the gate is then 1 in value with the gradient of p (straight-through), so the router
    learns as under Switch's gate = p; False gives the raw probabilities (Switch's gate = p, the layer's output
    scaled by about 1/E right after upcycling)."""
    second_expert_policy: str = "all"
    """gshard: 'all' sends every token to its second expert; 'random' does so only with probability min(1, 2*g2)
    while training (GShard, Algorithm 1); evaluation always sends it."""
    dispatch: str = "dropless"
    """capacity: fixed C slots per expert, overflow tokens dropped (output 0, the residual carries them);
    dropless: sort by expert and run grouped matmuls, nothing dropped."""
    capacity_factor: float = 1.25
    """Training capacity factor cf: C = ceil(cf * k * T / E) (expert choice: C = ceil(cf * T / E))."""
    eval_capacity_factor: float = 2.0
    """Capacity factor in eval mode."""
    grouped_backend: str = "auto"
    """Dropless expert matmuls: auto, grouped_mm (torch._grouped_mm), loop, padded_bmm."""
    jitter_noise: float = 0.0
    """Multiply the router input by U(1 - eps, 1 + eps) while training (Switch); 0 disables."""
    balance_loss_coef: float = 0.01
    """alpha of the Switch load-balancing loss alpha * E * sum_i f_i P_i (averaged over MoE layers)."""
    z_loss_coef: float | None = None
    """beta of the router z-loss beta * mean(logsumexp(x)^2) (default: 1e-3 for st_moe, else 0)."""
    router_init_std: float = 0.02
    """Standard deviation of the new router's normal initialisation."""

    def __post_init__(self) -> None:
        self.router = ROUTER_ALIASES.get(self.router, self.router)
        if self.router not in ROUTERS:
            names = ", ".join([*ROUTERS, *ROUTER_ALIASES])
            raise UserError(f"unknown router {self.router!r}; choose one of {names}")
        if self.num_experts < 1:
            raise UserError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.router == "expert_choice":
            self.top_k = None
        else:
            self.top_k = DEFAULT_TOP_K[self.router] if self.top_k is None else self.top_k
            if not 1 <= self.top_k <= self.num_experts:
                raise UserError(f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.normalize_gates is None:
            self.normalize_gates = self.top_k is not None
        if self.z_loss_coef is None:
            self.z_loss_coef = DEFAULT_Z_LOSS.get(self.router, 0.0)
        _check_choice("second_expert_policy", self.second_expert_policy, SECOND_EXPERT_POLICIES)
        _check_choice("dispatch", self.dispatch, DISPATCHES)
        _check_choice("grouped_backend", self.grouped_backend, GROUPED_BACKENDS)
        if self.second_expert_policy == "random" and (self.top_k or 0) < 2:
            raise UserError("second_expert_policy='random' needs a router with top_k >= 2 (gshard or st_moe)")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.jitter_noise < 1:
            raise UserError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}")
        for name in ("balance_loss_coef", "z_loss_coef", "router_init_std"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def token_choice(self) -> bool:
        """True when tokens pick experts (switch, gshard, st_moe), False for expert choice."""
        return self.router != "expert_choice"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        """Build from a saved dict, rejecting unknown keys with a UserError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown MoE config keys {unknown}; the checkpoint was written by another version")
        return cls(**data)


@dataclass
class UpcycleConfig:
    """How a dense model becomes an MoE one (Komatsuzaki et al. 2022): which MLPs, and how the copies differ."""

    every: int = 1
    """Replace every N-th dense MLP: layers N-1, 2N-1, ... (1: all of them; 2: every other, as in GShard)."""
    noise: float = 0.0
    """Add Gaussian noise of std noise * std(weight) to each expert copy (0: exact copies, logits unchanged)."""
    seed: int = 0
    """Seed for the router initialisation and the copy noise."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UserError(f"every must be >= 1, got {self.every}")
        if self.noise < 0:
            raise UserError(f"noise must be >= 0, got {self.noise}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def default_moe() -> MoEConfig:
    """Switch top-1 over 4 upcycled experts, token dropping at capacity factor 1.25 (2.0 in evaluation)."""
    return MoEConfig(num_experts=4, router="switch", dispatch="capacity", capacity_factor=1.25,
                     eval_capacity_factor=2.0, balance_loss_coef=0.01)


@dataclass
class ExperimentConfig:
    """Everything that sets the experiment's numbers."""

    base: str | None = None
    """Dense base (default: the shipped tiny Llama)."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """Instruction data, training and held-out task types."""
    moe: MoEConfig = field(default_factory=default_moe)
    """MoE layers of the sparse model (keep top-1 with full-size experts for equal FLOPs per token)."""
    every: int = 2
    """Upcycle every N-th MLP (2: layers 1, 3, ...; as in Switch / GShard / Flan-MoE)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds; each sets the router initialisation and the order of training rows of every stage."""
    block_size: int = 128
    """Tokens per training row (whole examples packed, longer examples dropped)."""
    instruct: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=8, lr=1e-3,
                                                                      warmup_steps=30, checkpoint_every=100))
    """Instruction tuning on the mixture's training task types."""
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, lr=1e-3,
                                                                      warmup_steps=10, checkpoint_every=50))
    """Fine-tuning on the held-out task types (their training split)."""
    eval_examples: int = 150
    """Test-split examples of each held-out task type that are scored."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise UserError("give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct, got {self.seeds}")
        if not self.mixture.held_out:
            raise UserError("the experiment needs held-out task types (--mixture.held_out)")
        if self.block_size < 16:
            raise UserError(f"block_size must be >= 16, got {self.block_size}")
        if self.eval_examples < 1:
            raise UserError(f"eval_examples must be >= 1, got {self.eval_examples}")
        if self.moe.token_choice and self.moe.top_k != 1:
            log.warning("top_k=%d with full-size experts costs %d times the dense FFN FLOPs per token",
                        self.moe.top_k, self.moe.top_k)


# The instruction-tuning experiment's design (`upcycle.moe.experiment` runs it, `experiment_report` shows it).
CONDITIONS = ("direct", "instruct")
"""Fine-tuned directly / instruction-tuned, then fine-tuned."""
METRICS = ("loss", "exact_match")
"""What each held-out task is scored by."""
