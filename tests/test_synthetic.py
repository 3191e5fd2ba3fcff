"""The synthetic medical VQA generator: determinism, sizes, answer balance, ground truth in the pixels,
learnability at low resolution, the conversation format, the cache and the CLI."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from tinymed.cli.data_synth import synth
from tinymed.data.synthetic import (
    GENERATOR_VERSION,
    SynthConfig,
    default_cache_dir,
    ensure_default_dataset,
    generate_synthetic,
)

SMALL = SynthConfig(n_train=120, n_test=40, seed=3, image_size=96)
MEDIUM = SynthConfig(n_train=3000, n_test=1200, seed=11)  # ~14% are descriptions
BRIGHT = 0.93  # lesions are the only radiology pixels this bright (grey 237+)
DARK = 0.33  # tumour nuclei are the only histology pixels this dark (luminance)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "medium"
    generate_synthetic(out, MEDIUM)
    return out


def _records(folder: Path, split: str) -> list[dict]:
    return json.loads((folder / f"{split}.json").read_text(encoding="utf-8"))


def _question(record: dict) -> str:
    return record["conversations"][0]["value"]


def _answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def _pixels(folder: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / record["image"]).convert("RGB"), dtype=np.float64) / 255.0


def _lesion_mask(folder: Path, record: dict) -> np.ndarray:
    """Pixels that can only belong to a finding: near-white in radiology, near-black in histology."""
    pixels = _pixels(folder, record)
    if record["modality"] == "histology":
        return pixels.mean(axis=2) < DARK
    return pixels[..., 0] >= BRIGHT


def _blobs(mask: np.ndarray, min_pixels: int = 10) -> int:
    """Number of 4-connected components of a boolean mask with at least `min_pixels` (ignores noise)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, area = [start], 0
        seen[start] = True
        while stack:
            r, c = stack.pop()
            area += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        count += area >= min_pixels
    return count


def _by_template(records: list[dict], *kinds: str) -> list[dict]:
    """Records asked with any template of the given kinds (e.g. "pos_open")."""
    return [r for r in records if r["template"].split("/")[0] in kinds]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- files


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    generate_synthetic(tmp_path / "a", SMALL)
    generate_synthetic(tmp_path / "b", SMALL)
    generate_synthetic(tmp_path / "c", SMALL.model_copy(update={"seed": 4}))
    first, second, other = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert first == second
    assert first["train.json"] != other["train.json"]
    assert first["images/synth_train_00000.png"] != other["images/synth_train_00000.png"]


def test_sizes_count_questions_and_meta_is_complete(tmp_path):
    result = generate_synthetic(tmp_path, SMALL)
    train, test = _records(tmp_path, "train"), _records(tmp_path, "test")
    assert (result.n_train_questions, result.n_test_questions) == (len(train), len(test)) == (120, 40)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["config"] == SMALL.model_dump()
    assert meta["splits"]["train"]["questions"] == 120
    assert meta["splits"]["train"]["images"] == result.n_train_images == len({r["image"] for r in train})
    assert len(list((tmp_path / "images").glob("synth_*.png"))) == result.n_train_images + result.n_test_images
    assert sum(sum(c.values()) for c in meta["answer_distribution"]["test"].values()) == 40
    assert 2.5 <= 120 / result.n_train_images <= 5.5  # ~4 questions per image
    with Image.open(tmp_path / train[0]["image"]) as image:
        assert image.size == (96, 96)


