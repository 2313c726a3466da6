"""The tensor work: GPT-2 forward passes over a row-per-sequence KV cache.

Rows of the cache are the scheduler's running sequences (row i holds
`running[i]`). The runner reuses the Hugging Face modules for every dense
operation (layer norms, projections, MLP), so float32 numerics match
`model.generate`; it only replaces the attention bookkeeping, so that sequences
of different lengths share one decode step without padding their caches.

Shapes: B sequences, T positions, C = n_embd, H heads of D = C / H, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CACHE_GROWTH = 128  # positions are allocated in multiples of this


@dataclass
class _Block:
    ln_1: nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]  # (..., C) -> (..., 3C)
    attn_out: Callable[[torch.Tensor], torch.Tensor]  # (..., C) -> (..., C)
    scaling: float  # 1/sqrt(D), as the model configures it
    ln_2: nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]  # (..., C) -> (..., C)


class GPT2Runner:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int,
        quantize_int8: bool = False,
    ) -> None:
        config = model.config
        if config.model_type != "gpt2":
            raise ValueError(f"the engine serves GPT-2 architectures, got {config.model_type!r}")
        if quantize_int8:
            if device.type != "cpu":
                raise ValueError(f"int8 quantization runs on the CPU only, got device {device}")
            dtype = torch.float32
            model = quantize_dynamic_int8(model)
        model.to(device=device, dtype=dtype).eval()
        self.model = model
        self.device = device
        self.dtype = dtype
        # Attention and the KV cache run in float32 on the CPU: its reduced-precision
        # attention kernels are ~5x slower there (bench: 1.0 ms vs 0.2 ms per layer
        # at batch 32), and decode attention is a small share of the FLOPs.
        self.cache_dtype = torch.float32 if device.type == "cpu" else dtype
        self.max_batch_size = max_batch_size
        self.n_ctx: int = config.n_positions
        self.n_embd: int = config.n_embd
        self.n_head: int = config.n_head
        self.head_dim = config.n_embd // config.n_head
        transformer = model.transformer
        self.wte = transformer.wte  # (V, C)
        self.wpe = transformer.wpe  # (n_ctx, C)
        self.ln_f = transformer.ln_f
        self.lm_head = model.lm_head
        self.blocks = [
            _Block(
                ln_1=h.ln_1,
                qkv=h.attn.c_attn,
                attn_out=h.attn.c_proj,
                scaling=h.attn.scaling,
                ln_2=h.ln_2,
                mlp=h.mlp,
            )
            for h in transformer.h
        ]
        self._capacity = 0
        self._keys: list[torch.Tensor] = []  # per layer: (max_batch_size, H, capacity, D)
        self._values: list[torch.Tensor] = []
        self._ensure_capacity(CACHE_GROWTH)

    def _ensure_capacity(self, positions: int) -> None:
        """Grows every layer's cache to hold `positions` tokens per row."""
        if positions <= self._capacity:
            return
        capacity = min(self.n_ctx, -(-positions // CACHE_GROWTH) * CACHE_GROWTH)
        shape = (self.max_batch_size, self.n_head, capacity, self.head_dim)
        old = self._capacity
        for cache in (self._keys, self._values):
            grown = [
                torch.zeros(shape, device=self.device, dtype=self.cache_dtype) for _ in self.blocks
            ]
            for new, prev in zip(grown, cache, strict=False):
                new[:, :, :old] = prev
            cache[:] = grown
        self._capacity = capacity

    def move_rows(self, moves: list[tuple[int, int]], used: int) -> None:
        """Applies the scheduler's row moves (src -> dst), copying `used` positions."""
        for src, dst in moves:
            for cache in (*self._keys, *self._values):
                cache[dst, :, :used] = cache[src, :, :used]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], first_row: int) -> torch.Tensor:
        """Runs whole prompts into rows first_row..; returns next-token logits (n, V) float32."""
        n = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        t = int(lengths.max())
        self._ensure_capacity(t)
        ids = torch.zeros((n, t), dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):  # right-padded; padding is never attended
            ids[i, : len(prompt)] = torch.tensor(prompt, device=self.device)
        positions = torch.arange(t, device=self.device)
        x = self.wte(ids) + self.wpe(positions)  # (n, T, C)
        rows = slice(first_row, first_row + n)
        for block, keys, values in zip(self.blocks, self._keys, self._values, strict=True):
            q, k, v = self._heads(block, x)  # each (n, H, T, D)
            keys[rows, :, :t] = k
            values[rows, :, :t] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.scaling)
            x = self._finish_block(block, x, a)
        last = x[torch.arange(n, device=self.device), lengths - 1]  # (n, C)
        return self.lm_head(self.ln_f(last)).float()

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..B-1 at its own position; returns logits (B, V) float32."""
        b = len(token_ids)
        ids = torch.tensor(token_ids, device=self.device)  # (B,)
        pos = torch.tensor(positions, device=self.device)  # (B,)
        t = max(positions) + 1
        self._ensure_capacity(t)
        rows = torch.arange(b, device=self.device)
        # Row i attends to its own positions 0..pos[i] only.
        mask = (torch.arange(t, device=self.device) <= pos[:, None])[:, None, None, :]  # (B,1,1,T)
        x = (self.wte(ids) + self.wpe(pos))[:, None, :]  # (B, 1, C)
        for block, keys, values in zip(self.blocks, self._keys, self._values, strict=True):
            q, k, v = self._heads(block, x)  # each (B, H, 1, D)
            keys[rows, :, pos] = k[:, :, 0]
            values[rows, :, pos] = v[:, :, 0]
            a = F.scaled_dot_product_attention(
                q, keys[:b, :, :t], values[:b, :, :t], attn_mask=mask, scale=block.scaling
            )
            x = self._finish_block(block, x, a)
        return self.lm_head(self.ln_f(x[:, 0])).float()

    def _heads(
        self, block: _Block, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v, each (B, H, T, D) in the cache dtype."""
        b, t, _ = x.shape
        qkv = block.qkv(block.ln_1(x)).to(self.cache_dtype)  # (B, T, 3C)
        return tuple(  # type: ignore[return-value]
            part.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
            for part in qkv.split(self.n_embd, dim=2)
        )

    def _finish_block(self, block: _Block, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, T, D) -> residual stream (B, T, C) after the MLP."""
        b, _, t, _ = a.shape
        x = x + block.attn_out(a.transpose(1, 2).reshape(b, t, self.n_embd).to(self.dtype))
        return x + block.mlp(block.ln_2(x))


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 linear layers (CPU): GPT-2's Conv1D become nn.Linear, lm_head is untied."""
    from transformers.pytorch_utils import Conv1D

    def as_linear(conv: Conv1D) -> nn.Linear:
        nx, nf = conv.weight.shape
        linear = nn.Linear(nx, nf)
        linear.weight.data = conv.weight.data.t().contiguous()
        linear.bias.data = conv.bias.data.clone()
        return linear

    model = model.float()
    for h in model.transformer.h:
        h.attn.c_attn = as_linear(h.attn.c_attn)
        h.attn.c_proj = as_linear(h.attn.c_proj)
        h.mlp.c_fc = as_linear(h.mlp.c_fc)
        h.mlp.c_proj = as_linear(h.mlp.c_proj)
    head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
    head.weight.data = model.lm_head.weight.data.clone()
    model.lm_head = head
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
