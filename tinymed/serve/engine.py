"""The generation engine behind the batcher: one `model.generate` call per batch (the same
`prepare_inputs` + `generation_kwargs` as `generate_answers`, so temperature 0 gives the same answers),
with a per-row stopping criterion that streams each row's new text, applies its own `max_tokens` and
`stop` strings, and drops rows whose client left or whose time ran out. The work per generated token is
bounded by `max_tokens` and the (capped) stop strings, so a row past its deadline stops within one token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tinymed.models.generate import ENGINES, encode_prompt
from tinymed.serve.batching import Delta, Failed, Finished, Job, Started


class _Row:
    """One job's progress through a batch: what has been streamed and whether it is over."""

    def __init__(self, job: Job, prompt_tokens: int):
        self.job = job
        self.prompt_tokens = prompt_tokens
        self.sent = ""
        self.done = False

    def fail(self, status: int, message: str, code: str) -> None:
        self.done = True
        self.job.emit(Failed(status, message, code))

    def update(self, tokens: list[int], ended: bool, decode: Callable[[list[int]], str]) -> None:
        """Look at the row's new tokens after a step: stream what is safe to show, or finish the row."""
        job = self.job
        if job.cancelled.is_set():
            self.done = True
        elif job.expired():
            self.fail(504, "request timed out before the answer was complete", "timeout")
        else:
            text = decode(tokens).lstrip()
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=None)
            if cut is not None:
                self.finish(text[:cut].strip(), "stop", len(tokens))
            elif ended or len(tokens) >= job.max_tokens:
                self.finish(text.strip(), "stop" if ended else "length", len(tokens))
            else:
                self._stream(_safe_prefix(text, job.stop))

    def _stream(self, visible: str) -> None:
        if len(visible) > len(self.sent) and visible.startswith(self.sent):
            self.job.emit(Delta(visible[len(self.sent) :]))
            self.sent = visible

    def finish(self, text: str, reason: str, n_tokens: int) -> None:
        self._stream(text)
        self.done = True
        self.job.emit(Finished(text, reason, self.prompt_tokens, n_tokens))


def _safe_prefix(text: str, stops: list[str]) -> str:
    """The part of a growing answer that can be shown now: without trailing whitespace (the final answer
    is stripped), a half-decoded character, or a tail that may be the start of a stop string."""
    text = text.rstrip().rstrip("\ufffd")
    hold = max((_stop_start(text, s) for s in stops), default=0)
    return text[: len(text) - hold]


def _stop_start(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (shorter than `stop`; 0 if none)."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


class Engine:
    """Runs batches of jobs on a `LoadedModel` (call only from the batcher's worker thread)."""

    def __init__(self, lm):
        self.lm = lm
        tok = lm.processor.tokenizer
        self.end_ids = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        self.stream = ENGINES[lm.engine].stream  # None: batches go through model.generate together
        self.context_tokens: int | None = getattr(lm.model, "n_ctx", None) or getattr(
            getattr(lm.model.config, "text_config", lm.model.config), "max_position_embeddings", None)

    def prompt_tokens(self, image, question: str) -> int:
        """Tokens of the prompt for one image and question (image tokens included)."""
        return int(encode_prompt(self.lm, image, question)["input_ids"].shape[1])

    def answer_room(self, image) -> int | None:
        """The most tokens an answer can have: the context less the shortest prompt (a one-character
        question about `image`); None when the model states no context length."""
        if not self.context_tokens:
            return None
        return self.context_tokens - self.prompt_tokens(image, "?")

    def _decode(self, tokens: list[int]) -> str:
        return self.lm.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def _split(self, generated: list[int]) -> tuple[list[int], bool]:
        """New tokens up to the first end token (as `generate_batch` counts them), and whether it ended."""
        for i, token in enumerate(generated):
            if token in self.end_ids:
                return generated[:i], True
        return generated, False

    def _admit(self, rows: list[_Row]) -> None:
        for row in rows:
            if row.job.cancelled.is_set():
                row.done = True
            elif row.job.expired():
                row.fail(504, "request timed out while waiting in the queue", "timeout")
            elif self.context_tokens and row.prompt_tokens + row.job.max_tokens > self.context_tokens:
                row.fail(
                    400,
                    f"the prompt is {row.prompt_tokens} tokens (image included) and max_tokens is "
                    f"{row.job.max_tokens}: together more than the model's context of {self.context_tokens} tokens",
                    "context_length_exceeded",
                )
            else:
                row.job.emit(Started(row.prompt_tokens))

    def run_batch(self, jobs: list[Job]) -> None:
        """Generate for all jobs (together, or one after another with a streaming engine); every job gets
        exactly one final event (or none if cancelled)."""
        if self.stream is not None:
            for job in jobs:
                self._run_one(job)
            return
        from tinymed.models.generate import generation_kwargs, prepare_inputs

        inputs = prepare_inputs(self.lm, [j.image for j in jobs], [j.question for j in jobs])
        prompt_len = inputs["input_ids"].shape[1]
        rows = [_Row(job, int(n)) for job, n in zip(jobs, inputs["attention_mask"].sum(dim=1).tolist())]
        self._admit(rows)
        live = [r for r in rows if not r.done]
        if not live:
            return
        kwargs = generation_kwargs(self.lm, max(r.job.max_tokens for r in live), live[0].job.temperature,
                                   live[0].job.min_tokens, prompt_len)  # min_tokens: equal in a batch (Job.batch_key)
        stopper = StoppingCriteriaList([_RowStopper(self, rows, prompt_len)])
        with torch.inference_mode():
            out = self.lm.model.generate(**inputs, **kwargs, stopping_criteria=stopper)
        for row, generated in zip(rows, out[:, prompt_len:].tolist()):  # rows the criterion never closed
            if not row.done:
                tokens, ended = self._split(generated)
                row.finish(self._decode(tokens).strip(), "stop" if ended else "length", len(tokens))

    def _run_one(self, job: Job) -> None:
        """One job through the engine's `stream`: the row looks at the new ids after every step."""
        encoded = encode_prompt(self.lm, job.image, job.question)  # once: its ids are the prompt's length too
        row = _Row(job, int(encoded["input_ids"].shape[1]))
        self._admit([row])
        if row.done:
            return

        def step(ids: list[int]) -> bool:
            row.update(*self._split(ids), self._decode)
            return row.done

        new = self.stream(self.lm, encoded, job.max_tokens, job.temperature, step, min_new_tokens=job.min_tokens)
        if not row.done:
            row.finish(self._decode(new).strip(), "stop" if len(new) < job.max_tokens else "length", len(new))


class _RowStopper(StoppingCriteria):
    """After each step: every open row looks at its new tokens (streams, stops, fails); a row is done when
    it says so. A module-level class on purpose: one defined per batch would hold the batch's rows (and
    their images) in a reference cycle until the garbage collector runs."""

    def __init__(self, engine: Engine, rows: list[_Row], prompt_len: int):
        self.engine, self.rows, self.prompt_len = engine, rows, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        for row, generated in zip(self.rows, input_ids[:, self.prompt_len :].tolist()):
            if not row.done:
                row.update(*self.engine._split(generated), self.engine._decode)
        return torch.tensor([r.done for r in self.rows], device=input_ids.device)
