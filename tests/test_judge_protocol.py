"""Judge protocol: prompt construction, qa50 grouping, score parsing, summaries, inputs."""

from __future__ import annotations

import base64
import io
import json
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from conftest import shared_path
from tinymed.data import DataError
from tinymed.evaluate.judge import (
    JudgeItem,
    PredictionsFile,
    load_judge_items,
    parse_scores,
    read_llava_med_questions,
    reference_messages,
    review_messages,
    summarize_scores,
)
from tinymed.evaluate.judge.answers import item_image, question_messages
from tinymed.evaluate.judge.client import Usage, retry_after_s
from tinymed.evaluate.judge.questions import domain_of
from tinymed.evaluate.judge.runner import reference_source
from tinymed.evaluate.judge.summary import cost_usd, group_score

QA50 = ("llava-med-qa50", "llava_med_eval_qa50_qa.jsonl")


@pytest.mark.real_data
def test_qa50_items_and_groups():
    items = read_llava_med_questions(shared_path(*QA50))
    assert len(items) == 193
    types = [i.groups[0] for i in items]
    assert types.count("conversation") == 143 and types.count("detailed_description") == 50
    domains = [i.groups[1] for i in items]
    counts = {d: domains.count(d) for d in set(domains)}
    assert counts == {"chest_xray": 37, "mri": 38, "histology": 44, "gross": 34, "ct_scan": 40}
    assert all(i.gpt4_answer for i in items)
    assert len({i.id for i in items}) == 193


@pytest.mark.real_data
def test_qa50_review_prompt_is_llava_meds():
    item = read_llava_med_questions(shared_path(*QA50))[0]
    system, user = review_messages(item, item.gpt4_answer, "The conjunctiva.")
    assert system == {
        "role": "system",
        "content": "'You are a helpful and precise assistant for checking the quality of the answer.",
    }
    text = user["content"]
    assert user["role"] == "user"
    assert text.startswith(
        "[Context]\nFigure Caption:\nFig. 3: The gross histopathologic finding disclosed the portion of "
        "conjunctiva"
    )
    assert "\n\nFigure Context:\n\t- [{'tokens': 'Inflammatory cells were not found" in text
    assert "[Question]\nWhat is the organ in the image?\n<image>\n\n[Assistant 1]\nThe organ in the image is" in text
    assert "\n\n[End of Assistant 1]\n\n[Assistant 2]\nThe conjunctiva.\n\n[End of Assistant 2]\n\n[System]\n" in text
    order = [text.index(s) for s in ("[Context]", "[Question]", "[Assistant 1]", "[Assistant 2]", "[System]")]
    assert order == sorted(order)
    assert "rate the helpfulness, relevance, accuracy, level of details of their responses" in text
    assert "\n  Please first output a single line containing only two values" in text
    assert text.endswith("does not affect your judgment.\n\n")


def test_domain_takes_first_true_flag_in_llava_med_order():
    assert domain_of({"ct_scan": True, "histology": True, "gross": True, "mri": False}) == "histology"
    assert domain_of({"chest_xray": False, "mri": False}) is None


@pytest.mark.parametrize(
    "reply, scores",
    [
        ("8 6\nAssistant 1 is more detailed.", (8, 6)),
        ("  8   6  \n", (8, 6)),
        ("8,6", (8, 6)),
        ("8, 6.5\nexplanation", (8, 6.5)),
        ("**9 7**", (9, 7)),
        ("Scores: 8/10 and 5/10", (8, 5)),
        ("Here is my evaluation.\n\n7 4\nBecause...", (7, 4)),
        ("Assistant 1: 8\nAssistant 2: 3\nAssistant 1 covers more.", (8, 3)),
        ("Assistant 1: 8, Assistant 2: 6", (8, 6)),
        ("10 10", (10, 10)),
    ],
)
def test_parse_scores_tolerates_real_replies(reply, scores):
    assert parse_scores(reply) == scores


@pytest.mark.parametrize(
    "reply",
    ["", "I cannot judge this.", "Assistant 1 is better than 2 in 3 ways.", "11 4", "8", "Score 8\nmore later: 7"],
)
def test_parse_scores_rejects_what_has_no_clear_pair(reply):
    assert parse_scores(reply) is None


def test_mean_of_ratios_and_ratio_of_means_on_a_worked_example():
    # (reference, model): ratios 50%, 100%, 75% -> mean 75%; means 8 and 5.5 -> 68.75%
    score = group_score([(10, 5), (4, 4), (8, 6)])
    assert score.n == 3 and score.relative_n == 3
    assert score.reference_mean == pytest.approx(22 / 3)
    assert score.model_mean == pytest.approx(5.0)
    assert score.relative_score == pytest.approx(75.0)
    assert score.ratio_of_means == pytest.approx(5 / (22 / 3) * 100)  # 68.18...


def test_summary_groups_counts_failures_and_zero_references():
    rows = [
        (["conversation", "mri"], (10.0, 5.0)),
        (["conversation", "ct_scan"], (0.0, 3.0)),  # reference 0: out of the mean of ratios only
        (["detailed_description", "mri"], (4.0, 4.0)),
        (["detailed_description", "mri"], None),  # a failure
    ]
    groups = summarize_scores(rows)
    assert list(groups) == ["conversation", "detailed_description", "mri", "ct_scan", "overall"]
    overall = groups["overall"]
    assert (overall.n, overall.failures, overall.relative_n) == (3, 1, 2)
    assert overall.relative_score == pytest.approx(75.0)
    assert overall.ratio_of_means == pytest.approx((12 / 3) / (14 / 3) * 100)
    assert groups["ct_scan"].relative_score is None and groups["ct_scan"].reference_mean == 0
    assert groups["ct_scan"].ratio_of_means is None
    assert (groups["mri"].n, groups["mri"].failures) == (2, 1)
    assert groups["mri"].relative_score == pytest.approx(75.0)


