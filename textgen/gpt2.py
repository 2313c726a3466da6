"""The GPT-2 forward, apart from the runner that batches it.

`GPT2` holds the weights in the form fastest for the device and precision and runs
embeddings -> blocks -> final layer norm over token ids and positions; attention reads
and writes a KV cache the caller owns (`GPT2Runner` allocates it) as an `Attention`
object says: which slot and position each token's keys and values go to, and which
cached positions each query attends. The runner picks the batch, the buckets and (on
CUDA) the graphs; nothing here knows about sequences or the scheduler.

The projections are `Dense` forms: in float32 Hugging Face's own arithmetic, so float32
numerics match `model.generate`; oneDNN bfloat16 and fbgemm int8 on the CPU. A lone
sequence in bfloat16 or int8 on a CPU decodes through textgen/csrc's kernels
(`decode_row`).

Shapes: n rows (sequences), t positions per row in a prefill, S slots, T positions per
slot (the context), L attended positions, C = n_embd, H heads of D = C / H, V vocab.
A layer's cache `kv` is (2, S, H, T, D): keys, then values.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from textgen import native

# SDPA backends on CUDA: never cuDNN's, which builds a plan per (batch, key length) shape
# (tens of milliseconds each, and under continuous batching nearly every step is a new
# shape). Flash takes no mask, so masked calls run the memory-efficient kernel.
CUDA_SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@dataclass
class Dense:
    """One projection, y = x W + b over (..., n_in) -> (..., n_out), in the form that runs
    fastest where it runs. Three forms: `plain` (the model's own tensors, x W + b as Hugging
    Face's Conv1D computes it, so float32 matches `model.generate`), `mkldnn` (bfloat16 on
    the CPU: oneDNN's prepacked weights, the GELU and the residual add fused, faster than
    `F.linear` there), `int8` (dynamic int8, fbgemm's prepacked weights)."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # (..., n_in) -> (..., n_out)
    gelu: Callable[[torch.Tensor], torch.Tensor]  # (..., n_in) -> act(x W + b), GELU for GPT-2
    add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, r) -> r + x W + b

    @classmethod
    def plain(cls, weight: torch.Tensor, bias: torch.Tensor, act: nn.Module) -> Dense:
        """`weight` (n_in, n_out), Conv1D's layout."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            return y.view(*x.shape[:-1], weight.shape[1])

        return cls(forward, lambda x: act(forward(x)), lambda x, r: r + forward(x))

    @classmethod
    def mkldnn(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, act: nn.Module | None
    ) -> Dense:
        """`weight` (n_out, n_in), nn.Linear's layout, bfloat16. `act`: the activation, or
        None for tanh GELU (fused)."""
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        pointwise = torch.ops.mkldnn._linear_pointwise

        def forward(x: torch.Tensor) -> torch.Tensor:
            return pointwise(x, packed, bias, "none", [], "")

        return cls(
            forward,
            (lambda x: act(forward(x)))
            if act is not None
            else (lambda x: pointwise(x, packed, bias, "gelu", [], "tanh")),
            lambda x, r: pointwise.binary(x, r, packed, bias, "add"),
        )

    @classmethod
    def int8(cls, weight: torch.Tensor, bias: torch.Tensor | None, act: nn.Module | None) -> Dense:
        """`weight` (n_out, n_in), nn.Linear's layout, float32. `act`: the activation, or
        None for tanh GELU."""
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight.data = weight
        if bias is not None:
            linear.bias.data = bias
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore")
            module = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8
            )[0]
        return cls(
            module,
            (lambda x: act(module(x)))
            if act is not None
            else (lambda x: F.gelu(module(x), approximate="tanh")),
            lambda x, r: r + module(x),
        )


@dataclass
class Block:
    ln_1: nn.Module
    qkv: Dense  # (..., C) -> (..., 3C)
    attn_out: Dense  # (..., C) -> (..., C)
    scaling: float  # 1/sqrt(D), as the model configures it
    ln_2: nn.Module
    fc: Dense  # (..., C) -> (..., 4C), GELU after it
    mlp_out: Dense  # (..., 4C) -> (..., C)


ROW_SLICE = {"bf16": 32, "int8": 64}  # K-elements per 512-bit register


def _blocked_weight(weight: torch.Tensor, width: int) -> list[torch.Tensor]:
    """W (N, K), nn.Linear's layout -> [blocks (N // 8, K / width, 8, width), tail
    (N % 8, K)], the layout of textgen/csrc/row_decode.cpp: each group of 8 output rows is
    one contiguous run, the rows' width-wide slices of K interleaved. K % width == 0."""
    n, k = weight.shape
    grouped = n - n % 8
    blocks = weight[:grouped].reshape(grouped // 8, 8, k // width, width).transpose(1, 2)
    return [blocks.contiguous(), weight[grouped:].contiguous()]


def row_weights(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> list[torch.Tensor]:
    """W (N, K) and bias (N,) -> a projection's tensors for row_decode.cpp. bf16: blocks,
    tail, bias. int8: W quantized symmetrically with one scale per output row; blocks,
    tail, scales (N,) float32, the rows' sums of int8 weights (N,) int32, bias."""
    dtype = weight.dtype if kind == "bf16" else torch.float32
    bias = bias.detach().to(dtype) if bias is not None else weight.new_empty(0, dtype=dtype)
    if kind == "bf16":
        return [*_blocked_weight(weight, ROW_SLICE[kind]), bias]
    scales = weight.float().abs().amax(dim=1).clamp_min(1e-30) / 127  # (N,)
    quantized = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    sums = quantized.sum(dim=1, dtype=torch.int32)
    return [*_blocked_weight(quantized, ROW_SLICE[kind]), scales, sums, bias]


def row_projection(conv: nn.Module, kind: str) -> list[torch.Tensor]:
    """A Hugging Face Conv1D (weight (n_in, n_out)) -> its tensors for row_decode.cpp."""
    return row_weights(conv.weight.detach().t(), conv.bias, kind)


def dense_kind(device: torch.device, dtype: torch.dtype, quantize_int8: bool) -> str:
    """Which `_Dense` form the projections take."""
    if quantize_int8:
        return "int8"
    if (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return "mkldnn"
    return "plain"


class Attention(Protocol):
    """Attention metadata for one forward: where each token's keys and values go in the
    cache and what each query attends. `attend` takes one layer's projected q, k, v and
    that layer's cache and returns the heads' outputs merged."""

    def attend(self, qkv: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        """qkv (..., 3C) in the cache's dtype, kv (2, S, H, T, D) -> (..., C)."""
        ...


@dataclass
class CausalPrefill:
    """Whole prompts from position 0, right-padded to one length t: row i writes positions
    0..t-1 of slot `slots[i]` (padding's keys lie past the prompt, where no later query
    of that slot looks before they are overwritten) and attends causally."""

    slots: torch.Tensor  # (n,) long

    def attend(self, qkv: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        n, t, _ = qkv.shape
        heads, dim = kv.shape[2], kv.shape[4]
        q, k, v = qkv.view(n, t, 3, heads, dim).permute(2, 0, 3, 1, 4)  # each (n, H, t, D)
        kv[0, self.slots, :, :t] = k
        kv[1, self.slots, :, :t] = v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return a.transpose(1, 2).reshape(n, t, heads * dim)


@dataclass
class PrefixPrefill:
    """Prompts after a cached prefix: row i's tokens sit at positions starts[i].. of its
    slot and attend that slot's positions 0..their own. Only real tokens write (R of them);
    a padding query attends from key 0 on, so no softmax row is empty (its output is
    dropped)."""

    slots: torch.Tensor  # (n,) long
    real: torch.Tensor  # (n, t) bool: which (row, position) holds a real token
    write_slots: torch.Tensor  # (R,) long: the slot of each real token
    write_positions: torch.Tensor  # (R,) long: its position
    mask: torch.Tensor  # (n, 1, t, L) bool: query attends key
    length: int  # L: keys 0..L-1 of every row's slot

    def attend(self, qkv: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        n, t, _ = qkv.shape
        heads, dim = kv.shape[2], kv.shape[4]
        qkv = qkv.view(n, t, 3, heads, dim)
        # kv (2, S, H, T, D) indexed [:, slot, :, pos] is (R, 2, H, D)
        kv[:, self.write_slots, :, self.write_positions] = qkv[:, :, 1:][self.real]
        q = qkv[:, :, 0].transpose(1, 2)  # (n, H, t, D)
        keys = kv[0, self.slots, :, : self.length]  # (n, H, L, D)
        values = kv[1, self.slots, :, : self.length]
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale)
        return a.transpose(1, 2).reshape(n, t, heads * dim)


@dataclass
class RaggedDecode:
    """One token per sequence, shapes fitted to this step: attention runs over slots
    0..span-1 (holes included, their queries zero and their outputs dropped) and
    positions 0..L-1, L = the longest live sequence. No slot is gathered; when the slots
    are 0..B-1 none is scattered either."""

    slots: torch.Tensor  # (B,) long, ascending
    positions: torch.Tensor  # (B,) long
    span: int  # S' = the last slot + 1
    length: int  # L
    mask: torch.Tensor | None  # (S' or B, 1, 1, L) bool, None: every row attends all L

    def attend(self, qkv: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        b = qkv.shape[0]
        heads, dim = kv.shape[2], kv.shape[4]
        holes = self.span != b
        qkv = qkv.view(b, 3, heads, dim)
        # kv indexed [:, slot, :, pos] is (B, 2, H, D): keys and values in one op.
        kv[:, self.slots, :, self.positions] = qkv[:, 1:]
        q = qkv[:, 0, :, None]  # (B, H, 1, D)
        if holes:  # (S', H, 1, D), holes zero
            q = q.new_zeros((self.span, *q.shape[1:])).index_copy_(0, self.slots, q)
        keys = kv[0, : self.span, :, : self.length]  # (S', H, L, D)
        values = kv[1, : self.span, :, : self.length]
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale)
        if holes:
            a = a.index_select(0, self.slots)  # (B, H, 1, D)
        return a.reshape(b, heads * dim)


@dataclass
class FixedDecode:
    """One token per row over static shapes: B' rows (a batch bucket, padding rows
    included) and L keys per row (a length bucket), whatever the live sequences' slots
    and lengths. Each row's keys are gathered from its own slot and a mask built on the
    device from `positions` hides those past the row's position, so a step's tensors
    depend on (B', L) alone and a CUDA graph captured at those sizes replays it.
    Padding rows name the scratch slot at position 0: they write only there and attend
    only there, and no live row ever reads it."""

    slots: torch.Tensor  # (B',) long: each row's slot; padding: the scratch slot
    positions: torch.Tensor  # (B',) long: each row's position; padding: 0
    length: int  # L: keys 0..L-1 of each row's slot, L > every position
    mask: torch.Tensor  # (B', 1, 1, L) bool: key j is attended iff j <= the row's position

    @classmethod
    def build(cls, slots: torch.Tensor, positions: torch.Tensor, length: int) -> FixedDecode:
        """The metadata, its mask computed on the positions' device (no host work)."""
        keep = torch.arange(length, device=positions.device) <= positions[:, None]  # (B', L)
        return cls(slots, positions, length, keep[:, None, None, :])

    def attend(self, qkv: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        b = qkv.shape[0]
        heads, dim = kv.shape[2], kv.shape[4]
        qkv = qkv.view(b, 3, heads, dim)
        kv[:, self.slots, :, self.positions] = qkv[:, 1:]  # (B', 2, H, D)
        q = qkv[:, 0, :, None]  # (B', H, 1, D)
        keys = kv[0, self.slots, :, : self.length]  # (B', H, L, D), gathered
        values = kv[1, self.slots, :, : self.length]
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale)
        return a.reshape(b, heads * dim)


class GPT2:
    """A Hugging Face GPT-2 (`GPT2LMHeadModel`) as a forward over token ids, positions
    and attention metadata. Takes the model over: converts it in place to the device and
    dtype, and the non-plain forms leave its projections' own weights empty."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        quantize_int8: bool = False,
        native_kernels: bool = True,
    ) -> None:
        config = model.config
        if config.model_type != "gpt2":
            raise ValueError(f"the engine serves GPT-2 architectures, got {config.model_type!r}")
        if quantize_int8:
            if device.type != "cpu":
                raise ValueError(f"int8 quantization runs on the CPU only, got device {device}")
            dtype = torch.float32
        model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.dtype = dtype
        # Attention and the KV cache run in float32 on the CPU: its reduced-precision
        # attention kernels are several times slower there, and decode attention is a
        # small share of the FLOPs.
        self.cache_dtype = torch.float32 if device.type == "cpu" else dtype
        self.n_positions: int = config.n_positions
        self.n_embd: int = config.n_embd
        self.vocab_size: int = config.vocab_size
        self.n_head: int = config.n_head
        self.head_dim = config.n_embd // config.n_head
        transformer = model.transformer
        self.wte = transformer.wte  # (V, C)
        self.wpe = transformer.wpe  # (n_positions, C)
        self.ln_f = transformer.ln_f
        self.dense_kind = dense_kind(device, dtype, quantize_int8)
        # GPT-2's own activation is tanh GELU, which the bf16, int8 and one-row forms
        # compute themselves (fused in oneDNN); a config naming another one keeps the
        # model's in the first two and has no one-row form.
        self.tanh_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.row_kind = self._row_kind(config, native_kernels)
        # One row's weights for the native kernels, per layer: ln_1 weight and bias, qkv,
        # attn_out, ln_2 weight and bias, fc, mlp_out, each projection as
        # `row_projection` lays it out. A second copy of the weights, in a layout that a
        # matrix-vector product streams at the memory's rate.
        self.row_weights: list[list[torch.Tensor]] = []
        self.row_head: list[torch.Tensor] = []
        if self.row_kind is not None:
            kind = self.row_kind
            self.row_weights = [
                [
                    h.ln_1.weight,
                    h.ln_1.bias,
                    *row_projection(h.attn.c_attn, kind),
                    *row_projection(h.attn.c_proj, kind),
                    h.ln_2.weight,
                    h.ln_2.bias,
                    *row_projection(h.mlp.c_fc, kind),
                    *row_projection(h.mlp.c_proj, kind),
                ]
                for h in transformer.h
            ]
            self.row_head = row_weights(model.lm_head.weight.detach(), None, kind)
        self.blocks = [
            Block(
                ln_1=h.ln_1,
                qkv=self._dense(h.attn.c_attn, h.mlp.act),
                attn_out=self._dense(h.attn.c_proj, h.mlp.act),
                scaling=h.attn.scaling,
                ln_2=h.ln_2,
                fc=self._dense(h.mlp.c_fc, h.mlp.act),
                mlp_out=self._dense(h.mlp.c_proj, h.mlp.act),
            )
            for h in transformer.h
        ]
        head = model.lm_head.weight  # (V, C), tied to wte
        self._plain_head: nn.Linear = model.lm_head
        if self.dense_kind == "plain":
            self.lm_head: Callable[[torch.Tensor], torch.Tensor] = model.lm_head
        else:
            form = getattr(Dense, self.dense_kind)
            self.lm_head = form(head.detach().clone(), None, None).forward

    def _row_kind(self, config: object, native_kernels: bool) -> str | None:
        """ "bf16" or "int8" when a lone row may decode through the native kernels here."""
        kind = {"mkldnn": "bf16", "int8": "int8"}.get(self.dense_kind)
        inner = getattr(config, "n_inner", None) or 4 * self.n_embd
        if (
            native_kernels
            and kind is not None
            and self.tanh_gelu
            and self.n_embd % ROW_SLICE[kind] == 0
            and inner % ROW_SLICE[kind] == 0
            and self.head_dim % 16 == 0
            and native.row_decode()
        ):
            return kind
        return None

    def _dense(self, conv: nn.Module, act: nn.Module) -> Dense:
        """A Hugging Face Conv1D (weight (n_in, n_out)) in this model's form. The other
        forms copy the weight and leave the Conv1D's own tensor empty."""
        if self.dense_kind == "plain":
            return Dense.plain(conv.weight.detach(), conv.bias.detach(), act)
        weight = conv.weight.detach().t().contiguous()
        dense = getattr(Dense, self.dense_kind)(
            weight, conv.bias.detach(), None if self.tanh_gelu else act
        )
        conv.weight.data = conv.weight.data.new_empty(0)  # the model holds the only copy
        return dense

    def cache_shape(self, slots: int, positions: int) -> tuple[int, ...]:
        """The KV cache's shape for `slots` slots of `positions` positions:
        (layers, 2, S, H, T, D)."""
        return (len(self.blocks), 2, slots, self.n_head, positions, self.head_dim)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attention: Attention,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Token ids and their positions, (n, t) or (B,) long, through every block; each
        layer's attention reads and writes `kv_cache` (layers, 2, S, H, T, D) as
        `attention` says. Returns the residual stream after the last block, (..., C),
        before the final layer norm (`logits` applies it)."""
        with self.sdpa_backends():
            x = self.wte(ids) + self.wpe(positions)  # (..., C)
            for block, kv in zip(self.blocks, kv_cache, strict=True):
                qkv = block.qkv.forward(block.ln_1(x)).to(self.cache_dtype)  # (..., 3C)
                a = attention.attend(qkv, kv, block.scaling)  # (..., C)
                x = block.attn_out.add(a.to(self.dtype), x)
                x = block.mlp_out.add(block.fc.gelu(block.ln_2(x)), x)
        return x

    def logits(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream (..., C) -> next-token logits (..., V) float32, written into
        `out` when given (a buffer its caller reuses: no (..., V) float32 tensor is
        allocated for them)."""
        h = self.ln_f(x)
        if out is None:
            return self.lm_head(h).float()
        if self.lm_head is self._plain_head and self._plain_head.weight.dtype == torch.float32:
            return torch.matmul(h, self._plain_head.weight.t(), out=out)  # F.linear's GEMM
        return out.copy_(self.lm_head(h))

    def sdpa_backends(self) -> contextlib.AbstractContextManager[None]:
        """On CUDA, SDPA limited to `CUDA_SDPA_BACKENDS`; elsewhere PyTorch's own choice
        (no context: the CPU paths stay as they were)."""
        if self.device.type == "cuda":
            return sdpa_kernel(CUDA_SDPA_BACKENDS)
        return contextlib.nullcontext()

    def decode_row(
        self, token_id: int, position: int, slot: int, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """One sequence's decode step through textgen/csrc/row_decode.cpp, one call per
        layer (`row_kind` is not None). Returns logits (1, V) float32."""
        ops = torch.ops.textgen_row
        block = ops.block_bf16 if self.row_kind == "bf16" else ops.block_int8
        x = self.wte.weight[token_id] + self.wpe.weight[position]  # (C,) the model's dtype
        for weights, kv, layer in zip(self.row_weights, kv_cache, self.blocks, strict=True):
            block(x, weights, kv, slot, position, layer.scaling, layer.ln_1.eps)
        head = ops.head_bf16 if self.row_kind == "bf16" else ops.head_int8
        return head(x, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps, self.row_head)[None]
