"""Training data: samples from the data layer → lazily encoded examples → right-padded batches, in a
deterministic, resumable order (a seeded permutation per epoch, entered at any sample position)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from tinymed.data import DataError, MedVQASample, load_dataset
from tinymed.models import IGNORE_INDEX, encode_for_training
from tinymed.train.config import FinetuneConfig

log = logging.getLogger("tinymed.train")


def load_training_samples(config: FinetuneConfig) -> tuple[list[MedVQASample], int]:
    """All configured dataset splits concatenated in order; returns (samples, rows skipped on load)."""
    samples: list[MedVQASample] = []
    skipped = 0
    for spec in config.datasets:
        result = load_dataset(
            spec.name, spec.path, spec.split, language=spec.language,
            skip_invalid=config.skip_invalid, limit=config.limit, **spec.loader_options,
        )
        for row in result.skipped:
            log.warning("skipped %s row %s: %s", row.file, row.row, row.reason)
        samples += result.samples
        skipped += len(result.skipped)
    if not samples:
        raise DataError("no training samples: every configured dataset split is empty")
    return samples, skipped


def preset_texts(samples: list[MedVQASample]) -> list[str]:
    """Text a preset tokenizer is trained on: every question and answer inside the template's words."""
    return [f"USER: {s.question} ASSISTANT: {s.answer}" for s in samples]


class VQATrainDataset(Dataset):
    """Encodes one sample per `__getitem__` (the image is read here, i.e. in the DataLoader worker).

    Each encoded example is kept in memory for the next epochs: its token ids, and its image's pixel
    values (shared by every question on that image) while they fit in `cache_bytes`. Later epochs then
    skip image decoding and the processor (measured 2026-12-03 on the demo's tiny model: 40% of a
    training step's time). An unreadable image yields `{"skipped": "<file> (row <id>)"}` and a warning
    instead of an error, every epoch."""

    def __init__(self, samples: list[MedVQASample], processor, cache_bytes: int = 0):
        self.samples = samples
        self.processor = processor
        self.cache_bytes = cache_bytes
        self._ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # sample index → (input_ids, labels)
        self._pixels: dict[str, torch.Tensor] = {}  # image reference → pixel_values
        self._pixel_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def text_lengths(self) -> list[int]:
        """Tokens of each sample's question + answer (the image tokens are the same for every sample)."""
        texts = [f"{s.question} {s.answer}" for s in self.samples]
        return [len(ids) for ids in self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        ids, pixels = self._ids.get(index), self._pixels.get(sample.image)
        if ids is not None and pixels is not None:
            return {"input_ids": ids[0], "labels": ids[1], "pixel_values": pixels}
        try:
            image = sample.load_image()
        except DataError as exc:
            log.warning("skipping sample: %s", exc)
            return {"skipped": sample.id}
        example = encode_for_training(self.processor, image, sample.question, sample.answer)
        self._keep(index, sample.image, example)
        return example

    def _keep(self, index: int, image: str, example: dict) -> None:
        pixels = example["pixel_values"]
        new_bytes = 0 if image in self._pixels else pixels.numel() * pixels.element_size()
        if self._pixel_bytes + new_bytes > self.cache_bytes:
            return
        self._ids[index] = (example["input_ids"], example["labels"])
        self._pixels.setdefault(image, pixels)
        self._pixel_bytes += new_bytes


@dataclass
class Collator:
    """Right-pads a list of examples: input_ids with `pad_id`, labels with IGNORE_INDEX, attention 0.

    The batch also lists the ids of skipped samples under "skipped" (possibly all of them: then the
    batch has no tensors)."""

    pad_id: int

    def __call__(self, examples: list[dict]) -> dict:
        good = [e for e in examples if "skipped" not in e]
        batch: dict = {"skipped": [e["skipped"] for e in examples if "skipped" in e]}
        if not good:
            return batch
        ids = [e["input_ids"] for e in good]
        pad = torch.nn.utils.rnn.pad_sequence
        batch["input_ids"] = pad(ids, batch_first=True, padding_value=self.pad_id)
        batch["labels"] = pad([e["labels"] for e in good], batch_first=True, padding_value=IGNORE_INDEX)
        batch["attention_mask"] = pad([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in good])
        return batch


class EpochSampler(Sampler[int]):
    """The samples of one epoch in a permutation seeded by (seed, stage, epoch), from `start` to `stop`.

    With `lengths` (tokens per sample) and `batch_size`, the permutation is length-grouped: each run of
    GROUP_BATCHES batches is sorted by length and cut into batches, whose order is then shuffled with the
    same seed — batches pad less (measured on VQA-RAD + SLAKE train at batch 8: 10% padded tokens → 0.4%)
    while every epoch still visits every sample once in a seeded, resumable order.

    `set_window` re-aims it between epochs (the DataLoader that holds it stays the same object, which
    `accelerate` has prepared and may shard across processes)."""

    GROUP_BATCHES = 50

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1):
        self.n, self.seed = n, seed
        self.lengths, self.batch_size = lengths, batch_size
        self.order: list[int] = list(range(n))
        self.start, self.stop = 0, n

    def set_window(self, stage: int, epoch: int, start: int = 0, stop: int | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + stage * 10_007 + epoch)
        self.order = torch.randperm(self.n, generator=generator).tolist()
        if self.lengths is not None:
            self.order = self._grouped(self.order, generator)
        self.start, self.stop = start, self.n if stop is None else min(stop, self.n)

    def _grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        size, group = self.batch_size, self.batch_size * self.GROUP_BATCHES
        batches: list[list[int]] = []
        for first in range(0, len(order), group):
            chunk = sorted(order[first : first + group], key=self.lengths.__getitem__)
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        last = batches.pop() if len(batches[-1]) < size else None  # a short batch stays last, as before
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [i for batch in batches + ([last] if last else []) for i in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order[self.start : self.stop])

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
