"""Interchange with transformers' Mixtral: a top-2 token-choice upcycled Llama / Mistral *is* a Mixtral.

Weights move key by key with every shape asserted. Our experts store w_in [E, D, 2F] (gate | up) and w_out [E, F, D];
Mixtral's in-memory layout is gate_up_proj [E, 2F, D] (gate rows first) and down_proj [E, D, F], i.e. transposes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.io import atomic_directory
from upcycle.moe.config import MoEConfig
from upcycle.moe.layer import MoELayer

EXPORTABLE_BASES = ("llama", "mistral")


def check_exportable(base_config, moe: MoEConfig, moe_layers: list[int]) -> None:
    """Raise a UserError saying why this MoE model is not a Mixtral, if it is not."""
    if not moe.token_choice or moe.top_k != 2 or not moe.normalize_gates:
        raise UserError(f"only top-2 token-choice routers with renormalised gates export to Mixtral, not "
                        f"{moe.router!r} (k={moe.top_k}); use save_moe_model instead")
    if moe_layers != list(range(base_config.num_hidden_layers)):
        raise UserError("Mixtral has an MoE in every layer; this model was upcycled with every > 1 (save it in our "
                        "format with save_moe_model instead)")
    if base_config.model_type not in EXPORTABLE_BASES:
        raise UserError(f"a {base_config.model_type!r} base does not export to Mixtral (its attention differs); "
                        f"exportable bases: {', '.join(EXPORTABLE_BASES)}")
    if getattr(base_config, "attention_bias", False):
        raise UserError("a base with attention biases does not export to Mixtral, whose attention has none")


def mixtral_config(base_config, moe: MoEConfig):
    """The MixtralConfig of a Llama / Mistral base with every MLP upcycled into `moe.num_experts` experts."""
    from transformers import MixtralConfig

    config = base_config
    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range, rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings, sliding_window=getattr(config, "sliding_window", None),
        attention_dropout=getattr(config, "attention_dropout", 0.0), num_experts_per_tok=moe.top_k,
        num_local_experts=moe.num_experts, router_aux_loss_coef=moe.balance_loss_coef,
        # HF jitters the experts' input too, not only the router's: leave it off rather than change semantics.
        router_jitter_noise=0.0, rope_parameters=dict(config.rope_parameters),
    )


def mixtral_state_dict(state: dict[str, torch.Tensor], moe_layers: list[int]) -> dict[str, torch.Tensor]:
    """Our upcycled model's state dict under Mixtral's in-memory key names and layouts."""
    out = {}
    moe_prefixes = {f"model.layers.{i}.mlp." for i in moe_layers}
    for key, value in state.items():
        prefix = next((p for p in moe_prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        elif key == prefix + "router.weight":
            out[prefix + "gate.weight"] = value  # [E, D]
        elif key == prefix + "experts.w_in":
            out[prefix + "experts.gate_up_proj"] = value.transpose(1, 2)  # [E, D, 2F] -> [E, 2F, D]
        elif key == prefix + "experts.w_out":
            out[prefix + "experts.down_proj"] = value.transpose(1, 2)  # [E, F, D] -> [E, D, F]
        else:
            raise UserError(f"unexpected MoE parameter {key!r}; cannot map it to Mixtral")
    return out


def copy_state_checked(target: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy `source` into `target`'s state key by key, asserting the key sets and every shape match."""
    target_state = target.state_dict()
    tied = set(getattr(target, "_tied_weights_keys", None) or {}) if target.config.tie_word_embeddings else set()
    missing = sorted(set(target_state) - set(source) - tied)
    unexpected = sorted(set(source) - set(target_state))
    if missing or unexpected:
        raise UserError(f"state does not match the target model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, value in source.items():
            if target_state[key].shape != value.shape:
                raise UserError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(target_state[key].shape)}")
            target_state[key].copy_(value)


def to_mixtral(model: nn.Module, moe: MoEConfig, moe_layers: list[int]) -> nn.Module:
    """A transformers MixtralForCausalLM with our upcycled model's weights (same dtype)."""
    from transformers import MixtralForCausalLM

    check_exportable(model.config, moe, moe_layers)
    dtype = next(model.parameters()).dtype
    mixtral = MixtralForCausalLM(mixtral_config(model.config, moe)).to(dtype)
    copy_state_checked(mixtral, mixtral_state_dict(model.state_dict(), moe_layers))
    return mixtral.eval()


def export_mixtral(model: nn.Module, moe: MoEConfig, moe_layers: list[int], out: str | Path,
                   tokenizer=None) -> Path:
    """Save as a Mixtral checkpoint that `AutoModelForCausalLM.from_pretrained(out)` loads with no custom code."""
    mixtral = to_mixtral(model, moe, moe_layers)
    with atomic_directory(out) as tmp:
        mixtral.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def layer_from_mixtral_block(block: nn.Module, moe: MoEConfig) -> MoELayer:
    """Our MoE layer holding the weights of a transformers MixtralSparseMoeBlock."""
    from upcycle.moe.layer import build_moe_layer

    experts = block.experts
    layer = build_moe_layer(moe, dim=experts.hidden_dim, ffn_dim=experts.intermediate_dim,
                            activation=experts.config.hidden_act)
    source = {"router.weight": block.gate.weight, "experts.w_in": experts.gate_up_proj.transpose(1, 2),
              "experts.w_out": experts.down_proj.transpose(1, 2)}
    with torch.no_grad():
        for key, value in layer.state_dict().items():
            assert source[key].shape == value.shape, (key, source[key].shape, value.shape)
            value.copy_(source[key])
    return layer.to(block.gate.weight.dtype)
