"""CLI commands of the sparse-MoE (Flan-MoE) method. Each signature is its command line (jsonargparse)."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path

from upcycle.data.instructions import MixtureConfig
from upcycle.data.splits import SplitConfig
from upcycle.moe.config import ExperimentConfig, MoEConfig, UpcycleConfig, default_moe
from upcycle.training.config import TrainConfig

log = logging.getLogger(__name__)


def moe_upcycle(base: str | None = None, out: str = "runs/moe", moe: MoEConfig | None = None,
                upcycle: UpcycleConfig = UpcycleConfig(), dtype: str = "float32") -> Path:
    """Sparse-upcycle a dense causal LM: every N-th MLP becomes E copies of itself plus a new router.

    Args:
        base: Dense Llama / Mistral / Qwen2 base: a Hugging Face directory or hub id (default: the shipped tiny Llama).
        out: Directory for the upcycled checkpoint (our format; see `upcycle moe export-mixtral` for a Mixtral one).
        moe: The MoE layers: experts, router, dispatch, capacity and auxiliary-loss weights (default: MoEConfig()'s
            8 experts, top-2; `--moe.help` lists the fields). Optional rather than a MoEConfig() default because
            MoEConfig fills top_k, normalize_gates and z_loss_coef from the router: a filled-in default would keep
            top-2 after `--moe.router switch`.
        upcycle: Which MLPs become MoE layers, and the copies' noise and seed.
        dtype: Weights dtype: float32 or bfloat16.
    """
    import torch

    from upcycle.models.base import load_base
    from upcycle.moe.checkpoint import save_moe_model
    from upcycle.moe.upcycling import upcycle_model

    moe = moe or MoEConfig()
    model, tokenizer = load_base(base, dtype=dtype)
    probe = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(upcycle.seed))
    probe = probe.to(next(model.parameters()).device)
    with torch.no_grad():
        dense_logits = model(input_ids=probe).logits
        indices = upcycle_model(model, moe, upcycle)
        drift = float((model(input_ids=probe).logits - dense_logits).abs().max())
    path = save_moe_model(model, out, moe, indices, upcycle, tokenizer=tokenizer)
    print(f"{path}: {len(indices)} MoE layers {indices} of {moe.num_experts} experts, router {moe.router} "
          f"(k={moe.top_k}); max |logit - dense logit| at step 0 = {drift:.2e}")
    return path


def moe_train(checkpoint: str, out: str, data: str = "stdlib", block_size: int = 256,
              train: TrainConfig = TrainConfig(steps=200, batch_size=8, lr=3e-4, warmup_steps=20),
              per_layer_stats: bool = False, text_field: str = "text",
              splits: SplitConfig = SplitConfig()) -> Path:
    """Train an upcycled checkpoint on a corpus with the shared loop; aux losses and routing stats every step.

    Args:
        checkpoint: Checkpoint made by `upcycle moe upcycle` (or a previous `upcycle moe train`).
        out: Directory for the trained checkpoint, with train.json (per-step loss, aux losses, routing statistics).
        data: Corpus: a folder of text files, a .txt/.jsonl/.parquet file, 'hf:NAME[:CONFIG][@SPLIT]', or 'stdlib'.
        block_size: Tokens per training block.
        train: Optimisation settings of the shared loop.
        per_layer_stats: Also log every MoE layer's statistics, not only their mean.
        text_field: Column holding the text in .jsonl/.parquet/hub data.
        splits: Held-out fractions (the split is by a hash of each document's text).
    """
    from transformers import AutoTokenizer

    from upcycle.data.blocks import corpus_blocks
    from upcycle.io import ensure_writable_dir, write_json
    from upcycle.moe.checkpoint import load_moe_model, read_moe_meta, save_moe_model
    from upcycle.moe.train import train_moe
    from upcycle.training.loop import is_main_process

    model, moe, indices = load_moe_model(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    blocks = corpus_blocks(tokenizer, data, splits, block_size, text_field=text_field)
    train_blocks, eval_blocks = blocks["train"], blocks.get("validation")
    work = ensure_writable_dir(Path(out).parent / f".{Path(out).name}.work")
    result = train_moe(model, moe, train_blocks, train, eval_blocks=eval_blocks, per_layer_stats=per_layer_stats,
                       checkpoint_dir=work)
    if not is_main_process():  # under DDP every rank holds the same weights; rank 0 saves them
        return Path(out)
    upcycle = read_moe_meta(checkpoint).get("upcycle")
    path = save_moe_model(model, out, moe, indices, UpcycleConfig(**upcycle) if upcycle else None, tokenizer)
    write_json(path / "train.json", {"command": "upcycle " + " ".join(sys.argv[1:]), "checkpoint": checkpoint,
                                     "data": data, "block_size": block_size, "train": asdict(train),
                                     "moe": moe.to_dict(), "result": result.to_dict()})
    final = result.evals[-1] if result.evals else {}
    print(f"{path}: {result.steps} steps, {result.tokens_per_second:.0f} tokens/s, "
          f"validation loss {final.get('loss', float('nan')):.3f}")
    return path


def moe_export_mixtral(checkpoint: str, out: str) -> Path:
    """Export a top-2, every-layer checkpoint as a Mixtral that transformers loads with no custom code.

    Args:
        checkpoint: Checkpoint made by `upcycle moe upcycle` or `upcycle moe train`.
        out: Directory for the Mixtral checkpoint (config.json, safetensors, tokenizer).
    """
    from transformers import AutoTokenizer

    from upcycle.moe.checkpoint import load_moe_model
    from upcycle.moe.mixtral import export_mixtral

    model, moe, indices = load_moe_model(checkpoint)
    path = export_mixtral(model, moe, indices, out, tokenizer=AutoTokenizer.from_pretrained(checkpoint))
    difference = exported_logit_difference(model, path)
    print(f"{path}: Mixtral with {moe.num_experts} experts in each of {len(indices)} layers; plain transformers "
          f"loads it, max |logit - ours| = {difference:.2e}")
    return path


def exported_logit_difference(model, path: Path, seed: int = 0) -> float:
    """Max |logit| difference between our model and the export as plain `AutoModelForCausalLM` loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype).eval()
    probe = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((exported(input_ids=probe).logits - model(input_ids=probe).logits).abs().max())


