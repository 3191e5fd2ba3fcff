"""Dataset loaders, registry, export and `tinymed data stats/export`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_path
from PIL import Image
from typer.testing import CliRunner

from tinymed.cli.data import data_app
from tinymed.data import (
    AnswerType,
    DataError,
    DatasetSpec,
    dataset_stats,
    load_dataset,
    load_many,
    write_conversation,
)
from tinymed.data.carve import training_split_for
from tinymed.data.vqarad import load_vqarad, natural_frame_question
from tinymed.data.rows import LoadOptions

TINYMED = Path(sys.executable).with_name("tinymed")


def _png(color: int = 128, size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _counts(result) -> tuple[int, int, int]:
    stats = dataset_stats(result)
    return stats.n, stats.open, stats.closed


def _stats_json(*args: str) -> dict:
    result = CliRunner().invoke(data_app, ["stats", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- real data --------------------------------------------------------------------------------


@pytest.mark.real_data
def test_vqarad_both_layouts_give_the_official_test_split():
    folder = shared_path("vqa-rad")
    split_files = load_dataset("vqa-rad", folder, "test")
    original = load_dataset("vqa-rad", folder, "test", layout="original")
    assert _counts(split_files) == (451, 179, 272)
    assert _counts(original) == (451, 179, 272)
    assert split_files.source.endswith("testset.json")
    assert original.source.endswith("VQA_RAD Dataset Public.json")
    assert _counts(load_dataset("vqa-rad", folder, "train"))[0] == 3064
    sample = split_files.samples[0]
    assert (sample.id, sample.question, sample.answer) == ("11", "Is there evidence of an aortic aneurysm?", "yes")
    assert sample.organ == "CHEST" and sample.question_type == "PRES" and sample.modality is None
    assert Path(sample.image).name == "synpic42202.jpg" and sample.load_image().mode == "RGB"


@pytest.mark.real_data
def test_vqarad_original_release_quirks_are_normalized():
    train = load_vqarad(shared_path("vqa-rad"), "train", LoadOptions(), layout="original")
    assert len(train.samples) == 2248 - 451
    assert all(isinstance(s.answer, str) and s.answer == s.answer.strip() for s in train.samples)
    assert "Other" not in {s.question_type for s in train.samples}  # "Other" -> "OTHER"


@pytest.mark.real_data
def test_vqarad_template_questions_rewritten_or_dropped_only_in_train():
    folder = shared_path("vqa-rad")
    released = load_dataset("vqa-rad", folder, "train").samples
    rewritten = load_dataset("vqa-rad", folder, "train", frame_questions="rewrite").samples
    dropped = load_dataset("vqa-rad", folder, "train", frame_questions="drop").samples
    frames = [s for s in released if s.extra["phrase_type"] == "frame"]
    assert (len(released), len(frames), len(dropped)) == (3064, 1267, 3064 - 1267)
    assert [s.id for s in rewritten] == [s.id for s in released]
    assert all(s.extra["phrase_type"] != "frame" for s in dropped)
    by_id = {s.id: s for s in rewritten}
    assert not any("/" in by_id[s.id].question for s in frames if "vertebral/basilar" not in s.question)
    assert all(by_id[s.id] == s for s in released if s.extra["phrase_type"] != "frame")
    test = load_dataset("vqa-rad", folder, "test").samples
    assert load_dataset("vqa-rad", folder, "test", frame_questions="rewrite").samples == test


@pytest.mark.parametrize("template, natural", [
    ("Is/Are the kidneys normal?", "Are the kidneys normal?"),
    ("Is/Are the mass heterogeneous?", "Is the mass heterogeneous?"),
    ("Is/Are there a pneumothorax?", "Is there a pneumothorax?"),
    ("Is/Are there air in the bowels?", "Is there air in the bowels?"),
    ("Is/Are the masses located near/in the aorta?", "Are the masses located in the aorta?"),
    ("Where is/are the most infiltrates  located?", "Where are the most infiltrates located?"),
    ("Is/Are the L sided lesion enhancing? -yes/no", "Is the L sided lesion enhancing?"),
    ("How wide is/are the heart compared to the thorax? - open", "How wide is the heart compared to the thorax?"),
    ("Is/Are there there hemorrhage  in the patient's kidneys ?", "Is there hemorrhage in the patient's kidneys?"),
    ("How many kidneys are present/visualized in the image?", "How many kidneys are present in the image?"),
    ("Is/Are there dependent layering in the horns??", "Is there dependent layering in the horns?"),
])  # fmt: skip
def test_natural_frame_question_worked_examples(template, natural):
    assert natural_frame_question(template) == natural


def test_loader_options_reach_the_loader_and_unknown_ones_are_named(tmp_path):
    frame = {"qid": 1, "image_name": "i.jpg", "image_organ": "HEAD", "answer": "no", "answer_type": "CLOSED",
             "question_type": "PRES", "question": "Is/Are there a cyst? -yes/no", "phrase_type": "frame"}
    _write_json(tmp_path / "trainset.json", [frame, {**frame, "qid": 2, "phrase_type": "freeform"}])
    _write_json(tmp_path / "testset.json", [])
    spec = DatasetSpec(name="vqa-rad", path=str(tmp_path), split="train",
                       loader_options={"frame_questions": "rewrite"})
    [result] = load_many([spec])
    assert [s.question for s in result.samples] == ["Is there a cyst?", "Is/Are there a cyst? -yes/no"]
    with pytest.raises(DataError, match="vqa-rad has no loader option 'frames'; it accepts layout, frame_questions"):
        load_dataset("vqa-rad", tmp_path, "train", frames="drop")
    with pytest.raises(DataError, match="frame_questions must be keep, rewrite or drop, not 'fix'"):
        load_dataset("vqa-rad", tmp_path, "train", frame_questions="fix")
    with pytest.raises(DataError, match="slake has no loader option 'layout'; it accepts none"):
        load_dataset("slake", tmp_path, "train", layout="original")


@pytest.mark.real_data
def test_slake_english_test_and_language_filter():
    folder = shared_path("slake")
    test = load_dataset("slake", folder, "test", check_images=True)
    assert _counts(test) == (1061, 645, 416)
    assert dataset_stats(test).images == 96
    assert {s.language for s in test.samples} == {"en"}
    assert _counts(load_dataset("slake", folder, "test", language="all"))[0] == 2094
    sample = test.samples[0]
    assert sample.modality and sample.organ and sample.content_type and "base_type" in sample.extra


@pytest.mark.real_data
def test_slake_missing_xmlab0_is_an_image_error_or_a_counted_skip():
    folder = shared_path("slake")
    assert len(load_dataset("slake", folder, "validation").samples) == 1053  # images not opened
    with pytest.raises(DataError, match=r"image not found.*xmlab0.*validate\.json, row 0"):
        load_dataset("slake", folder, "val", check_images=True)
    result = load_dataset("slake", folder, "validate", check_images=True, skip_invalid=True)
    assert len(result.samples) == 1043 and len(result.skipped) == 10
    assert all("xmlab0" in row.reason for row in result.skipped)


@pytest.mark.real_data
def test_stats_json_on_real_data_through_the_cli():
    vqarad = _stats_json("--dataset", "vqa-rad", "--path", str(shared_path("vqa-rad")))
    assert (vqarad["n"], vqarad["open"], vqarad["closed"], vqarad["skipped"]) == (451, 179, 272, 0)
    assert vqarad["by_question_type"]["PRES"] == 163 and vqarad["by_modality"] == {}
    train = _stats_json("--dataset", "vqa-rad", "--path", str(shared_path("vqa-rad")), "--split", "train")
    assert train["n"] == 3064
    slake = _stats_json("--dataset", "slake", "--path", str(shared_path("slake")))
    assert (slake["n"], slake["open"], slake["closed"], slake["images"]) == (1061, 645, 416, 96)
    assert set(slake["by_modality"]) == {"CT", "MRI", "X-Ray"}


@pytest.mark.real_data
def test_stats_subprocess_prints_one_json_object_and_fails_cleanly():
    folder = str(shared_path("slake"))
    ok = subprocess.run([TINYMED, "data", "stats", "--dataset", "slake", "--path", folder, "--split", "val",
                         "--check-images", "--skip-invalid", "--json"], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["skipped"] == 10
    bad = subprocess.run([TINYMED, "data", "stats", "--dataset", "slake", "--path", folder, "--split", "val",
                          "--check-images", "--json"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and bad.stdout == ""
    assert "xmlab0" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.real_data
def test_export_round_trip_vqarad_test(tmp_path):
    original = load_dataset("vqa-rad", shared_path("vqa-rad"), "test")
    out = tmp_path / "export" / "vqarad_test.json"
    write_conversation(original.samples, out)
    reloaded = load_dataset("llava-med", out, "test", check_images=True)
    key = lambda s: (s.id, s.question, s.answer, s.answer_type, s.image, s.organ, s.question_type)  # noqa: E731
    assert [key(s) for s in reloaded.samples] == [key(s) for s in original.samples]
    assert {s.dataset for s in reloaded.samples} == {"vqa-rad"}
    assert reloaded.samples[0].extra == {"phrase_type": "freeform"}
    records = json.loads(out.read_text())
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")


def test_load_many_loads_each_spec(tmp_path):
    _write_json(tmp_path / "test.json", [_record("a", "img.png", "Q?", "yes")])
    _write_json(tmp_path / "train.json", [_record("b", "img.png", "Q?", "lung"), _record("c", "img.png", "Q?", "no")])
    results = load_many([DatasetSpec(name="llava-med", path=str(tmp_path)),
                         DatasetSpec(name="llava-med", path=str(tmp_path), split="train")])  # fmt: skip
    assert [len(r.samples) for r in results] == [1, 2]


# --- conversation format -------------------------------------------------------------------------


def _record(rid: str, image: str, question: str, answer: str, **extra) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": turns, **extra}


def _write_json(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_conversation_quirks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png())
    records = [
        _record("1", "a.png", "Is there a mass?", "Yes", answer_type="closed", modality="CT", qid=7),
        _record("2", "a.png", "What organ?", "liver", answer_type="Open"),
        {"id": 3, "image": "a.png", "conversations": [{"value": "What plane?\n<image>"}, {"value": "axial"}]},
        _record("4", "a.png", "Is it normal?", "no"),  # no answer_type: yes/no -> CLOSED
        _record("5", "a.png", "Size?", "2 cm", answer_type="yes/no", language="zh"),
    ]
    result = load_dataset("llava-med", _write_json(tmp_path / "test.json", records), check_images=True)
    by_id = {s.id: s for s in result.samples}
    assert set(by_id) == {"1", "2", "3", "4"}  # "5" is Chinese, filtered by language="en"
    assert by_id["1"].question == "Is there a mass?" and by_id["1"].answer_type == AnswerType.CLOSED
    assert by_id["1"].modality == "CT" and by_id["1"].extra == {"qid": 7}
    assert by_id["2"].answer_type == AnswerType.OPEN
    assert (by_id["3"].question, by_id["3"].answer, by_id["3"].answer_type) == ("What plane?", "axial", AnswerType.OPEN)
    assert by_id["4"].answer_type == AnswerType.CLOSED
    assert by_id["1"].image == str(tmp_path / "images" / "a.png")  # found in the images/ subfolder
    assert all(s.dataset == "llava-med" and s.split == "test" for s in result.samples)
    chinese = load_dataset("llava-med", tmp_path / "test.json", language="zh").samples
    assert [s.id for s in chinese] == ["1", "2", "3", "4", "5"]  # rows without a language always pass
    assert chinese[-1].answer_type == AnswerType.CLOSED and chinese[-1].language == "zh"


def test_conversation_jsonl_folder_and_multi_turn(tmp_path):
    multi = {"id": "m", "image": "x.png", "dataset": "slake", "split": "test", "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}  # fmt: skip
    (tmp_path / "val.jsonl").write_text(json.dumps(multi) + "\n\n" + json.dumps(_record("s", "x.png", "Q", "A")) + "\n")
    result = load_dataset("llava-med", tmp_path, "validation", image_folder=tmp_path / "elsewhere")
    assert [(s.id, s.question, s.answer) for s in result.samples] == [
        ("m#0", "Q1", "A1"), ("m#1", "Q2", "A2"), ("s", "Q", "A")]  # fmt: skip
    assert result.samples[0].dataset == "slake" and result.samples[2].dataset == "llava-med"
    assert result.samples[2].split == "validation"
    assert result.samples[0].image == str(tmp_path / "elsewhere" / "x.png")


def test_bad_rows_name_file_and_row_and_skip_invalid_counts_them(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    file = _write_json(tmp_path / "test.json", [
        _record("ok", "a.png", "Q?", "yes"),
        {"id": "no-image", "conversations": []},
        _record("bad-type", "a.png", "Q?", "yes", answer_type="MAYBE"),
        _record("missing-image", "gone.png", "Q?", "yes"),
        "not an object",
    ])  # fmt: skip
    with pytest.raises(DataError, match=r"missing key 'image' \(file .*test\.json, row 1\)"):
        load_dataset("llava-med", file)
    result = load_dataset("llava-med", file, skip_invalid=True)
    assert [s.id for s in result.samples] == ["ok", "missing-image"]
    assert [(r.row, r.reason) for r in result.skipped] == [
        (1, "missing key 'image'"),
        (2, "unknown answer type 'MAYBE' (expected OPEN or CLOSED)"),
        (4, "row is a str, expected an object"),
    ]


def test_missing_image_with_check_images(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    file = _write_json(tmp_path / "test.json", [
        _record("ok", "a.png", "Q?", "yes"),
        _record("missing", "gone.png", "Q?", "yes"),
        _record("broken", "broken.png", "Q?", "yes"),
    ])  # fmt: skip
    assert len(load_dataset("llava-med", file).samples) == 3  # images are not opened by default
    with pytest.raises(DataError, match=r"image not found: .*gone\.png \(file .*test\.json, row 1\)"):
        load_dataset("llava-med", file, check_images=True)
    result = load_dataset("llava-med", file, check_images=True, skip_invalid=True)
    assert [s.id for s in result.samples] == ["ok"]
    assert [r.row for r in result.skipped] == [1, 2] and "unreadable image" in result.skipped[1].reason


def test_invalid_files_and_names(tmp_path):
    (tmp_path / "test.json").write_text("[{")
    with pytest.raises(DataError, match=r"invalid JSON.*test\.json"):
        load_dataset("llava-med", tmp_path / "test.json", skip_invalid=True)
    (tmp_path / "bad.jsonl").write_text(json.dumps(_record("a", "a.png", "Q", "A")) + "\n{oops\n")
    result = load_dataset("llava-med", tmp_path / "bad.jsonl", skip_invalid=True)
    assert len(result.samples) == 1 and result.skipped[0].row == 2 and "JSON" in result.skipped[0].reason
    with pytest.raises(DataError, match="file not found"):
        load_dataset("llava-med", tmp_path / "absent.json")
    with pytest.raises(DataError, match=r"no 'train' split found"):
        load_dataset("llava-med", tmp_path, "train")
    with pytest.raises(DataError, match="unknown dataset 'mimic'; choose one of vqa-rad, slake, pathvqa"):
        load_dataset("mimic", tmp_path)


def test_vqarad_and_slake_malformed_rows(tmp_path):
    row = {"qid": 1, "image_name": "i.jpg", "image_organ": "HEAD", "answer": 5, "answer_type": "CLOSED ",
           "question_type": "Other", "question": "How many?", "phrase_type": "test_freeform"}  # fmt: skip
    _write_json(tmp_path / "VQA_RAD Dataset Public.json", [row, {**row, "qid": 2, "answer_type": None}])
    with pytest.raises(DataError, match=r"missing key 'answer_type' \(file .*Public\.json, row 1\)"):
        load_dataset("vqa-rad", tmp_path)
    result = load_dataset("vqa-rad", tmp_path, skip_invalid=True)
    sample = result.samples[0]
    assert (sample.answer, sample.answer_type, sample.question_type) == ("5", AnswerType.CLOSED, "OTHER")
    assert len(result.skipped) == 1
    with pytest.raises(DataError, match="no split 'val'"):
        load_dataset("vqa-rad", tmp_path, "val")
    _write_json(tmp_path / "slake" / "test.json", [{"qid": 1, "question": "Q", "answer": "A"}])
    with pytest.raises(DataError, match=r"missing key 'q_lang' \(file .*slake/test\.json, row 0\)"):
        load_dataset("slake", tmp_path / "slake")


# --- PathVQA / Hugging Face layout ---------------------------------------------------------------


def test_pathvqa_parquet_and_save_to_disk(tmp_path):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png(10), "path": None}, {"bytes": _png(200), "path": None}, {"bytes": _png(90), "path": None}],
            "question": ["is this a tumor?", "what stain is used?", "are nuclei visible?"],
            "answer": ["yes", "hematoxylin", "No"],
        },
        features=features,
    )
    (tmp_path / "hf" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hf" / "data" / "test-00000-of-00001.parquet"))
    result = load_dataset("pathvqa", tmp_path / "hf", "test", check_images=True)
    assert [(s.id, s.answer, s.answer_type) for s in result.samples] == [
        ("test-0", "yes", AnswerType.CLOSED), ("test-1", "hematoxylin", AnswerType.OPEN),
        ("test-2", "No", AnswerType.CLOSED)]  # fmt: skip
    assert result.samples[1].load_image().getpixel((0, 0)) == (200, 200, 200)
    assert result.samples[0].image.endswith("test-00000-of-00001.parquet#row=0")
    assert len(load_dataset("pathvqa", tmp_path / "hf", "test", limit=2).samples) == 2

    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "disk"))
    from_disk = load_dataset("pathvqa", tmp_path / "disk", "val")
    assert [s.question for s in from_disk.samples] == [s.question for s in result.samples]

    out = tmp_path / "conv" / "test.json"
    write_conversation(result.samples, out)
    pngs = sorted((tmp_path / "conv" / "test_images").glob("*.png"))
    assert len(pngs) == 3
    reloaded = load_dataset("pathvqa", tmp_path / "conv", "test", check_images=True)  # conversation folder
    assert [(s.question, s.answer, s.answer_type) for s in reloaded.samples] == [
        (s.question, s.answer, s.answer_type) for s in result.samples]  # fmt: skip
    assert not Path(json.loads(out.read_text())[0]["image"]).is_absolute()
    assert reloaded.samples[1].load_image().getpixel((0, 0)) == (200, 200, 200)


def test_pathvqa_missing_split(tmp_path):
    with pytest.raises(DataError, match="no 'test' split found"):
        load_dataset("pathvqa", tmp_path, "test")


# --- Hub, CLI ------------------------------------------------------------------------------------


def test_hub_offline_error_says_how_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("vqa-rad", "slake"):
        proc = subprocess.run([TINYMED, "data", "stats", "--dataset", name, "--json"],
                              capture_output=True, text=True, env=os.environ.copy(), timeout=60)  # fmt: skip
        assert proc.returncode == 1 and proc.stdout == ""
        assert f"--dataset {name} --path DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert "trainset.json" in proc.stderr or "imgs/" in proc.stderr


def test_cli_export_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    src = _write_json(tmp_path / "src" / "test.json", [_record("1", str(tmp_path / "a.png"), "Q?", "yes")])
    out = tmp_path / "out" / "x.json"
    runner = CliRunner()
    result = runner.invoke(data_app, ["export", "--dataset", "llava-med", "--path", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())[0]["answer_type"] == "CLOSED"
    stats = _stats_json("--dataset", "llava-med", "--path", str(out))
    assert (stats["n"], stats["closed"], stats["images"]) == (1, 1, 1)
    failed = runner.invoke(data_app, ["stats", "--dataset", "llava-med", "--path", str(tmp_path / "nope.json")])
    assert failed.exit_code == 1 and "file not found" in failed.stderr


def test_synthetic_is_the_conversation_loader_over_a_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "s0.png").write_bytes(_png())
    _write_json(tmp_path / "train.json", [_record("s0", "images/s0.png", "Which modality?", "CT", answer_type="OPEN",
                                                  modality="CT", question_type="MODALITY")])  # fmt: skip
    result = load_dataset("synthetic", tmp_path, "train", check_images=True)
    sample = result.samples[0]
    assert (sample.dataset, sample.split, sample.modality, sample.question_type) == ("synthetic", "train", "CT", "MODALITY")
    assert sample.image == str(tmp_path / "images" / "s0.png")


# --- validation parts carved by image ------------------------------------------------------------


def _conversation_rows(folder: Path, images: int, per_image: int) -> None:
    """`images` distinct PNG files, `per_image` questions about each, as train.json."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(images):
        (folder / "images" / f"img{i}.png").write_bytes(_png(i % 256))
        rows += [{"id": f"{i}-{q}", "image": f"img{i}.png", "answer_type": "CLOSED",
                  "conversations": [{"from": "human", "value": f"<image>\nIs {q} here?"},
                                    {"from": "gpt", "value": "yes" if q % 2 else "no"}]}
                 for q in range(per_image)]
    (folder / "train.json").write_text(json.dumps(rows))


