"""Vocabulary trimming's choice of tokens and its SentencePiece vocabulary (no llama.cpp needed)."""

from __future__ import annotations

import pytest

from tinymed.models.vocab import plan_vocabulary, share_kept, trim_sentencepiece

PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "<unused0>", "<0x41>", "▁the", "▁lung", "▁kidney", "▁x", "ray"]
TYPES = [3, 3, 3, 2, 3, 6, 1, 1, 1, 1, 1]


def test_plan_keeps_specials_training_tokens_and_the_top_english_ones():
    plan = plan_vocabulary(PIECES, TYPES, training_ids={1, 2, 7}, english_ranking=[6, 7, 9, 10], top_n=2)
    # specials (not <unused0>) + training (7) + the top 2 English (6, 7: 7 already kept)
    assert plan.kept == [0, 1, 2, 3, 5, 6, 7]
    assert (plan.special, plan.training, plan.english, plan.source_size) == (5, 1, 1, 11)


def test_plan_refuses_training_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the 11-token vocabulary"):
        plan_vocabulary(PIECES, TYPES, training_ids={3, 40}, english_ranking=[], top_n=0)


def test_trimmed_sentencepiece_keeps_pieces_in_order_and_renumbers_special_ids():
    from sentencepiece import sentencepiece_model_pb2 as spm

    proto = spm.ModelProto()
    for piece, kind in zip(PIECES, TYPES):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 3, 2, 1
    proto.trainer_spec.pad_id = 0
    trimmed = trim_sentencepiece(proto, [0, 1, 2, 3, 8, 10])
    assert [p.piece for p in trimmed.pieces] == ["<pad>", "<eos>", "<bos>", "<unk>", "▁kidney", "ray"]
    assert trimmed.trainer_spec.vocab_size == 6 and len(proto.pieces) == 11  # the source is untouched
    with pytest.raises(ValueError, match="drops the unk token"):
        trim_sentencepiece(proto, [0, 1, 2, 8])


def test_share_kept_counts_texts_whose_tokens_are_all_kept():
    assert share_kept({6, 7}, [[6, 7], [6, 8], [7]]) == pytest.approx(2 / 3)
    assert share_kept({6}, []) == 1.0