def test_train_paired_asks_each_value_verification_both_ways_and_leaves_the_test_split_byte_identical(tmp_path):
    config = SMALL.model_copy(update={"n_train": 600})
    generate_synthetic(tmp_path / "plain", config)
    generate_synthetic(tmp_path / "paired", config.model_copy(update={"train_paired": True}))
    plain, paired = _files(tmp_path / "plain"), _files(tmp_path / "paired")
    assert plain["test.json"] == paired["test.json"]
    assert {k: v for k, v in plain.items() if "_test_" in k} == {k: v for k, v in paired.items() if "_test_" in k}
    verifications = ("organ_yesno/", "plane_yesno/", "pos_yesno/", "count_yesno/", "size_yesno/", "color_yesno/",
                     "modality_yesno/", "size_compare_yesno/")
    by_image: dict[tuple[str, str], list[dict]] = {}
    for record in _records(tmp_path / "paired", "train"):
        kind = record["template"].split("/")[0] + "/"
        if kind in verifications:
            by_image.setdefault((record["image"], kind), []).append(record)
    assert len(by_image) > 50
    cut = [group for group in by_image.values() if len(group) != 2]  # only where n_train ends the last image
    assert len(cut) <= 1
    for group in (g for g in by_image.values() if len(g) == 2):
        assert sorted(_answer(r) for r in group) == ["no", "yes"]
        assert group[0]["template"] == group[1]["template"]
        assert group[0]["conversations"][0]["value"] != group[1]["conversations"][0]["value"]
    assert default_cache_dir(config.model_copy(update={"train_paired": True})).name.endswith("-paired")


def test_train_emphasis_reweights_train_kinds_and_leaves_the_test_split_byte_identical(tmp_path):
    config = SMALL.model_copy(update={"n_train": 1200})
    generate_synthetic(tmp_path / "plain", config)
    generate_synthetic(tmp_path / "emph", config.model_copy(update={"train_emphasis": {"organ_yesno": 4.0}}))
    plain, emph = _files(tmp_path / "plain"), _files(tmp_path / "emph")
    assert plain["test.json"] == emph["test.json"]
    assert {k: v for k, v in plain.items() if "_test_" in k} == {k: v for k, v in emph.items() if "_test_" in k}

    def organ_yesno_share(folder: Path) -> float:
        return np.mean([r["template"].startswith("organ_yesno/") for r in _records(folder, "train")])

    assert organ_yesno_share(tmp_path / "emph") > 2.5 * organ_yesno_share(tmp_path / "plain")
    answers = Counter(_answer(r) for r in _records(tmp_path / "emph", "train") if r["template"].startswith("organ_yesno/"))
    assert abs(answers["yes"] - answers["no"]) < 0.2 * sum(answers.values())  # still balanced
    with pytest.raises(ValueError, match="unknown question kind 'organ'"):
        SynthConfig(train_emphasis={"organ": 2.0})


def test_regenerating_into_a_used_folder_leaves_only_the_new_set(tmp_path):
    generate_synthetic(tmp_path, SMALL.model_copy(update={"n_train": 400}))
    result = generate_synthetic(tmp_path, SMALL)
    images = list((tmp_path / "images").glob("synth_*.png"))
    assert len(images) == result.n_train_images + result.n_test_images


def test_splits_share_no_image(medium):
    digests = {
        split: {hash(Image.open(medium / r["image"]).tobytes()) for r in _records(medium, split)} for split in ("train", "test")
    }
    assert not digests["train"] & digests["test"]
    assert not {r["image"] for r in _records(medium, "train")} & {r["image"] for r in _records(medium, "test")}


# ------------------------------------------------------------------------------------- format


def test_records_are_in_the_conversation_format(medium):
    records = _records(medium, "test")
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert record["answer_type"] in ("OPEN", "CLOSED")
        assert record["dataset"] == "synthetic" and record["split"] == "test"
        assert (medium / record["image"]).is_file()
        if record["answer_type"] == "CLOSED" and "/" in record["template"] and "yesno" in record["template"]:
            assert gpt["value"] in ("yes", "no")
    assert len({r["id"] for r in records}) == len(records)
    open_share = Counter(r["answer_type"] for r in records)["OPEN"] / len(records)
    assert 0.3 <= open_share <= 0.5
    kinds = {r["question_type"] for r in records}
    assert kinds == {"MODALITY", "ORGAN", "PLANE", "PRES", "ABN", "POS", "COUNT", "SIZE", "COLOR", "DESC"}


