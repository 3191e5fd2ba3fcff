"""Do a tower's image tokens carry what the synthetic questions ask? A linear probe per attribute.

For each tower the demo could use, the image tokens of every train/test image of the default synthetic set
are computed once (no LM), flattened, and a softmax regression is fit per attribute on the train images and
scored on the test images: modality, organ, plane, lesion count, the single lesion's side and size. A
tower whose tokens fail this probe leaves the projector and LM nothing to read. Towers: the random-init
SigLIP-style ViT of the `tiny` preset as the demo used it (never trained), the raw pixels at 16 px (a floor
that any tower should beat), and ImageNet EfficientNet-Lite0 at several input sizes.

    .venv/bin/python bench/demo_tower_probe.py --towers vit-random,vit-random-h8-w768,pixels-16,lite0-128
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from tinymed.data.synthetic import SynthConfig, Scene, _images_with_questions, ensure_default_dataset
from tinymed.models import TinyConfig

ATTRIBUTES = {  # name → the label of a scene, or None where the attribute does not apply
    "modality": lambda s: s.modality,
    "organ": lambda s: s.organ,
    "plane": lambda s: s.plane,
    "count": lambda s: str(len(s.lesions)),
    "side": lambda s: s.lesions[0].side if len(s.lesions) == 1 and s.lateral else None,
    "size": lambda s: s.lesions[0].size if len(s.lesions) == 1 else None,
}


def _scenes(config: SynthConfig, split_index: int, n_questions: int) -> list[Scene]:
    """The scene of every image of a split, in file order (the generator's own draw, without rendering)."""
    scenes, asked = [], 0
    for scene, questions, _ in _images_with_questions(config, split_index):
        scenes.append(scene)
        asked += len(questions)
        if asked >= n_questions:
            return scenes


def _tower(name: str):
    """(preprocess PIL → tensor, tokens(batch) → (batch, tokens × width)) for a tower name."""
    from tinymed.models import build_tiny_model
    from tinymed.models.efficientnet import lite0_image_processor, load_efficientnet_lite0

    if name == "pixels-16":
        return (lambda image: torch.tensor(np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR)) / 255.0).float(),
                lambda batch: batch.flatten(1))
    if name.startswith("vit-random"):
        model, processor = build_tiny_model(["USER: a ASSISTANT: b"] * 10, _vit_config(name))
        tower = model.model.vision_tower
        return (lambda image: processor.image_processor(image, return_tensors="pt")["pixel_values"][0],
                lambda batch: tower(batch, output_hidden_states=True).hidden_states[-1].flatten(1))
    height, _, width = name.split("-")[1].partition("x")  # lite0-96 (square) or lite0-96x128 (rows × columns)
    tower, processor = load_efficientnet_lite0(int(height)), lite0_image_processor(int(height), int(width or height))
    return (lambda image: processor(image, return_tensors="pt")["pixel_values"][0],
            lambda batch: tower(batch).last_hidden_state.flatten(1))


def _vit_config(name: str) -> TinyConfig:
    """`vit-random` is the tiny preset's tower; suffixes change it: `-h8` 8 heads (the demo now), `-w768` width
    768 (the random patch embedding then keeps all 768 values of a 16-px RGB patch), `-p8` 8-px patches, `-l4`
    4 layers (the preset: 2), `-s96` 96-px input (the preset: 64)."""
    sizes = {"h": "heads", "w": "vision_hidden", "p": "patch_size", "l": "vision_layers", "s": "image_size"}
    return TinyConfig(**{sizes[part[0]]: int(part[1:]) for part in name.split("-")[2:]})


def _features(name: str, paths: list, batch: int = 32) -> tuple[np.ndarray, float]:
    prepare, tokens = _tower(name)
    start, rows = time.process_time(), []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            images = torch.stack([prepare(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
            rows.append(tokens(images).numpy())
    return np.concatenate(rows), (time.process_time() - start) / len(paths)


def _probe(train_x: np.ndarray, train_y: list[str], test_x: np.ndarray, test_y: list[str]) -> float:
    """Test accuracy (%) of an L2-regularised softmax regression fit on standardised train features."""
    classes = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std, dtype=torch.float32)
    y = torch.tensor([classes.index(v) for v in train_y])
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        guess = layer(torch.tensor((test_x - mean) / std, dtype=torch.float32)).argmax(1).tolist()
    return 100.0 * float(np.mean([classes[g] == v for g, v in zip(guess, test_y)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", default="vit-random,pixels-16,lite0-96,lite0-128,lite0-224")
    args = parser.parse_args()
    config = SynthConfig()
    folder = ensure_default_dataset(config)
    splits = {}
    for index, split in enumerate(("train", "test")):
        scenes = _scenes(config, index, getattr(config, f"n_{split}"))
        splits[split] = (scenes, [folder / "images" / f"synth_{split}_{i:05d}.png" for i in range(len(scenes))])
    table = Table(title=f"linear probe on frozen image tokens: test accuracy (%), {len(splits['train'][0])} train / "
                        f"{len(splits['test'][0])} test images of the default synthetic set")
    for column in ("tower", "features", "CPU ms/image", *ATTRIBUTES):
        table.add_column(column, justify="right")
    for name in args.towers.split(","):
        (train_x, ms), (test_x, _) = (_features(name, splits[s][1]) for s in ("train", "test"))
        cells = []
        for label in ATTRIBUTES.values():
            train = [(x, label(s)) for x, s in zip(train_x, splits["train"][0]) if label(s) is not None]
            test = [(x, label(s)) for x, s in zip(test_x, splits["test"][0]) if label(s) is not None]
            cells.append(f"{_probe(np.stack([x for x, _ in train]), [v for _, v in train], np.stack([x for x, _ in test]), [v for _, v in test]):.1f}")
        table.add_row(name, str(train_x.shape[1]), f"{ms * 1000:.1f}", *cells)
        Console().print(f"{name}: {', '.join(cells)}", highlight=False)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
