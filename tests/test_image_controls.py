"""Image controls (`tinymed evaluate --image-control`): shuffled = a seeded derangement of the distinct images,
blank = uniform grey of the same size; recorded in the outputs, part of the resume key, shown in the report."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from conftest import save_tiny_model
from tinymed.analysis import ReportConfig, build_report, collect_variants
from tinymed.evaluate.image_controls import BLANK_RGB, derangement
from tinymed.evaluate.runner import PARTIAL, EvalConfig, evaluate
from tinymed.io import read_jsonl

# (question, answer, type, case): questions 0-1 and 3-4 share an image (one case each).
QA = [
    ("Is there a lesion?", "yes", "CLOSED", 0),
    ("What modality is this?", "ct", "OPEN", 0),
    ("Is there a lesion?", "no", "CLOSED", 1),
    ("Which side is the mass on?", "left", "OPEN", 2),
    ("Is this an MRI?", "no", "CLOSED", 2),
    ("Is this an MRI?", "yes", "CLOSED", 3),
]
COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]  # one per case
SIZES = [(40, 30), (36, 36), (50, 20), (24, 44)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), [q + " " + a for q, a, _, _ in QA] * 20, text_layers=2)


def write_dataset(folder, image_of_row) -> str:
    """A conversation-format test file; row i uses the image file `image_of_row(i, case)` (relative to `folder`)."""
    rows = [{"id": f"q{i}", "image": image_of_row(i, case), "answer_type": t,
             "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
            for i, (q, a, t, case) in enumerate(QA)]  # fmt: skip
    path = folder / "test.json"
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture()
def dataset(tmp_path):
    for case, (color, size) in enumerate(zip(COLORS, SIZES, strict=True)):
        Image.new("RGB", size, color).save(tmp_path / f"case{case}.png")
    return write_dataset(tmp_path, lambda i, case: f"case{case}.png")


def run(out, dataset, control="none", seed=0, **kw):
    config = EvalConfig(dataset="llava-med", path=dataset, out_dir=out, batch_size=4, max_new_tokens=3,
                        device="cpu", image_control=control, control_seed=seed, **kw)
    result = evaluate(config)
    return result, read_jsonl(out / "predictions.jsonl")


# --- The permutation ----------------------------------------------------------------------------------------


def test_derangement_is_a_seeded_bijection_without_fixed_points():
    keys = [f"img{i}.png" for i in range(50)]
    mapping = derangement(keys + keys[:10], seed=3)  # repeated keys are one case
    assert sorted(mapping) == sorted(keys) and sorted(mapping.values()) == sorted(keys)
    assert all(source != target for source, target in mapping.items())
    assert derangement(list(reversed(keys)), seed=3) == mapping  # order of the samples does not matter
    assert derangement(keys, seed=4) != mapping
    assert derangement(["a", "b"], seed=0) == {"a": "b", "b": "a"}
    with pytest.raises(ValueError, match="at least two distinct images; the evaluated samples have 1"):
        derangement(["a", "a"], seed=0)


# --- Local model ----------------------------------------------------------------------------------------------


def test_shuffled_shows_another_case_image_and_is_recorded(tiny_model, dataset, tmp_path):
    result, records = run(tmp_path / "s", dataset, "shuffled", seed=7, model=str(tiny_model))
    shown = {r["id"]: r["image_shown"] for r in records}
    assert all(s["control"] == "shuffled" and s["image"] != r["image"] for s, r in zip(shown.values(), records))
    assert shown["q0"] == shown["q1"] and shown["q3"] == shown["q4"]  # one case, one replacement image
    assert len({s["image"] for s in shown.values()}) == 4  # a permutation of the four cases' images
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["image_control"] == {"kind": "shuffled", "seed": 7} == result.metrics["image_control"]
    config = json.loads((tmp_path / "s" / "eval_config.json").read_text())
    assert config["image_control"] == {"kind": "shuffled", "seed": 7}
    assert "image_shown" not in metrics["by"]  # not a score breakdown

    _, again = run(tmp_path / "s2", dataset, "shuffled", seed=7, model=str(tiny_model))
    assert [r["image_shown"] for r in again] == [r["image_shown"] for r in records]
    # The model really saw those images: the same questions asked about them directly get the same answers.
    donor = {r["id"]: r["image_shown"]["image"] for r in records}
    swapped = write_dataset(tmp_path, lambda i, case: donor[f"q{i}"])
    _, direct = run(tmp_path / "direct", swapped, model=str(tiny_model))
    assert [r["prediction"] for r in direct] == [r["prediction"] for r in records]


def test_blank_shows_uniform_grey_of_the_same_size(tiny_model, dataset, tmp_path):
    _, records = run(tmp_path / "b", dataset, "blank", model=str(tiny_model))
    assert [r["image_shown"] for r in records] == [
        {"control": "blank", "rgb": [128, 128, 128], "size": list(SIZES[case])} for *_, case in QA]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["image_control"] == {"kind": "blank",
                                                                                          "seed": None}
    for case, size in enumerate(SIZES):
        Image.new("RGB", size, BLANK_RGB).save(tmp_path / f"grey{case}.png")
    grey = write_dataset(tmp_path, lambda i, case: f"grey{case}.png")
    _, direct = run(tmp_path / "direct", grey, model=str(tiny_model))
    assert [r["prediction"] for r in direct] == [r["prediction"] for r in records]


def test_real_run_records_its_own_image(tiny_model, dataset, tmp_path):
    _, records = run(tmp_path / "n", dataset, model=str(tiny_model))
    assert all(r["image_shown"] == {"control": "none", "image": r["image"]} for r in records)
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["image_control"] == {"kind": "none",
                                                                                          "seed": None}


def test_resume_never_mixes_controls_or_seeds(tiny_model, dataset, tmp_path):
    out = tmp_path / "eval"

    def interrupted(control, seed=0):
        calls = []

        def stop_after_first_batch(done, total):
            calls.append(done)
            if len(calls) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            evaluate(EvalConfig(model=str(tiny_model), dataset="llava-med", path=dataset, out_dir=out, batch_size=4,
                                max_new_tokens=3, device="cpu", image_control=control, control_seed=seed),
                     on_progress=stop_after_first_batch)
        assert len(read_jsonl(out / PARTIAL)) == 4

    def resumed_from(control, seed=0):
        seen = []
        evaluate(EvalConfig(model=str(tiny_model), dataset="llava-med", path=dataset, out_dir=out, batch_size=4,
                            max_new_tokens=3, device="cpu", image_control=control, control_seed=seed),
                 on_progress=lambda done, total: seen.append(done))
        records = read_jsonl(out / "predictions.jsonl")
        assert {r["image_shown"]["control"] for r in records} == {control}
        return seen[0]

    interrupted("none")
    assert resumed_from("shuffled") == 0  # a different control starts over
    interrupted("shuffled", seed=1)
    assert resumed_from("shuffled", seed=2) == 0  # so does another permutation
    interrupted("shuffled", seed=1)
    assert resumed_from("shuffled", seed=1) == 4  # the same control and seed continue
    interrupted("blank")
    assert resumed_from("blank") == 4


def test_shuffled_needs_two_images(tiny_model, tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "only.png")
    one = write_dataset(tmp_path, lambda i, case: "only.png")
    with pytest.raises(ValueError, match="at least two distinct images"):
        run(tmp_path / "x", one, "shuffled", model=str(tiny_model))


def test_cli_image_control(tiny_model, dataset, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "tinymed.cli", "evaluate", "--model", str(tiny_model), "--dataset", "llava-med",
         "--path", dataset, "--out", str(out), "--max-new-tokens", "2", "--device", "cpu",
         "--image-control", "shuffled", "--control-seed", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "image control: shuffled" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["image_control"] == {"kind": "shuffled", "seed": 5}
    bad = subprocess.run([sys.executable, "-m", "tinymed.cli", "evaluate", "--out", str(out), "--image-control", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--image-control" in bad.stderr


# --- Endpoint -------------------------------------------------------------------------------------------------


def describe_image(image: Image.Image, question: str) -> str:
    """The received image's size and top-left pixel."""
    return "{}x{} {},{},{}".format(*image.size, *image.getpixel((0, 0)))


