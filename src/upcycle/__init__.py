"""upcycle: turn a dense decoder LLM into a mixture of experts, and measure whether it was worth it."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["IntrovertExperts", "__version__"]


def __getattr__(name: str):
    # Lazy: `import upcycle` stays cheap (no torch) so the CLI's --help is instant.
    if name == "IntrovertExperts":
        from upcycle.introvert.model import IntrovertExperts

        return IntrovertExperts
    raise AttributeError(name)
