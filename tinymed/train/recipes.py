"""The recipe that retrains a shipped model: `recipe.json` beside its weights is a `FinetuneConfig`
whose dataset paths start with `{data}` (the folder holding vqa-rad/, slake/, pathvqa/ in their
official layouts) and whose `out_dir` is set at run time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tinymed.io import write_json_atomic
from tinymed.models.zoo import ADAPTER_WEIGHTS, RECIPE_FILE, ZOO
from tinymed.train.config import FinetuneConfig

DATA_SLOT = "{data}"


def zoo_recipe(name: str, data_root: str | Path, out_dir: str | Path) -> FinetuneConfig:
    """The FinetuneConfig that produced `name`'s shipped weights, reading data under `data_root`."""
    if name not in ZOO:
        raise KeyError(f"unknown model name {name!r}; tinymed ships: {', '.join(ZOO)}")
    raw = json.loads((ZOO[name].weights / RECIPE_FILE).read_text(encoding="utf-8"))
    for spec in raw["datasets"]:
        if spec.get("path"):
            spec["path"] = spec["path"].replace(DATA_SLOT, str(Path(data_root)))
    return FinetuneConfig.model_validate({**raw, "out_dir": str(out_dir)})


def ship_adapter(run_final: Path, name: str) -> Path:
    """Copy a finished run's adapter (LoRA + projector) into `name`'s shipped-weights folder."""
    missing = [f for f in ("adapter_config.json", ADAPTER_WEIGHTS) if not (run_final / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_final} is not a LoRA adapter folder (missing {', '.join(missing)}); "
                                "the recipe must train with keep_adapter")
    target = ZOO[name].weights
    shutil.copyfile(run_final / ADAPTER_WEIGHTS, target / ADAPTER_WEIGHTS)
    config = json.loads((run_final / "adapter_config.json").read_text(encoding="utf-8"))
    parts = ZOO[name].parts
    config["base_model_name_or_path"] = f"tinymed compose: {parts.llm} + {parts.vision} ({parts.image_size} px)"
    write_json_atomic(target / "adapter_config.json", config)
    return target
