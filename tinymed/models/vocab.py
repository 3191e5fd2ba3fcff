"""Vocabulary trimming for edge exports: keep the tokens a deployment needs, drop the rest.

Gemma-3's 262,144-row embedding (tied to the LM head) is 63% of Gemma-3-270M's weights and its
LM-head matmul most of the work per decoded token. A trimmed export keeps, by original token id:

- the special pieces: control (chat template, BOS/EOS/pad), unknown, user-defined and byte-fallback
  pieces, except Gemma's `<unusedN>` placeholders;
- every token of the model's training data, encoded as training encodes it (prompt template with the
  image token, question, " answer", EOS);
- the `top_n` most frequent tokens of general English: the `wordfreq` package's English word list
  (frequencies pooled from Wikipedia, subtitles, news, books, web and social text), each word
  tokenized with a leading space and its frequency added to each of its tokens.

Test data never enters the choice. The kept ids stay in their original order, so every id below the
first dropped one keeps its value. At answer time the llama.cpp engine maps the HF tokenizer's ids to
kept rows; a prompt token that was dropped is re-spelled from kept pieces by llama.cpp's own
tokenizer over the trimmed vocabulary (byte pieces spell anything), and the model can only answer
with kept tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from tinymed.data import MedVQASample
from tinymed.models.features import answer_text
from tinymed.models.template import build_prompt

VOCABULARY_FILE = "vocabulary.json"
ENGLISH_WORDS = 50_000  # wordfreq's most frequent English words ranked into tokens
_NORMAL, _UNUSED = 1, 5  # SentencePiece piece types
_UNUSED_PIECE = re.compile(r"<unused\d+>")


@dataclass(frozen=True)
class VocabularyPlan:
    """Which source token ids a trimmed model keeps (ascending: kept row i is source id `kept[i]`)."""

    kept: list[int]
    source_size: int
    special: int  # kept because special (control, byte, user-defined)
    training: int  # kept because the training data uses them (and not special)
    english: int  # kept as general English (neither special nor in the training data)
    top_n: int
    english_words: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> VocabularyPlan:
        return cls(**raw)


def training_token_ids(processor, samples: Iterable[MedVQASample]) -> set[int]:
    """Every token id of the training sequences: `build_prompt` + " answer" + EOS, as training encodes them
    (the prompt's image token appears once here; training repeats it per image position)."""
    tokenizer = processor.tokenizer
    ids: set[int] = {tokenizer.eos_token_id}
    samples = list(samples)
    prompts = tokenizer([build_prompt(processor, s.question) for s in samples])["input_ids"]
    answers = tokenizer([answer_text(s.answer) for s in samples], add_special_tokens=False)["input_ids"]
    for row in (*prompts, *answers):
        ids.update(row)
    return ids


def english_token_ranking(tokenizer, words: int = ENGLISH_WORDS) -> list[int]:
    """Token ids by their frequency in general English, most frequent first: each of wordfreq's `words`
    most frequent English words, with a leading space, adds its frequency to each of its tokens."""
    try:
        from wordfreq import top_n_list, word_frequency
    except ImportError as exc:
        raise RuntimeError("vocabulary trimming ranks general-English tokens with wordfreq: "
                           "pip install 'tinymed[edge]'") from exc
    vocabulary = top_n_list("en", words)
    encoded = tokenizer([" " + w for w in vocabulary], add_special_tokens=False)["input_ids"]
    weight: dict[int, float] = {}
    for word, ids in zip(vocabulary, encoded):
        frequency = word_frequency(word, "en")
        for token in ids:
            weight[token] = weight.get(token, 0.0) + frequency
    return sorted(weight, key=lambda t: (-weight[t], t))


def plan_vocabulary(pieces: Sequence[str], types: Sequence[int], training_ids: set[int],
                    english_ranking: Sequence[int], top_n: int, english_words: int = ENGLISH_WORDS
                    ) -> VocabularyPlan:
    """The kept ids for a SentencePiece vocabulary (`pieces`/`types` by id; types as in SentencePiece:
    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    size = len(pieces)
    special = {i for i in range(size) if types[i] not in (_NORMAL, _UNUSED)
               and not _UNUSED_PIECE.fullmatch(pieces[i])}
    outside = sorted(i for i in training_ids if not 0 <= i < size)
    if outside:
        raise ValueError(f"training token ids {outside[:5]} are outside the {size}-token vocabulary")
    training = set(training_ids) - special
    english = [t for t in english_ranking[:top_n] if t not in special and t not in training]
    return VocabularyPlan(kept=sorted(special | training | set(english)), source_size=size, special=len(special),
                          training=len(training), english=len(english), top_n=top_n, english_words=english_words)


def trim_sentencepiece(proto, kept: Sequence[int]):
    """A copy of a SentencePiece ModelProto holding only the `kept` pieces, in that order, its special
    ids (unk/bos/eos/pad) renumbered to their kept rows."""
    trimmed = type(proto)()
    trimmed.CopyFrom(proto)
    del trimmed.pieces[:]
    for source in kept:
        piece = proto.pieces[source]
        trimmed.pieces.add(piece=piece.piece, score=piece.score, type=piece.type)
    row = {source: i for i, source in enumerate(kept)}
    spec = trimmed.trainer_spec
    for kind in ("unk", "bos", "eos", "pad"):
        source = getattr(proto.trainer_spec, f"{kind}_id")
        if source >= 0:
            if source not in row:
                raise ValueError(f"the kept vocabulary drops the {kind} token (id {source})")
            setattr(spec, f"{kind}_id", row[source])
    spec.vocab_size = len(kept)
    return trimmed


def share_kept(kept: Iterable[int], rows: Sequence[Sequence[int]]) -> float:
    """Share of token-id `rows` (tokenized texts) whose every token is kept, in [0, 1] (1 when no rows)."""
    kept = set(kept)
    return sum(all(t in kept for t in row) for row in rows) / len(rows) if rows else 1.0
