"""The demo tokenizers cover every caption without [UNK] and lay out specials as the real models expect."""

from __future__ import annotations

import numpy as np

from jobs.demo import BERT_SPECIALS, PALETTE, SHAPES, caption_for, train_tokenizer, wordpiece_vocab


def test_clip_tokenizer_wraps_captions_in_its_specials():
    tokenizer = train_tokenizer()
    ids = tokenizer(caption_for("star", "red", np.random.default_rng(0)))["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]


def test_wordpiece_vocab_starts_with_specials_and_holds_every_caption_word():
    vocab = wordpiece_vocab(BERT_SPECIALS)
    assert list(vocab)[: len(BERT_SPECIALS)] == list(BERT_SPECIALS)
    assert set(SHAPES) | set(PALETTE) <= set(vocab)
    # Built from a deterministic trainer, so the benchmarks' padded BLIP vocabulary is stable between runs.
    assert wordpiece_vocab(BERT_SPECIALS) == vocab