def test_carved_parts_split_the_images_not_the_questions(tmp_path):
    _conversation_rows(tmp_path, images=400, per_image=3)
    val = load_dataset("llava-med", tmp_path, "train:val10").samples
    rest = load_dataset("llava-med", tmp_path, "train:rest10").samples
    assert len(val) + len(rest) == 1200
    val_images, rest_images = {s.image for s in val}, {s.image for s in rest}
    assert not val_images & rest_images
    assert 25 <= len(val_images) <= 55  # ≈10% of 400 images, each with all 3 of its questions
    assert len(val) == 3 * len(val_images)
    assert {s.split for s in val} == {"train:val10"} and {s.split for s in rest} == {"train:rest10"}
    wider = {s.image for s in load_dataset("llava-med", tmp_path, "train:val20").samples}
    assert val_images < wider  # a larger carve keeps the smaller one's images
    assert len(load_dataset("llava-med", tmp_path, "train:val10", limit=5).samples) == 5


def test_carve_of_images_embedded_in_a_table_goes_by_their_bytes(tmp_path):
    import datasets

    pixels = [_png(i) for i in range(60)]
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": pixels[i % 60], "path": None} for i in range(180)],  # each image in 3 rows
         "question": [f"q{i}" for i in range(180)], "answer": ["yes"] * 180},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    val = load_dataset("pathvqa", tmp_path, "train:val30").samples
    rest = load_dataset("pathvqa", tmp_path, "train:rest30").samples
    assert len(val) + len(rest) == 180 and len(val) % 3 == 0
    assert not {s.image_bytes for s in val} & {s.image_bytes for s in rest}


