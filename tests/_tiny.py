"""Tiny models built locally in milliseconds, for tests and benchmarks (no model hub).

Examples
--------
>>> model, tokenizer = tiny_gpt2()
>>> path = save_tiny_gpt2(tmp_path / "gpt2-tiny")  # a folder LLM(path) can load
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a story about a cat, a dog and a bird that sing together",
    "hello world, this is a tiny language model for tests",
    "numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g h i j k l m n o p",
    "Écrire une histoire courte: été, naïve, café, résumé, 東京, 🙂",
]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few lines, wrapped for transformers, with a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32):
    """A randomly initialised (but seeded, hence reproducible) 2-layer GPT-2 and its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    return model, tokenizer


def save_tiny_gpt2(path: str | Path, seed: int = 0) -> Path:
    """Build :func:`tiny_gpt2` and save model and tokenizer to ``path`` (loadable by path)."""
    path = Path(path)
    model, tokenizer = tiny_gpt2(seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def weights(model) -> dict:
    """A copy of a model's state dict, to compare weights before and after."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logged(path: Path) -> list:
    """The JSON lines a training cell wrote to ``LOSS_FILE``."""
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
