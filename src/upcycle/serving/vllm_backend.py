"""vLLM as an optional backend for a run (not installable in this project's CPU environment, so not tested here).

vLLM serves many LoRA adapters on GPU with fused Punica kernels and a paged KV cache. A run's experts/ directory is
already what vLLM's filesystem LoRA resolver expects (one PEFT dir per adapter name), so requests naming
`expert-00003` load that adapter on first use:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_PLUGINS=lora_filesystem_resolver \
    VLLM_LORA_RESOLVER_CACHE_DIR=RUN/experts \
    vllm serve BASE --enable-lora --max-lora-rank 8 --max-loras 32 --max-cpu-loras 512

Caveats: the resolver only accepts adapters whose adapter_config.json `base_model_name_or_path` equals the served
model name (serve with `--served-model-name` set to that value, or rewrite it); model "auto" does not exist there,
so content routing must happen in front of vLLM (call the run's router, then send the chosen expert id);
and vLLM's own admission, limits and metrics replace ours. `vllm_command` prints the command for a run.
"""

from __future__ import annotations

import shlex

from upcycle.errors import UserError
from upcycle.serving.source import ServedModel


def vllm_command(run: str | ServedModel, max_loras: int = 32, max_cpu_loras: int = 512, port: int = 8000) -> str:
    """The environment and `vllm serve` command that serves `run`'s base model with every expert on demand.

    `run` is a directory `open_source` reads (an introvert run) or a ServedModel whose experts share one folder.
    """
    from upcycle.serving.adapters import read_spec
    from upcycle.serving.source import open_source

    served = run if isinstance(run, ServedModel) else open_source(run, router=False)
    where = served.root or served.experts_dir
    if not served.experts:
        raise UserError(f"{where} has no experts yet; train them before serving with vLLM")
    if served.experts_dir is None:
        raise UserError("vLLM's filesystem resolver reads every adapter from one folder, and these experts have none")
    spec = read_spec(served.experts[min(served.experts)])
    served_name = spec.base_model or served.base
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(served.experts_dir)}
    args = ["vllm", "serve", served.base, "--served-model-name", served_name, "--enable-lora",
            "--max-lora-rank", str(spec.rank), "--max-loras", str(max_loras), "--max-cpu-loras",
            str(max_cpu_loras), "--port", str(port)]
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(args)