def moe_inspect(checkpoint: str, data: str = "stdlib", blocks: int = 16, block_size: int = 256,
                split: str = "validation", text_field: str = "text") -> dict:
    """Routing statistics of a checkpoint on held-out blocks: tokens per expert, utilisation, drops, entropy.

    Args:
        checkpoint: Checkpoint made by `upcycle moe upcycle` or `upcycle moe train`.
        data: Corpus spec, as for `upcycle moe train`.
        blocks: Held-out blocks to route (one batch).
        block_size: Tokens per block.
        split: train, validation or test.
        text_field: Column holding the text in .jsonl/.parquet/hub data.
    """
    import json

    import torch
    from transformers import AutoTokenizer

    from upcycle.data import load_documents, split_documents
    from upcycle.data.packing import pack, tokenize
    from upcycle.errors import UserError
    from upcycle.moe.checkpoint import load_moe_model
    from upcycle.moe.collector import collect_routing
    from upcycle.moe.train import real_token_mask

    model, _, _ = load_moe_model(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    documents = split_documents(load_documents(data, text_field=text_field)).get(split)
    if not documents:
        raise UserError(f"--data {data}: no documents in split {split!r}")
    inputs, labels = pack(tokenize(tokenizer, [d.text for d in documents]), block_size, tokenizer.pad_token_id)
    inputs, labels = inputs[:blocks], labels[:blocks]
    mask = real_token_mask(labels)
    with torch.no_grad(), collect_routing(model, padding_mask=mask) as collector:
        model(input_ids=inputs, attention_mask=mask)
    report = {record.name: record.stats.to_dict() for record in collector.records if record.stats is not None}
    print(json.dumps(report, indent=2))
    return report


def moe_experiment(out: str = "runs/moe-experiment", base: str | None = None,
                   mixture: MixtureConfig = MixtureConfig(), moe: MoEConfig = default_moe(), every: int = 2,
                   seeds: list[int] = [0, 1, 2],  # noqa: B006 (jsonargparse reads the default; never mutated)
                   block_size: int = 128,
                   instruct: TrainConfig = ExperimentConfig().instruct,
                   finetune: TrainConfig = ExperimentConfig().finetune, eval_examples: int = 150,
                   threads: int | None = 1) -> dict:
    """Flan-MoE: dense vs MoE of equal FLOPs per token, each fine-tuned on held-out tasks with and without
    instruction tuning first; seeds, 95% CIs, results.json and report.md. Resumable: rerun to continue.

    Args:
        out: Run directory (finished cells in it are not rerun).
        base: Dense base (default: the shipped tiny Llama).
        mixture: Instruction data: 'stdlib' (code tasks made with ast), a folder of .py files, a .jsonl file or
            'hf:NAME'; prompt/response/task fields; training and held-out task types.
        moe: The MoE layers (default: Switch top-1 over 4 upcycled full-size experts, capacity dispatch, so the
            FLOPs per token equal the dense model's).
        every: Upcycle every N-th MLP.
        seeds: Seeds (>= 3 for confidence intervals).
        block_size: Tokens per training row (whole examples packed; longer examples dropped).
        instruct: Instruction-tuning settings of the shared loop.
        finetune: Fine-tuning settings on the held-out task types.
        eval_examples: Test examples scored per held-out task type.
        threads: torch intra-op threads (1 suits the tiny default models on a shared CPU: a second thread mostly
            waits; None: torch's default). Does not change the results' settings.
    """
    import torch

    from upcycle.moe.experiment import run_experiment

    if threads is not None:
        torch.set_num_threads(threads)

    config = ExperimentConfig(base=base, mixture=mixture, moe=moe, every=every, seeds=list(seeds),
                              block_size=block_size, instruct=instruct, finetune=finetune,
                              eval_examples=eval_examples)
    results = run_experiment(out, config)
    print(f"{Path(out) / 'report.md'}\n{results['answer']}")
    return results
