"""Tokenizers trained offline on the sample captions: CLIP's byte-level BPE and BERT/Llama-style WordPiece."""

from __future__ import annotations

import json
import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, CLIPTokenizer, PreTrainedTokenizerFast

from jobs.demo.shards import PALETTE, SHAPES, TEMPLATES

GENERIC_TEXT = """
the quick brown fox jumps over the lazy dog while a man walks with his cat and a woman reads a book
people sitting at a table in a restaurant eating food and drinking coffee near the window
a car parked on the street next to a tree in the city at night with lights and buildings
children playing with a ball in the park during a sunny day under the blue sky
an old house by the river with mountains in the background and snow on the ground
this is one of the best pictures i have ever taken of my family at the beach last summer
white black brown pink gray grey gold silver dark light bright colorful shiny round flat
"""
CHAT_TEXT = "user assistant system describe this image in one sentence what is shown here caption"
# Only in the chat vocabulary, after every other word: BLIP's and GIT's vocabularies (and so the trained demo
# captioner) stay as they were, and a visual question and its yes/no answer are whole words.
QUESTION_WORDS = ("yes", "no", "does", "do", "there", "show", "answer", "or", "question")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Same normalisation and split as openai/clip (and transformers' CLIPTokenizer), so training matches inference.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_MAX_TEXT_LEN = 32
# Room for a prompt plus a 30-token caption in the BLIP and GIT text models.
BERT_MAX_TEXT_LEN = 64
# BERT layout as in Salesforce BLIP: [PAD] is 0, [DEC] starts captions and [SEP] ends them.
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
# Llama-style specials for the chat VLM; <image> is expanded by the processor into one token per patch.
CHAT_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def _shape_captions() -> list[str]:
    return [t.format(color=c, shape=s) for t in TEMPLATES for s in SHAPES for c in PALETTE]


def train_tokenizer() -> CLIPTokenizer:
    """Train a CLIP-style byte-level BPE on shape captions plus generic English and wrap it as a CLIPTokenizer."""
    bpe = Tokenizer(models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=1024, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(_shape_captions() + GENERIC_TEXT.split("\n"), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    # CLIP vocab layout: every byte symbol, bare and word-final, so no input ever maps to unk; then merges;
    # then specials.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TEXT_LEN)


def wordpiece_vocab(specials: tuple[str, ...], extra_words: tuple[str, ...] = ()) -> dict[str, int]:
    """A WordPiece vocabulary: `specials`, every printable character (bare and ``##``), every corpus word, then
    `extra_words` not already in it.

    The words come from a `tokenizers` WordLevel trainer, which orders them deterministically (count, then
    text); the BPE-based WordPiece trainer breaks ties in hash order, so its vocabulary changes between runs.
    Printable characters keep prompts with unseen words, punctuation or digits off [UNK].
    """
    counter = Tokenizer(models.WordLevel(unk_token=specials[1]))
    counter.normalizer = normalizers.BertNormalizer(lowercase=True)
    counter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [*_shape_captions(), *GENERIC_TEXT.split("\n"), CHAT_TEXT]
    counter.train_from_iterator(corpus, trainers.WordLevelTrainer(show_progress=False))
    words = sorted(counter.get_vocab(), key=counter.get_vocab().get)
    chars = list(string.printable.strip())
    tokens = [*specials, *chars, *("##" + c for c in chars), *words, *extra_words]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def bert_tokenizer() -> BertTokenizerFast:
    """A BERT tokenizer laid out like BLIP's: [PAD] is 0, [CLS] text [SEP], and [DEC] as the decoder's bos token."""
    return BertTokenizerFast(
        vocab=wordpiece_vocab(BERT_SPECIALS), bos_token="[DEC]", model_max_length=BERT_MAX_TEXT_LEN
    )


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: <s> text, left padding for batched generation, and an <image> token."""
    pad, unk, bos, eos, image = CHAT_SPECIALS
    backend = Tokenizer(models.WordPiece(wordpiece_vocab(CHAT_SPECIALS, QUESTION_WORDS), unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens={"image_token": image},
        padding_side="left",
        model_max_length=256,
    )