@pytest.mark.parametrize("split", ["train:val0", "train:val100", "train:valid10", "train:", ":val10"])
def test_bad_carve_names_say_what_a_carve_is(tmp_path, split):
    _conversation_rows(tmp_path, images=2, per_image=1)
    with pytest.raises(DataError, match="SPLIT:valP or SPLIT:restP"):
        load_dataset("llava-med", tmp_path, split)


@pytest.mark.parametrize(("evaluated", "trained"), [
    ("test", "train"), ("validation", "train"), ("train:val10", "train:rest10"), ("train:rest25", "train:val25"),
])
def test_an_evaluated_split_pairs_with_the_training_split_that_shares_no_image(evaluated, trained):
    assert training_split_for(evaluated) == trained


@pytest.mark.real_data
def test_pathvqa_validation_carve_on_the_real_train_split():
    path = shared_path("pathvqa")
    val = load_dataset("pathvqa", path, "train:val10").samples
    rest = load_dataset("pathvqa", path, "train:rest10").samples
    assert len(val) + len(rest) == 19_654
    val_images = {Path(s.image).name for s in val}
    assert not val_images & {Path(s.image).name for s in rest}
    assert (len(val), len(val_images)) == (1_886, 243)  # of 2,599 images: pinned, the carve has no seed
