"""Write a tiny, randomly initialised Hugging Face BERT and a WordPiece tokenizer trained
here on a few sentences: a text tower for ``model.name: hf:<dir>`` without any download.

    python examples/make_tiny_text_model.py --out models/tiny_bert
    python examples/make_tiny_text_model.py --out models/tiny_bert --corpus captions.txt

The folder holds what ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``
read (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...). The vocabulary is
learnt from the corpus (one text per line; default: the digits captions of
examples/make_digits_pairs.py and a few more sentences), so the model is only good for
examples and tests. From Python::

    from examples.make_tiny_text_model import make_tiny_text_model
    path = make_tiny_text_model("models/tiny_bert", hidden_size=64)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["SENTENCES", "main", "make_tiny_text_model"]

#: The default corpus: every digit caption, and some other text for the sentence examples.
SENTENCES = (
    *(
        f"a photo of the digit {w}"
        for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    ),
    "a photo of a cat",
    "a picture of a dog on the grass",
    "the quick brown fox jumps over the lazy dog",
    "how do I train a model with a large batch",
    "what is the capital of france",
    "paris is the capital of france",
)


def make_tiny_text_model(
    out: str | Path,
    *,
    corpus: Iterable[str] = SENTENCES,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 256,
    max_length: int = 64,
    seed: int = 0,
    dropout: float = 0.0,
) -> Path:
    """Train a WordPiece tokenizer on ``corpus`` and write it with a random BERT to ``out``.

    Args:
        out: the folder (created).
        corpus: texts the vocabulary is learnt from.
        hidden_size, layers, heads: the BERT's size (intermediate size 2 x hidden).
        vocab_size: the largest vocabulary the tokenizer may learn (special tokens included).
        max_length: position embeddings, and the tokenizer's ``model_max_length``.
        seed: torch's seed for the random weights.
        dropout: hidden and attention dropout (0: the model is deterministic).

    Returns:
        ``out``.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        list(corpus), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--corpus", help="a text file, one text per line (default: built in)")
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)
    corpus: Iterable[str] = SENTENCES
    if args.corpus:
        corpus = [line for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    path = make_tiny_text_model(
        args.out,
        corpus=corpus,
        hidden_size=args.hidden_size,
        layers=args.layers,
        max_length=args.max_length,
    )
    print(f"wrote {path}: use it as model.name=hf:{path} (or in model.towers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
