"""A word-level tokenizer for small synthetic worlds, saved and loaded like any HF tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def word_tokenizer(words: Sequence[str]):
    """A whitespace-split ``PreTrainedTokenizerFast`` over ``words`` that prepends ``<bos>``.

    Token ids are the order of ``SPECIAL_TOKENS`` followed by ``words`` (duplicates dropped),
    so the same word list always gives the same ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        name_or_path="revlens-word-tokenizer",
        add_bos_token=True,
    )
