"""Typed settings of the mask experts (MoM), importable without torch: how a dense FFN is turned into mask experts,
how they train (the Lagrangian steering the active ratio), and the baselines of a sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from upcycle.errors import UserError
from upcycle.training.config import TrainConfig

ROUTINGS = ("topk", "soft")
LAYOUTS = ("overlap", "partition")
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
    upcycle.masks.method.cluster_init). 'open': every gate at `init_log_alpha` (+ noise) and a random router."""
    rank_spread: float = 2.0
    """'clusters' init: log α runs from just above open (least used neuron of the cluster) to this much higher."""
    init_log_alpha: float = 3.0
    """'open' init: initial log α of every gate; >= log 11 ≈ 2.4 keeps every mask fully open, so step 0 equals the
    dense model (the 'clusters' init keeps them open too)."""
    init_noise: float = 0.01
    """'open' init: std of Gaussian noise added to the initial log α, so that experts are not exact copies."""
    router_bias: bool = True
    """Give the router's linear layer a bias (the 'clusters' init needs it)."""
    layout: str = "overlap"
    """'overlap': each expert's mask may keep any neuron (the compacted model stores a neuron once per expert that
    keeps it). 'partition': each neuron is shared, in exactly one expert's block, or dropped, so the compacted model
    stores every neuron once and skips whole blocks (upcycle.masks.method.partition); needs the 'clusters' init and
    top-k routing, and suits few experts (8-16)."""
    partition_slack: float = 0.1
    """'partition': the share of the FFN above the target that a token uses at the start, for the gates to close."""

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise UserError(f"--recipe.masks.experts must be >= 1, got {self.experts}")
        if self.routing not in ROUTINGS:
            raise UserError(f"--recipe.masks.routing must be one of {', '.join(ROUTINGS)}, got '{self.routing}'")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"--recipe.masks.top_k must be between 1 and --recipe.masks.experts ({self.experts}), "
                            f"got {self.top_k}")
        if self.init not in INITS:
            raise UserError(f"--recipe.masks.init must be one of {', '.join(INITS)}, got '{self.init}'")
        if self.init == "clusters" and not self.router_bias:
            raise UserError("--recipe.masks.init clusters needs --recipe.masks.router_bias true (the nearest-centroid "
                            "rule has a bias)")
        if self.rank_spread < 0:
            raise UserError(f"--recipe.masks.rank_spread must be >= 0, got {self.rank_spread}")
        if self.init_noise < 0:
            raise UserError(f"--recipe.masks.init_noise must be >= 0, got {self.init_noise}")
        if self.layout not in LAYOUTS:
            raise UserError(f"--recipe.masks.layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")
        if self.layout == "partition":
            if self.init != "clusters" or self.routing != "topk":
                raise UserError("--recipe.masks.layout partition assigns neurons from the token clusters and skips "
                                "blocks per token: it needs --recipe.masks.init clusters and --recipe.masks.routing "
                                "topk")
            if self.top_k >= self.experts:
                raise UserError(f"--recipe.masks.layout partition needs top_k < experts (got top_k {self.top_k} "
                                f"of {self.experts}): every token would use every block, so nothing is routed")
        if not 0.0 <= self.partition_slack < 1.0:
            raise UserError(f"--recipe.masks.partition_slack must be in [0, 1), got {self.partition_slack}")

    def check_reachable(self, target: float) -> None:
        """Refuse a target the partition layout cannot reach: below the share k of E equal expert blocks hold with
        nothing shared, the gates would have to close most of every block."""
        floor = self.top_k / self.experts
        if self.layout == "partition" and target < floor:
            raise UserError(f"--recipe.target {target:g} is below {self.top_k}/{self.experts} = {floor:.3g}, the "
                            f"share of the FFN that {self.top_k} of {self.experts} equal expert blocks hold with "
                            f"nothing shared; the partition layout cannot reach it: use at least "
                            f"{math.ceil(self.top_k / target)} experts (--recipe.masks.experts) or a higher target")


@dataclass
class LagrangianConfig:
    """Target and multiplier settings."""

    target: float = 0.5
    """Final expected active ratio t of the FFN neurons, in (0, 1]."""
    warmup_steps: int = 100
    """Steps over which t ramps linearly from 1 to `target` (0: the full target from the start)."""
    lr: float = 0.05
    """Step size of the multipliers' gradient ascent."""
    initial_lambda2: float = 100.0
    """λ2 at step 0: the strength of the quadratic restoring force that damps the approach to the target."""

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise UserError(f"--recipe.target is an active ratio and must be in (0, 1], got {self.target}")
        if self.warmup_steps < 0:
            raise UserError(f"the target warm-up must be >= 0 steps, got {self.warmup_steps}")
        if not self.lr > 0:
            raise UserError(f"the Lagrange multipliers' learning rate must be > 0, got {self.lr}")
        if self.initial_lambda2 < 0:
            raise UserError(f"the initial λ2 must be >= 0, got {self.initial_lambda2}")


