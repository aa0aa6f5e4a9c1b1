"""Fixtures for serving tests: a fake run (tiny random Llama + a few random PEFT LoRA experts) and a stub router."""

from __future__ import annotations

from pathlib import Path

import pytest

N_EXPERTS = 4


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on 2 shared cores: a second intra-op thread only spins against other processes (100x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run directory with `N_EXPERTS` random r=4 LoRA experts on all projections (expert-00000 ...)."""
    from upcycle.serving.synthetic import write_synthetic_run

    path = tmp_path_factory.mktemp("run")
    write_synthetic_run(path, tiny_llama_dir, N_EXPERTS, rank=4, lora_alpha=8, b_std=0.2, seed=0)
    return path


class KeywordRouter:
    """Stub `SequenceRouter`: the expert whose number appears first in the text (as 'topic N'), else expert-00000."""

    def route(self, texts: list[str]) -> list[str]:
        out = []
        for text in texts:
            chosen = 0
            for n in range(N_EXPERTS):
                if f"topic {n}" in text:
                    chosen = n
                    break
            out.append(f"expert-{chosen:05d}")
        return out


@pytest.fixture
def stub_router() -> KeywordRouter:
    return KeywordRouter()
