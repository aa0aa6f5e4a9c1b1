"""What the learned mask experts turned into, measured with eval-mode gates over held-out tokens.

Each expert falls into one of three kinds (the MoM paper's taxonomy):
- shared: used by every token (a top-k router chose it for all of them) and keeps at least one neuron;
- token-specific: used by some tokens only, and keeps at least one neuron;
- inactive: never used, or its mask kept no neuron.
The same split is reported for neurons: used by every token, by some, by none.

Legend: T tokens, D model dim, I intermediate neurons, E experts.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from upcycle.data.packing import IGNORE_INDEX
from upcycle.errors import UserError
from upcycle.masks.method.layer import MaskedFFN
from upcycle.masks.method.surgery import masked_ffns

KINDS = ("shared", "token-specific", "inactive")


@dataclass
class LayerReport:
    """One masked FFN's experts and neurons over the analysed tokens."""

    name: str
    routing: str
    expert_kinds: list[str]
    """Kind of each expert (see module docstring)."""
    expert_usage: list[float]
    """Fraction of tokens that used each expert (top-k: chose it; soft: mean routing probability)."""
    expert_neurons: list[int]
    """Neurons with a non-zero eval gate in each expert's mask."""
    neuron_kinds: dict[str, int]
    """How many of the I neurons every token used ('shared'), some used ('token-specific'), none used ('inactive')."""
    active_ratio: float
    """Mean over tokens of the fraction of the I neurons used."""
    intermediate: int


@dataclass
class MaskAnalysis:
    """The whole model: one LayerReport per masked FFN."""

    tokens: int
    layers: list[LayerReport]

    @property
    def active_ratio(self) -> float:
        """Width-weighted mean active ratio over layers."""
        width = sum(r.intermediate for r in self.layers)
        return sum(r.active_ratio * r.intermediate for r in self.layers) / width

    def expert_counts(self) -> dict[str, int]:
        """Experts of each kind, summed over layers."""
        return {k: sum(r.expert_kinds.count(k) for r in self.layers) for k in KINDS}

    def unused_experts(self) -> dict[str, list[int]]:
        """Experts no analysed token used, per layer."""
        return {r.name: [e for e, u in enumerate(r.expert_usage) if u == 0.0] for r in self.layers}

    def always_used_experts(self) -> dict[str, list[int]]:
        """Experts every analysed token used (top-k layers only), per layer."""
        return {r.name: [e for e, u in enumerate(r.expert_usage) if u == 1.0 and r.routing == "topk"]
                for r in self.layers}

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "active_ratio": self.active_ratio, "experts": self.expert_counts(),
                "layers": [asdict(r) for r in self.layers]}


class _LayerTally:
    """Running counts for one layer."""

    def __init__(self, layer: MaskedFFN) -> None:
        self.layer = layer
        self.expert_use = torch.zeros(layer.num_experts, dtype=torch.float64)
        self.neuron_use = torch.zeros(layer.intermediate_size, dtype=torch.long)
        self.active = 0.0
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, keep: torch.Tensor) -> None:
        """x [B, L, D] input of the layer; keep [B·L] bool: positions to count."""
        flat = x.reshape(-1, x.shape[-1])[keep]  # [T, D]
        routing = self.layer.router(flat)
        mask = MaskedFFN.token_mask(routing, self.layer.eval_gates()) > 0  # [T, I]
        if routing.expert_idx is None:
            self.expert_use += routing.probs.sum(0).double()
        else:
            self.expert_use += torch.bincount(routing.expert_idx.reshape(-1), minlength=self.layer.num_experts)
        self.neuron_use += mask.sum(0)
        self.active += float(mask.double().mean(1).sum())
        self.tokens += flat.shape[0]

    def report(self, name: str) -> LayerReport:
        tokens = max(self.tokens, 1)
        usage = (self.expert_use / tokens).tolist()
        if self.layer.router.routing == "topk":  # counts, so exact 0 and 1 mean never and always
            usage = [float(c) / tokens for c in self.expert_use.round().long().tolist()]
        sizes = (self.layer.eval_gates() > 0).sum(1).tolist()
        kinds = []
        for use, size in zip(usage, sizes, strict=True):
            if use == 0.0 or size == 0:
                kinds.append("inactive")
            elif use == 1.0:
                kinds.append("shared")
            else:
                kinds.append("token-specific")
        neurons = {"shared": int((self.neuron_use == self.tokens).sum()),
                   "token-specific": int(((self.neuron_use > 0) & (self.neuron_use < self.tokens)).sum()),
                   "inactive": int((self.neuron_use == 0).sum())}
        return LayerReport(name, self.layer.router.routing, kinds, usage, [int(s) for s in sizes], neurons,
                           self.active / tokens, self.layer.intermediate_size)


