"""hyper-prag: Parametric RAG, knowledge injected into an LLM's feed-forward layers as LoRA weights."""

from hyper_prag.errors import HyperPragError

__version__ = "0.1.0"
__all__ = ["HyperPragError", "__version__"]