def test_cost_from_prices_per_million_tokens():
    usage = Usage(prompt_tokens=2_000_000, completion_tokens=500_000, total_tokens=2_500_000)
    assert cost_usd(usage, 2.5, 10.0) == pytest.approx(10.0)
    assert cost_usd(usage, None, None) is None


def test_reference_source_modes():
    qa = JudgeItem(id="1", question="q", fig_label="Fig. 1", fig_caption="c", gpt4_answer="ref")
    vqa = JudgeItem(id="2", question="q", ground_truth="yes")
    captioned = JudgeItem(id="3", question="q", fig_label="Fig. 1", fig_caption="c")
    assert reference_source(qa, "auto") == "gpt4_answer"
    assert reference_source(vqa, "auto") == "ground_truth"
    assert reference_source(captioned, "auto") == "generated"
    assert reference_source(vqa, "generate") == "generated"
    with pytest.raises(ValueError, match="gpt4_answer"):
        reference_source(vqa, "gpt4_answer")
    with pytest.raises(ValueError, match="ground-truth"):
        reference_source(captioned, "ground_truth")


def test_caption_less_items_use_the_ground_truth_as_context():
    item = JudgeItem(id="2", question="Is there a fracture?", ground_truth="yes")
    user = review_messages(item, "yes", "no")[1]["content"]
    assert user.startswith("[Context]\nGround-truth answer:\nyes\n\n[Question]\nIs there a fracture?\n\n")
    ref_user = reference_messages(item)[1]["content"]
    assert "Ground-truth answer:\nyes" in ref_user and ref_user.endswith("do not mention the caption or the context.")


def test_predictions_file_reads_ids_and_both_answer_keys(tmp_path):
    path = tmp_path / "predictions.jsonl"
    rows = [
        {"id": "a", "prediction": "yes"},
        {"question_id": 3, "text": "LLaVA-Med style"},
        {"id": "b", "prediction": "", "error": "CUDA OOM"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = PredictionsFile(path)
    items = [JudgeItem(id=i, question="q") for i in ("a", "3", "b", "missing")]
    assert source.answer(items) == {"a": "yes", "3": "LLaVA-Med style"}
    assert source.errors == {"b": "CUDA OOM"}
    path.write_text('{"id": "a"}\n{"id": "b", "prediction": "x"}\n')
    with pytest.raises(DataError, match="row 1"):
        PredictionsFile(path)


def test_llava_med_question_file_with_a_bad_row_names_it(tmp_path):
    path = tmp_path / "q.jsonl"
    good = {"question_id": 1, "text": "Q", "fig_caption": "c", "domain": {}, "type": "conversation"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "question_id": None, "text": None}) + "\n")
    with pytest.raises(DataError, match=r"row 2"):
        read_llava_med_questions(path)


def test_question_messages_carry_the_image_as_a_data_url(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "x.png")
    item = JudgeItem(id="1", question="What is shown?\n<image>", image=str(tmp_path / "x.png"))
    (message,) = question_messages(item, item_image(item))
    url = message["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (4, 4) and decoded.getpixel((0, 0)) == (255, 0, 0)
    assert message["content"][1] == {"type": "text", "text": "What is shown?"}
    missing = JudgeItem(id="2", question="Q <image>", image=str(tmp_path / "absent.png"))
    assert item_image(missing) is None
    assert question_messages(missing, None) == [{"role": "user", "content": "Q"}]


def test_retry_after_header_forms():
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_s({"retry-after": later}) <= 30
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_dataset_input_in_conversation_format(tmp_path):
    pytest.importorskip("tinymed.data.registry", reason="the data registry has not landed yet")
    Image.new("RGB", (8, 8)).save(tmp_path / "img1.png")
    records = [
        {"id": "q1", "image": "img1.png", "answer_type": "OPEN", "modality": "CT",
         "conversations": [{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "liver"}]},
        {"id": "q2", "image": "img1.png", "answer_type": "CLOSED", "modality": "MRI",
         "conversations": [{"from": "human", "value": "Is it normal?\n<image>"}, {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "test.json").write_text(json.dumps(records))
    items, samples = load_judge_items(str(tmp_path / "test.json"), split="test")
    assert [(i.id, i.question, i.ground_truth, i.groups) for i in items] == [
        ("q1", "What organ?", "liver", ["CT"]),
        ("q2", "Is it normal?", "yes", ["MRI"]),
    ]
    assert set(samples) == {"q1", "q2"}
    assert reference_source(items[0], "auto") == "ground_truth"


@pytest.mark.real_data
def test_vqa_rad_items_take_the_ground_truth_and_group_by_organ():
    pytest.importorskip("tinymed.data.registry", reason="the data registry has not landed yet")
    items, samples = load_judge_items(str(shared_path("vqa-rad")), dataset="vqa-rad", split="test")
    assert len(items) == len(samples) == 451
    groups = [g for item in items for g in item.groups]
    assert {g: groups.count(g) for g in set(groups)} == {"CHEST": 174, "ABD": 158, "HEAD": 119}
    assert all(reference_source(item, "auto") == "ground_truth" for item in items)
    assert all(item.image and item.image.endswith(".jpg") for item in items)