@torch.no_grad()
def analyze_masks(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                  batch_size: int = 8) -> MaskAnalysis:
    """Classify every masked FFN's experts and neurons over held-out blocks inputs [N, L] (eval-mode gates).

    Positions whose label is IGNORE_INDEX (padding) are not counted.
    """
    layers = masked_ffns(model)
    if not layers:
        raise UserError("the model has no mask experts to analyse; load the masks first")
    if inputs.numel() == 0:
        raise UserError("no held-out tokens to analyse the masks on")
    was_training = model.training
    model.eval()
    tallies = {name: _LayerTally(layer) for name, layer in layers}
    keep = torch.ones(0, dtype=torch.bool)

    def hook(name):
        return lambda module, args, output: tallies[name].add(args[0], keep.to(args[0].device))

    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        for name, layer in layers:
            stack.callback(layer.register_forward_hook(hook(name)).remove)
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start:start + batch_size]
            keep = (labels[start:start + batch_size] != IGNORE_INDEX).reshape(-1) if labels is not None \
                else torch.ones(batch.numel(), dtype=torch.bool)
            model(input_ids=batch.to(device))
    model.train(was_training)
    reports = [tallies[name].report(name) for name, _ in layers]
    return MaskAnalysis(tokens=next(iter(tallies.values())).tokens, layers=reports)


def analysis_table(analysis: MaskAnalysis) -> str:
    """A markdown table: per layer, the achieved active ratio and how many experts and neurons are of each kind."""
    from upcycle.eval.report import markdown_table

    rows = []
    for r in analysis.layers:
        experts = [r.expert_kinds.count(k) for k in KINDS]
        rows.append([r.name, f"{r.active_ratio:.1%}", *experts, *(r.neuron_kinds[k] for k in KINDS), r.intermediate])
    header = ["layer", "active", *(f"{k} experts" for k in KINDS), *(f"{k} neurons" for k in KINDS), "neurons"]
    return markdown_table(header, rows)


def plot_experts(analysis: MaskAnalysis, path) -> None:
    """Per layer: experts of each kind, neurons of each kind with the active ratio, and each expert's usage."""
    from upcycle.eval.report import pyplot, save_figure

    plt = pyplot()
    layers = [r.name.removeprefix("model.").removesuffix(".mlp") for r in analysis.layers]
    x = range(len(layers))
    colors = {"shared": "tab:blue", "token-specific": "tab:orange", "inactive": "lightgrey"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    bottom = [0.0] * len(layers)
    for kind in KINDS:  # experts of each kind
        counts = [r.expert_kinds.count(kind) for r in analysis.layers]
        axes[0].bar(x, counts, bottom=bottom, color=colors[kind], label=kind)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    axes[0].set_title("experts by kind")
    axes[0].set_ylabel("experts")
    bottom = [0.0] * len(layers)
    for kind in KINDS:  # neurons of each kind, as a fraction of the layer
        share = [r.neuron_kinds[kind] / r.intermediate for r in analysis.layers]
        axes[1].bar(x, share, bottom=bottom, color=colors[kind], label=f"{kind} neurons")
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    axes[1].plot(x, [r.active_ratio for r in analysis.layers], "k^-", label="active per token")
    axes[1].set_title("neurons by kind, active ratio")
    axes[1].set_ylim(0, 1.05)
    usage = torch.tensor([r.expert_usage for r in analysis.layers]).t()  # [E, layers]
    image = axes[2].imshow(usage, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[2].set_title("fraction of tokens using each expert")
    axes[2].set_ylabel("expert")
    fig.colorbar(image, ax=axes[2])
    for ax in axes:
        ax.set_xticks(list(x), layers, rotation=30, fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
