"""The zoo's tokenizer: byte-level BPE trained on WikiText-2 train with the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path

from quantpredict.data import load_text

VOCAB_SIZE = 4096
SPECIAL = "<|endoftext|>"


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the zoo tokenizer (deterministic: BPE merges depend only on the text) as a PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = load_text("wikitext2", "train")
    bpe.train_from_iterator(text.splitlines(keepends=True), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[SPECIAL], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=SPECIAL, eos_token=SPECIAL,
                                  unk_token=SPECIAL, pad_token=SPECIAL)
    tok.model_max_length = 1 << 20  # evaluation tokenizes whole splits at once; windows are cut afterwards
    return tok


def load_or_train_tokenizer(path: Path, vocab_size: int = VOCAB_SIZE):
    """The tokenizer saved at ``path``, trained and saved there first if it is missing."""
    from transformers import PreTrainedTokenizerFast

    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = train_tokenizer(vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return tok
