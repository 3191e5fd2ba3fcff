"""tinymed: small, fast, trustworthy medical multimodal LLMs (TinyLLaVA-Med, end to end)."""

__version__ = "0.1.0"
