"""vLLM as an optional backend for a run (not installable in this project's CPU environment, so not tested here).

vLLM serves many LoRA adapters on GPU with fused Punica kernels and a paged KV cache. A run's experts/ directory is
already what vLLM's filesystem LoRA resolver expects (one PEFT dir per adapter name), so requests naming
`expert-00003` load that adapter on first use:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_PLUGINS=lora_filesystem_resolver \
    VLLM_LORA_RESOLVER_CACHE_DIR=RUN/experts \
    vllm serve BASE --enable-lora --max-lora-rank 8 --max-loras 32 --max-cpu-loras 512

Caveats: the resolver only accepts adapters whose adapter_config.json `base_model_name_or_path` equals the served
model name (serve with `--served-model-name` set to that value, or rewrite it); model "auto" does not exist there,
so content routing must happen in front of vLLM (call the run's SequenceRouter, then send the chosen expert id);
and vLLM's own admission, limits and metrics replace ours. `vllm_command` prints the command for a run.
"""

from __future__ import annotations

import shlex

from upcycle.errors import UserError


def vllm_command(run: str, max_loras: int = 32, max_cpu_loras: int = 512, port: int = 8000) -> str:
    """The environment and `vllm serve` command that serves `run`'s base model with every expert on demand."""
    from upcycle.introvert.run import Run
    from upcycle.serving.adapters import read_spec

    opened = Run.open(run)
    experts = opened.expert_ids()
    if not experts:
        raise UserError(f"{opened.path} has no experts yet; train them before serving with vLLM")
    spec = read_spec(opened.expert_dir(experts[0]))
    served_name = spec.base_model or opened.base
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(opened.experts_dir)}
    args = ["vllm", "serve", opened.base, "--served-model-name", served_name, "--enable-lora",
            "--max-lora-rank", str(spec.rank), "--max-loras", str(max_loras), "--max-cpu-loras",
            str(max_cpu_loras), "--port", str(port)]
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(args)