def test_each_kind_has_at_least_three_paraphrases(medium):
    phrasings = defaultdict(set)
    for record in _records(medium, "train"):
        phrasings[record["template"].split("/")[0]].add(record["template"])
    assert all(len(templates) >= 3 for templates in phrasings.values()), phrasings


def test_loads_through_the_registry(medium):
    registry = pytest.importorskip("tinymed.data.registry")
    result = registry.load_dataset("synthetic", medium, split="test")
    assert len(result.samples) == len(_records(medium, "test"))
    sample = result.samples[0]
    assert sample.dataset == "synthetic" and sample.modality and not sample.question.startswith("<image>")
    assert sample.load_image().size == (128, 128)


# ------------------------------------------------------------------------------------- balance


def test_question_alone_predicts_closed_answers_no_better_than_chance(medium):
    """Most frequent train answer per exact question (then per template) scored on test."""
    train, test = _records(medium, "train"), _records(medium, "test")
    closed = [r for r in test if r["answer_type"] == "CLOSED"]
    for key in (_question, lambda r: r["template"]):
        answers = defaultdict(Counter)
        for record in train:
            answers[key(record)][_answer(record)] += 1
        hits = [answers[key(r)].most_common(1)[0][0] == _answer(r) for r in closed if key(r) in answers]
        assert np.mean(hits) <= 0.58


def test_every_closed_template_is_balanced(medium):
    meta = json.loads((medium / "meta.json").read_text())
    counts = meta["answer_distribution"]["train"]
    closed_templates = {r["template"] for r in _records(medium, "train") if r["answer_type"] == "CLOSED"}
    total = sum(sum(counts[t].values()) for t in closed_templates)
    majority = sum(max(counts[t].values()) for t in closed_templates)
    assert majority / total <= 0.58
    for template in closed_templates:
        n = sum(counts[template].values())
        assert max(counts[template].values()) / n <= 0.5 + 3 * 0.5 / np.sqrt(n), (template, counts[template])


# ---------------------------------------------------------------------------------- ground truth


def test_findings_are_in_the_pixels(medium):
    """Lesion pixels exist exactly when lesions do, and form as many blobs as the count says."""
    records = _by_template(_records(medium, "train"), "count_open")
    assert len(records) > 100
    for record in records:
        count = int(_answer(record))
        mask = _lesion_mask(medium, record)
        assert (mask.mean() > 0.002) == (count > 0), record["id"]
        if record["modality"] != "histology":
            assert _blobs(mask) == count, record["id"]


def test_laterality_follows_the_radiological_convention(medium):
    """'left' is the patient's left, which is drawn on the image's right."""
    records = _by_template(_records(medium, "train"), "pos_open", "pos_choice")
    assert len(records) > 40
    for record in records:
        columns = np.nonzero(_lesion_mask(medium, record))[1]
        on_image_right = columns.mean() > _pixels(medium, record).shape[1] / 2
        assert on_image_right == (_answer(record) == "left"), record["id"]


def test_larger_lesion_side_is_in_the_pixels(medium):
    records = _by_template(_records(medium, "train"), "size_compare_choice")
    assert len(records) > 20
    for record in records:
        mask = _lesion_mask(medium, record)
        half = mask.shape[1] // 2
        image_right_larger = mask[:, half:].sum() > mask[:, :half].sum()
        assert image_right_larger == (_answer(record) == "left"), record["id"]


def test_histology_is_coloured_and_radiology_is_grey(medium):
    for record in _records(medium, "test")[:200]:
        pixels = _pixels(medium, record)
        saturation = (pixels.max(axis=2) - pixels.min(axis=2)).mean()
        assert (saturation > 0.05) == (record["modality"] == "histology"), record["id"]