def _default_train() -> TrainConfig:
    # Masks move log α by ~lr per step under Adam: 0.1 lets a gate cross from open (3) to closed (< −2.4) in ~50
    # steps. A constant rate after warm-up keeps the Lagrangian's response the same late in training. Steps, lr and
    # the target warm-up were chosen on the validation split of the tiny base (docs/masks.md): slower rates leave
    # gates half-open (the test-time gate then scales neurons down instead of switching them off). A resumable
    # checkpoint every tenth of the run.
    return TrainConfig(steps=2400, batch_size=8, lr=0.1, warmup_steps=10, min_lr_ratio=1.0, eval_blocks=64,
                       checkpoint_every=240)


@dataclass
class MaskTrainConfig:
    """Everything mask training needs besides the base model and the data."""

    target: float = 0.5
    """Target active ratio: the fraction of FFN neurons a token uses, in (0, 1]."""
    masks: MaskConfig = field(default_factory=MaskConfig)
    """Experts per layer, routing and gate initialisation."""
    warmup_fraction: float = 0.3
    """Fraction of the steps over which the target ramps linearly from 1 (all open) to `target`."""
    lambda_lr: float = 0.05
    """Step size of the Lagrange multipliers' gradient ascent."""
    initial_lambda2: float = 100.0
    """λ2 at step 0: the quadratic penalty that damps the approach to the target (see
    upcycle.masks.method.lagrangian)."""
    block_size: int = 128
    """Tokens per training block."""
    train_routers: bool = False
    """Train the routers along with the gates (at `train.lr`). Off by default: the 'clusters' init already routes each
    token to its nearest centroid, and training the routers at the gates' rate scrambles that split (docs/masks.md,
    round 3). The 'open' init needs it on."""
    cluster_tokens: int = 32768
    """Training tokens whose FFN inputs the 'clusters' init clusters."""
    ffn_lr: float | None = None
    """Also fine-tune the masked layers' FFN weights, at this learning rate, on the same tokens (the FFN adapts to
    the neurons it keeps, as in pruning + fine-tune; masks.safetensors then holds the FFN weights too). None: the
    FFN stays frozen and the masks alone learn."""
    distill: float = 0.0
    """Weight of distillation from the dense base: the loss is (1 − distill)·LM loss + distill·KL(dense ‖ masked)
    over the next-token distributions, the recovery loss of Sheared-LLaMA and Minitron (the dense model's whole
    distribution teaches more per token than the label). 0: the LM loss alone; above 0 a frozen copy of the base is
    kept in memory and run once per step."""
    train: TrainConfig = field(default_factory=_default_train)
    """Optimisation settings of the shared loop; `train.lr` is the masks' and routers' learning rate."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise UserError(f"--recipe.warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.block_size < 2:
            raise UserError(f"--recipe.block_size must be >= 2 tokens, got {self.block_size}")
        if self.masks.init == "open" and not self.train_routers:
            raise UserError("--recipe.masks.init open starts from random routers; train them too "
                            "(--recipe.train_routers true)")
        if self.ffn_lr is not None and not self.ffn_lr > 0:
            raise UserError(f"--recipe.ffn_lr must be > 0 (or null), got {self.ffn_lr}")
        if not 0.0 <= self.distill <= 1.0:
            raise UserError(f"--recipe.distill is a loss weight in [0, 1], got {self.distill}")
        if self.cluster_tokens < 1:
            raise UserError(f"--recipe.cluster_tokens must be >= 1, got {self.cluster_tokens}")
        self.lagrangian()  # validates target, lambda_lr and initial_lambda2
        self.masks.check_reachable(self.target)

    def lagrangian(self) -> LagrangianConfig:
        """The controller's settings, with the warm-up in steps."""
        return LagrangianConfig(target=self.target, warmup_steps=round(self.warmup_fraction * self.train.steps),
                                lr=self.lambda_lr, initial_lambda2=self.initial_lambda2)


@dataclass
class BaselineSettings:
    """Settings of the baselines that the mask run's config does not fix."""

    moefication_experts: int = 8
    """Neuron clusters per FFN for MoEfication; a token uses round(target · experts) of them."""
    pruning_lr: float = 1e-3
    """Learning rate of the pruned FFNs' fine-tuning (same steps, batch and blocks as the mask run)."""
    calibration_tokens: int = 8192
    """Training tokens TEAL's thresholds are calibrated on."""

    def __post_init__(self) -> None:
        if self.moefication_experts < 1:
            raise UserError(f"--baselines.moefication_experts must be >= 1, got {self.moefication_experts}")
        if not self.pruning_lr > 0:
            raise UserError(f"--baselines.pruning_lr must be > 0, got {self.pruning_lr}")
