"""Hugging Face Hub copies of the public datasets, with a clear way out when offline.

- `flaviagiammarino/vqa-rad`, `flaviagiammarino/path-vqa`: tables with columns image, question,
  answer (splits train/test, and validation for path-vqa), loaded with `datasets.load_dataset`.
- `BoKelvin/SLAKE`: the official JSON files (`validate.json` renamed `validation.json`) plus
  `imgs.zip`; downloaded with `huggingface_hub.snapshot_download`, the zip extracted once into the
  tinymed cache ($TINYMED_CACHE, default ~/.cache/tinymed), then read like a local copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from tinymed.data.rows import split_names
from tinymed.data.sample import DataError

HUB_SPLITS = ("train", "validation", "test")


def cache_root() -> Path:
    """Where tinymed keeps derived files ($TINYMED_CACHE, default ~/.cache/tinymed)."""
    return Path(os.environ.get("TINYMED_CACHE", Path.home() / ".cache" / "tinymed"))


def is_hub_reference(path: str | Path | None, hub_id: str) -> bool:
    """True for path=None, or the Hub id itself when no local folder of that name exists."""
    return path is None or (str(path) == hub_id and not Path(path).exists())


def offline_error(name: str, hub_id: str, layout_help: str, exc: Exception) -> DataError:
    """How to load dataset `name` from a local copy instead of the unreachable Hub."""
    return DataError(
        f"cannot load {hub_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
        f"Offline? Use a local copy: `tinymed data stats --dataset {name} --path DIR` "
        f"(Python: load_dataset({name!r}, 'DIR')), where {layout_help}"
    )


def hub_table(name: str, hub_id: str, split: str, layout_help: str):
    """One split of a Hub table as a `datasets.Dataset` whose image column holds undecoded dicts."""
    import datasets

    hub_split = next((name for name in split_names(split) if name in HUB_SPLITS), split)
    try:
        table = datasets.load_dataset(hub_id, split=hub_split)
    except OSError as exc:  # ConnectionError, offline mode, not cached, HTTP errors
        raise offline_error(name, hub_id, layout_help, exc) from exc
    except ValueError as exc:  # unknown split
        raise DataError(f"{hub_id} has no split {split!r}: {exc}") from exc
    if isinstance(table.features.get("image"), datasets.Image):
        table = table.cast_column("image", datasets.Image(decode=False))
    return table


def download_slake(name: str, hub_id: str, layout_help: str) -> tuple[Path, Path]:
    """(folder with the split JSON files, image folder) of the Hub copy of SLAKE."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(hub_id, repo_type="dataset", allow_patterns=["*.json", "imgs.zip"]))
    except OSError as exc:
        raise offline_error(name, hub_id, layout_help, exc) from exc
    target = cache_root() / "hub" / hub_id.replace("/", "--")
    if not target.exists():
        _extract_atomic(folder / "imgs.zip", target)
    return folder, target / "imgs" if (target / "imgs").is_dir() else target


def _extract_atomic(archive: Path, target: Path) -> None:
    """Extract into a temp folder beside `target`, then rename (no half-extracted cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