def oracle(image: Image.Image, question: str) -> str:
    """A model that reads images perfectly: the right answer for its own case's image, else 'maybe' (which,
    unlike 'unknown', holds no 'no': LLaVA-Med's closed score is a substring test)."""
    answers = {(COLORS[case], q): a for q, a, _, case in QA}
    return answers.get((image.getpixel((0, 0)), question), "maybe")


@contextmanager
def chat_endpoint(answer_of):
    """An OpenAI-compatible chat endpoint on loopback answering `answer_of(image, question)`; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            parts = {part["type"]: part for part in body["messages"][0]["content"]}
            url = parts["image_url"]["image_url"]["url"]
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
            message = {"role": "assistant", "content": answer_of(image, parts["text"]["text"])}
            reply = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_endpoint_receives_the_controlled_images(dataset, tmp_path):
    def expected(case):
        return "{}x{} {},{},{}".format(*SIZES[case], *COLORS[case])

    with chat_endpoint(describe_image) as url:
        answers = {control: run(tmp_path / control, dataset, control, seed=3, endpoint=url, model_name="m")[1]
                   for control in ("none", "shuffled", "blank")}  # fmt: skip
    assert [r["prediction"] for r in answers["none"]] == [expected(case) for *_, case in QA]
    assert [r["prediction"] for r in answers["blank"]] == ["{}x{} 128,128,128".format(*SIZES[case]) for *_, case in QA]
    donor_case = [int(r["image_shown"]["image"].rsplit("case", 1)[1][0]) for r in answers["shuffled"]]
    assert [r["prediction"] for r in answers["shuffled"]] == [expected(case) for case in donor_case]
    assert all(d != case for d, (*_, case) in zip(donor_case, QA, strict=True))


# --- Report ---------------------------------------------------------------------------------------------------


def test_report_shows_control_runs_beside_the_real_run(dataset, tmp_path):
    variant = tmp_path / "runs" / "oracle"
    (variant / "eval").mkdir(parents=True)
    (variant / "variant.json").write_text(json.dumps({"name": "oracle", "quant": None, "model_dir": "served"}))
    with chat_endpoint(oracle) as url:
        metrics = {control: run(variant / "eval" / ("llava-med" if control == "none" else f"llava-med@{control}"),
                                dataset, control, seed=9, endpoint=url, model_name="m")[0].metrics["llava_med"]
                   for control in ("none", "shuffled", "blank")}  # fmt: skip
    assert metrics["none"]["closed_accuracy"] == 100 and metrics["blank"]["closed_accuracy"] == 0
    report = build_report(ReportConfig(run_dirs=[tmp_path / "runs"], out_dir=tmp_path / "report"))
    [point] = report.variants
    assert list(point.metrics) == ["llava-med"] and sorted(point.controls["llava-med"]) == ["blank", "shuffled"]
    text = (report.out_dir / "report.md").read_text()
    assert "### Image controls (ours)" in text
    assert "| oracle | as served | LLaVA-Med | real | 100.00 |  | 100.00 |  | 6 |" in text
    assert "| oracle | as served | LLaVA-Med | blank | 0.00 | 100.00 | 0.00 | 100.00 | 6 |" in text
    shuffled = metrics["shuffled"]
    assert (f"| oracle | as served | LLaVA-Med | shuffled (seed 9) | {shuffled['closed_accuracy']:.2f} | "
            f"{100 - shuffled['closed_accuracy']:.2f} | {shuffled['open_recall']:.2f} | "
            f"{100 - shuffled['open_recall']:.2f} | 6 |") in text
    assert text.index("| real |") < text.index("| shuffled (seed 9) |") < text.index("| blank |")


def test_collect_files_control_runs_by_their_recorded_control(tmp_path):
    def write_run(folder, control, closed, config=True):
        folder.mkdir(parents=True)
        metrics = {"n": 4, "llava_med": {"closed_accuracy": closed}, "image_control": {"kind": control, "seed": None}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        if config:
            (folder / "eval_config.json").write_text(json.dumps({"model": "m", "quant": "int8", "dataset": "slake"}))

    write_run(tmp_path / "real", "none", 80.0)  # flat `tinymed evaluate --out` folders merge by (model, quant)
    write_run(tmp_path / "any-name", "shuffled", 60.0)
    write_run(tmp_path / "again", "shuffled", 10.0)
    [variant] = collect_variants([tmp_path / "real", tmp_path / "any-name", tmp_path / "again"])
    assert variant.metric("slake", "llava_med.closed_accuracy") == 80.0
    assert variant.metric("slake", "llava_med.closed_accuracy", "shuffled") == 60.0
    assert f"{tmp_path / 'again'}: dataset 'slake' with image control 'shuffled' given twice; kept the first" in \
        variant.gaps
    write_run(tmp_path / "v" / "eval" / "vqa-rad@blank", "blank", 50.0, config=False)  # no eval_config.json
    [variant] = collect_variants([tmp_path / "v"])
    assert variant.metrics == {} and variant.metric("vqa-rad", "llava_med.closed_accuracy", "blank") == 50.0