def _softmax_regression(features: np.ndarray, labels: list[str], steps: int = 300) -> callable:
    """A plain multinomial logistic regression (gradient descent); returns predict(features)."""
    classes = sorted(set(labels))
    targets = np.eye(len(classes))[[classes.index(label) for label in labels]]
    mean, std = features.mean(0), features.std(0) + 1e-6

    def design(x):
        return np.c_[(x - mean) / std, np.ones(len(x))]

    weights = np.zeros((features.shape[1] + 1, len(classes)))
    x = design(features)
    for _ in range(steps):
        logits = x @ weights
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        weights -= 0.5 * (x.T @ (probs - targets) / len(x) + 1e-3 * weights)
    return lambda new: [classes[i] for i in (design(new) @ weights).argmax(1)]


def _thumbnails(folder: Path, records: list[dict]) -> np.ndarray:
    return np.stack([
        np.asarray(Image.open(folder / r["image"]).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR),
                   dtype=np.float64).ravel() / 255.0
        for r in records
    ])  # fmt: skip


@pytest.mark.parametrize(("kinds", "minimum"), [
    (("modality_open", "modality_choice"), 0.9), (("organ_open",), 0.9), (("plane_open",), 0.9),
    (("pos_open", "pos_choice"), 0.8),  # fewer examples (one lesion, not sagittal, not histology)
])  # fmt: skip
def test_a_linear_model_on_16px_thumbnails_learns_the_visual_attributes(medium, kinds, minimum):
    """Learnability guard: the cues survive heavy downsampling (a tiny model can pick them up)."""
    train = _by_template(_records(medium, "train"), *kinds)
    test = _by_template(_records(medium, "test"), *kinds)
    predict = _softmax_regression(_thumbnails(medium, train), [_answer(r) for r in train])
    accuracy = np.mean([p == _answer(r) for p, r in zip(predict(_thumbnails(medium, test)), test)])
    assert accuracy >= minimum, accuracy


# ------------------------------------------------------------------------------------ cache, CLI


def test_default_dataset_is_generated_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMED_CACHE", str(tmp_path))
    first = ensure_default_dataset(SMALL)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert first.parent == tmp_path and first.name.startswith(f"synthetic-v{GENERATOR_VERSION}-seed3")
    assert ensure_default_dataset(SMALL) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp
    (first / "meta.json").unlink()  # a half-written folder is regenerated
    assert ensure_default_dataset(SMALL) == first and (first / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_default_cache_folder_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMED_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / f"synthetic-v{GENERATOR_VERSION}-seed0"
    emphasised = SynthConfig(n_train=100, train_emphasis={"plane_yesno": 3.0, "organ_yesno": 2.5})
    assert default_cache_dir(emphasised).name.endswith("-100-800-128px-q4-organ_yesnox2.5-plane_yesnox3")


def test_cli_writes_the_set_and_prints_a_summary(tmp_path):
    app = typer.Typer()
    app.command()(synth)
    app.command("unused")(lambda: None)  # keep `synth` a named subcommand
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--n-train", "30", "--n-test", "10",
                                      "--seed", "5", "--image-size", "64"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "30" in result.output
    assert len(_records(out, "train")) == 30 and len(_records(out, "test")) == 10
    assert json.loads((out / "meta.json").read_text())["config"]["seed"] == 5
    emphasised = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "e"), "--n-train", "30", "--n-test", "10",
                                          "--emphasis", "organ_yesno=3"])  # fmt: skip
    assert emphasised.exit_code == 0, emphasised.output
    assert json.loads((tmp_path / "e" / "meta.json").read_text())["config"]["train_emphasis"] == {"organ_yesno": 3.0}
    paired = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "p"), "--n-train", "30", "--n-test", "10",
                                      "--paired"])  # fmt: skip
    assert paired.exit_code == 0, paired.output
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["config"]["train_paired"] is True
    unknown = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "u"), "--emphasis", "organ=3"])
    assert unknown.exit_code != 0 and "unknown question kind 'organ'" in unknown.output
    malformed = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "m"), "--emphasis", "organ_yesno"])
    assert malformed.exit_code != 0 and "'organ_yesno' is not" in malformed.output
