"""Child process of `tinymed profile` on CPU: peak resident memory of loading + answering, from a clean start.

Usage: python -m tinymed.evaluate._profile_child CONFIG_JSON RESULT_JSON
Writes {"baseline_rss_bytes", "after_load_rss_bytes", "peak_rss_bytes"} to RESULT_JSON.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import psutil
import torch  # noqa: F401  (imported before the baseline so its RSS is not counted as the model's)
import transformers  # noqa: F401

from tinymed.evaluate.memory import ProfileConfig, question_set
from tinymed.io import write_json_atomic
from tinymed.models import generate_answers
from tinymed.quantize import load_for_inference


def main(config_file: str, result_file: str) -> None:
    config = ProfileConfig.model_validate_json(Path(config_file).read_text(encoding="utf-8"))
    images, questions, _ = question_set(config.questions, config.n_questions)
    process = psutil.Process()
    baseline = process.memory_info().rss
    lm = load_for_inference(config.model, device=config.device, quant=config.quant)
    after_load = process.memory_info().rss
    generate_answers(lm, images, questions, config.max_new_tokens, config.batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    write_json_atomic(result_file, {"baseline_rss_bytes": baseline, "after_load_rss_bytes": after_load, "peak_rss_bytes": peak})


if __name__ == "__main__":
    main(*sys.argv[1:3])
