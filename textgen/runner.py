"""The tensor work: GPT-2 forward passes over a slot-per-sequence KV cache.

The cache is allocated once, at start, for `max_batch_size` slots of the full
context; a running sequence owns one slot (the scheduler hands them out) and
nothing in the cache ever moves. The layer norms and embeddings are the Hugging
Face modules; each projection is a `_Dense` in the form fastest for the device
and precision. In float32 that form is Hugging Face's own arithmetic, so float32
numerics match `model.generate`. Attention is the runner's own, so that sequences
of different lengths share one decode step without padding. A lone sequence in
bfloat16 or int8 on a CPU decodes through textgen/csrc's kernels (`_decode_row`).

Shapes: B sequences, S slots, T positions (the context), L attended positions
(the longest live sequence), C = n_embd, H heads of D = C / H, V vocab.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from textgen import native
from textgen.scheduler import length_groups

GIB = 1 << 30


class CacheDoesNotFit(RuntimeError):
    """The KV cache is larger than the memory the settings allow it."""


@dataclass
class _Dense:
    """One projection, y = x W + b over (..., n_in) -> (..., n_out), in the form that runs
    fastest where it runs. Three forms: `plain` (the model's own tensors, x W + b as Hugging
    Face's Conv1D computes it, so float32 matches `model.generate`), `mkldnn` (bfloat16 on
    the CPU: oneDNN's prepacked weights, the GELU and the residual add fused; one row's
    projections take 12 ms per step here against 17 with `F.linear`), `int8` (dynamic
    int8, fbgemm's prepacked weights)."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # (..., n_in) -> (..., n_out)
    gelu: Callable[[torch.Tensor], torch.Tensor]  # (..., n_in) -> act(x W + b), GELU for GPT-2
    add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, r) -> r + x W + b

    @classmethod
    def plain(cls, weight: torch.Tensor, bias: torch.Tensor, act: nn.Module) -> _Dense:
        """`weight` (n_in, n_out), Conv1D's layout."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            return y.view(*x.shape[:-1], weight.shape[1])

        return cls(forward, lambda x: act(forward(x)), lambda x, r: r + forward(x))

    @classmethod
    def mkldnn(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, act: nn.Module | None
    ) -> _Dense:
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
    def int8(cls, weight: torch.Tensor, bias: torch.Tensor | None, act: nn.Module | None) -> _Dense:
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
class _Block:
    ln_1: nn.Module
    qkv: _Dense  # (..., C) -> (..., 3C)
    attn_out: _Dense  # (..., C) -> (..., C)
    scaling: float  # 1/sqrt(D), as the model configures it
    ln_2: nn.Module
    fc: _Dense  # (..., C) -> (..., 4C), GELU after it
    mlp_out: _Dense  # (..., 4C) -> (..., C)


class GPT2Runner:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int,
        quantize_int8: bool = False,
        n_ctx: int | None = None,
        memory_utilization: float = 0.9,
        native_kernels: bool = True,
    ) -> None:
        """Takes `model` over (converts it in place to the device and dtype). `n_ctx`:
        positions per slot (default: the model's); `memory_utilization`: the share of the
        memory available after loading the weights that the KV cache may take;
        `native_kernels`: whether bfloat16 and int8 on the CPU may decode one row with
        textgen/csrc's kernels (`row_kind`)."""
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
        # attention kernels are ~5x slower there (bench: 1.0 ms vs 0.2 ms per layer
        # at batch 32), and decode attention is a small share of the FLOPs.
        self.cache_dtype = torch.float32 if device.type == "cpu" else dtype
        self.max_batch_size = max_batch_size
        self.n_ctx: int = n_ctx or config.n_positions
        self.n_embd: int = config.n_embd
        self.vocab_size: int = config.vocab_size
        self.n_head: int = config.n_head
        self.head_dim = config.n_embd // config.n_head
        transformer = model.transformer
        self.wte = transformer.wte  # (V, C)
        self.wpe = transformer.wpe  # (n_ctx, C)
        self.ln_f = transformer.ln_f
        self.dense_kind = dense_kind(device, dtype, quantize_int8)
        self.activation: str = config.activation_function
        # GPT-2's own activation is tanh GELU, which the bf16, int8 and one-row forms
        # compute themselves (fused in oneDNN); a config naming another one keeps the
        # model's in the first two and has no one-row form.
        self.tanh_gelu = self.activation in ("gelu_new", "gelu_pytorch_tanh")
        # One row (a lone stream) decodes through native kernels when they run here
        # (`_decode_row`), bfloat16 or int8 as the rest: per layer, ln_1 weight and bias,
        # qkv, attn_out, ln_2 weight and bias, fc, mlp_out, each projection as
        # `_row_projection` lays it out. A second copy of the weights, in a layout that a
        # matrix-vector product streams at the memory's rate.
        self.row_kind = {"mkldnn": "bf16", "int8": "int8"}.get(self.dense_kind)
        inner = config.n_inner or 4 * self.n_embd
        if not (
            native_kernels
            and self.row_kind is not None
            and self.tanh_gelu
            and self.n_embd % ROW_SLICE[self.row_kind] == 0
            and inner % ROW_SLICE[self.row_kind] == 0
            and self.head_dim % 16 == 0
            and native.row_decode()
        ):
            self.row_kind = None
        self.row_weights: list[list[torch.Tensor]] = []
        self.row_head: list[torch.Tensor] = []
        if self.row_kind is not None:
            kind = self.row_kind
            self.row_weights = [
                [
                    h.ln_1.weight,
                    h.ln_1.bias,
                    *_row_projection(h.attn.c_attn, kind),
                    *_row_projection(h.attn.c_proj, kind),
                    h.ln_2.weight,
                    h.ln_2.bias,
                    *_row_projection(h.mlp.c_fc, kind),
                    *_row_projection(h.mlp.c_proj, kind),
                ]
                for h in transformer.h
            ]
            self.row_head = _row_weights(model.lm_head.weight.detach(), None, kind)
        self.blocks = [
            _Block(
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
        if self.dense_kind == "plain":
            self.lm_head: Callable[[torch.Tensor], torch.Tensor] = model.lm_head
        else:
            form = getattr(_Dense, self.dense_kind)
            self.lm_head = form(head.detach().clone(), None, None).forward
        # Per layer, keys and values: (S, H, T, D). One allocation, zero-filled: a
        # position a mask hides must hold a finite number (0 x NaN is NaN), so a slot
        # that may hold NaN is cleared before reuse (`clear_slots`).
        shape = (len(self.blocks), 2, max_batch_size, self.n_head, self.n_ctx, self.head_dim)
        needed = math.prod(shape) * self.cache_dtype.itemsize
        available = available_memory(device)
        if needed > memory_utilization * available:
            allowed = memory_utilization * available
            raise CacheDoesNotFit(
                f"the KV cache needs {_size(needed)} ({max_batch_size} slots x {self.n_ctx} "
                f"positions x {len(self.blocks)} layers x {self.n_embd} x 2 (keys, values) x "
                f"{self.cache_dtype.itemsize} bytes) but may take only {_size(allowed)} "
                f"(TEXTGEN_MEMORY_UTILIZATION={memory_utilization:g} of {_size(available)} "
                f"available on {device}); lower TEXTGEN_MAX_BATCH_SIZE or TEXTGEN_MAX_MODEL_LEN"
            )
        self.kv_cache = torch.zeros(shape, device=device, dtype=self.cache_dtype)
        self.kv_cache_bytes = needed

    def _dense(self, conv: nn.Module, act: nn.Module) -> _Dense:
        """A Hugging Face Conv1D (weight (n_in, n_out)) in this runner's form. The other
        forms copy the weight and leave the Conv1D's own tensor empty."""
        if self.dense_kind == "plain":
            return _Dense.plain(conv.weight.detach(), conv.bias.detach(), act)
        weight = conv.weight.detach().t().contiguous()
        dense = getattr(_Dense, self.dense_kind)(
            weight, conv.bias.detach(), None if self.tanh_gelu else act
        )
        conv.weight.data = conv.weight.data.new_empty(0)  # the runner holds the only copy
        return dense

    def clear_slots(self, slots: list[int] | None = None) -> None:
        """Zeroes the given slots' keys and values (every slot when None)."""
        if slots is None:
            self.kv_cache.zero_()
        else:
            self.kv_cache[:, :, torch.tensor(slots, device=self.device)] = 0

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copies the keys and values of positions 0..length-1 from slot `source` into
        slot `target` (a prefix another sequence shares)."""
        self.kv_cache[:, :, target, :, :length] = self.kv_cache[:, :, source, :, :length]

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[list[int]],
        slots: list[int],
        every_position: Seq[int] = (),
        starts: Seq[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs prompts into their slots. `starts[i]` (default 0): positions of row i's
        slot that already hold its first keys and values (a cached prefix); `prompts[i]`
        is then the rest of its prompt, at positions starts[i].. . Returns next-token
        logits (n, V) float32, and for each row in `every_position` the logits of all the
        positions it ran, (len(prompts[i]), V).

        Rows are padded to the longest in their call, so rows of very different
        lengths (a cached prefix's short rest beside a whole new prompt) run in
        separate calls (`length_groups`)."""
        starts = list(starts) or [0] * len(prompts)
        groups = length_groups([len(p) for p in prompts])
        if len(groups) == 1:
            return self._prefill_rows(prompts, slots, every_position, starts)
        logits = torch.empty((len(prompts), self.vocab_size), device=self.device)
        scored: dict[int, torch.Tensor] = {}
        wanted = set(every_position)
        for rows in groups:
            every = [j for j, i in enumerate(rows) if i in wanted]
            out, full = self._prefill_rows(
                [prompts[i] for i in rows],
                [slots[i] for i in rows],
                every,
                [starts[i] for i in rows],
            )
            logits[torch.tensor(rows, device=self.device)] = out
            scored.update((rows[j], f) for j, f in zip(every, full, strict=True))
        return logits, [scored[i] for i in every_position]

    def _prefill_rows(
        self,
        prompts: list[list[int]],
        slots: list[int],
        every_position: Seq[int],
        starts: list[int],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`prefill` in one call, every row padded to the longest."""
        if any(starts):
            return self._prefill_after(prompts, slots, every_position, starts)
        n = len(prompts)
        t = max(len(p) for p in prompts)
        ids = torch.zeros((n, t), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # right-padded; padding is never attended
            ids[i, : len(prompt)] = torch.tensor(prompt)
        ids = ids.to(self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # (n,)
        slot_ids = torch.tensor(slots, device=self.device)  # (n,)
        positions = torch.arange(t, device=self.device)
        x = self.wte(ids) + self.wpe(positions)  # (n, T, C)
        for block, kv in zip(self.blocks, self.kv_cache, strict=True):
            qkv = block.qkv.forward(block.ln_1(x)).to(self.cache_dtype)  # (n, T, 3C)
            qkv = qkv.view(n, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv  # each (n, H, T, D)
            kv[0, slot_ids, :, :t] = k
            kv[1, slot_ids, :, :t] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.scaling)
            x = self._finish_block(block, x, a.transpose(1, 2).reshape(n, t, self.n_embd))
        scored = [self.lm_head(self.ln_f(x[i, : len(prompts[i])])).float() for i in every_position]
        x = x[torch.arange(n, device=self.device), last]  # (n, C)
        return self.lm_head(self.ln_f(x)).float(), scored

    def _prefill_after(
        self,
        prompts: list[list[int]],
        slots: list[int],
        every_position: Seq[int],
        starts: list[int],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`prefill` where some rows start after a cached prefix: row i's t_i new tokens
        sit at positions starts[i]..starts[i]+t_i-1 and attend to its slot's positions
        0..their own. Only real tokens write the cache (padding never does)."""
        n = len(prompts)
        t = max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts])  # (n,)
        ids = torch.zeros((n, t), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        start = torch.tensor(starts)[:, None]  # (n, 1)
        positions = start + torch.arange(t)  # (n, T); padding's may pass the context
        real = torch.arange(t) < lengths[:, None]  # (n, T)
        write_slots = torch.tensor(slots)[:, None].expand(n, t)[real].to(self.device)  # (R,)
        write_pos = positions[real].to(self.device)  # (R,) R = real tokens
        attended = int((start[:, 0] + lengths).max())  # L: keys 0..L-1 of every row's slot
        # Query at position p attends keys 0..p of its slot: (n, 1, T, L). A padding
        # query attends from key 0 on, so no softmax row is empty (its output is dropped).
        mask = (torch.arange(attended) <= positions[:, :, None])[:, None].to(self.device)
        ids, slot_ids = ids.to(self.device), torch.tensor(slots, device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # (n,)
        x = self.wte(ids) + self.wpe(positions.clamp(max=self.n_ctx - 1).to(self.device))
        for block, kv in zip(self.blocks, self.kv_cache, strict=True):
            qkv = block.qkv.forward(block.ln_1(x)).to(self.cache_dtype)  # (n, T, 3C)
            qkv = qkv.view(n, t, 3, self.n_head, self.head_dim)
            # kv (2, S, H, T, D) indexed [:, slot, :, pos] is (R, 2, H, D)
            kv[:, write_slots, :, write_pos] = qkv[:, :, 1:][real.to(self.device)]
            q = qkv[:, :, 0].transpose(1, 2)  # (n, H, T, D)
            keys = kv[0, slot_ids, :, :attended]  # (n, H, L, D)
            values = kv[1, slot_ids, :, :attended]
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=block.scaling)
            x = self._finish_block(block, x, a.transpose(1, 2).reshape(n, t, self.n_embd))
        scored = [self.lm_head(self.ln_f(x[i, : len(prompts[i])])).float() for i in every_position]
        x = x[torch.arange(n, device=self.device), last]  # (n, C)
        return self.lm_head(self.ln_f(x)).float(), scored

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token for each sequence at its position, in its slot; returns logits (B, V)
        float32. `slots` ascend; when they are 0..B-1 no slot is gathered or scattered."""
        b = len(token_ids)
        if b == 1 and self.row_kind is not None:
            return self._decode_row(token_ids[0], positions[0], slots[0])
        span = slots[-1] + 1  # attention runs over slots 0..span-1, holes included
        length = max(positions) + 1  # L: no slot attends past the longest live sequence
        ids = torch.tensor(token_ids, device=self.device)  # (B,)
        pos = torch.tensor(positions, device=self.device)  # (B,)
        slot_ids = torch.tensor(slots, device=self.device)  # (B,)
        holes = span != b  # slots are sorted and unique: no holes iff they are 0..B-1
        # Slot s attends to its own positions 0..pos[s]; a hole attends to position 0
        # only (a finite row, discarded), so no row of the softmax is empty. When every
        # row attends all L positions (one sequence, or all at one length) no mask is
        # needed, and SDPA takes its faster unmasked path.
        mask = None
        if holes:
            live_pos = torch.zeros(span, dtype=pos.dtype, device=self.device)
            live_pos[slot_ids] = pos
            mask = torch.arange(length, device=self.device) <= live_pos[:, None]  # (S, L)
        elif min(positions) != length - 1:
            mask = torch.arange(length, device=self.device) <= pos[:, None]  # (B, L)
        if mask is not None:
            mask = mask[:, None, None, :]  # (S, 1, 1, L)
        x = self.wte(ids) + self.wpe(pos)  # (B, C)
        for block, kv in zip(self.blocks, self.kv_cache, strict=True):
            qkv = block.qkv.forward(block.ln_1(x)).to(self.cache_dtype)  # (B, 3C)
            qkv = qkv.view(b, 3, self.n_head, self.head_dim)
            # kv (2, S, H, T, D) indexed [:, slot, :, pos] is (B, 2, H, D): keys and
            # values written in one op.
            kv[:, slot_ids, :, pos] = qkv[:, 1:]
            q = qkv[:, 0, :, None]  # (B, H, 1, D)
            if holes:  # (S, H, 1, D), holes zero
                q = q.new_zeros((span, *q.shape[1:])).index_copy_(0, slot_ids, q)
            keys, values = kv[0, :span, :, :length], kv[1, :span, :, :length]  # (S, H, L, D)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=block.scaling)
            if holes:
                a = a.index_select(0, slot_ids)  # (B, H, 1, D)
            x = self._finish_block(block, x, a.reshape(b, self.n_embd))
        return self.lm_head(self.ln_f(x)).float()

    def _decode_row(self, token_id: int, position: int, slot: int) -> torch.Tensor:
        """`decode` for one sequence through textgen/csrc/row_decode.cpp: one call per
        layer. Returns logits (1, V) float32."""
        ops = torch.ops.textgen_row
        block = ops.block_bf16 if self.row_kind == "bf16" else ops.block_int8
        x = self.wte.weight[token_id] + self.wpe.weight[position]  # (C,) the model's dtype
        for weights, kv, layer in zip(self.row_weights, self.kv_cache, self.blocks, strict=True):
            block(x, weights, kv, slot, position, layer.scaling, layer.ln_1.eps)
        head = ops.head_bf16 if self.row_kind == "bf16" else ops.head_int8
        return head(x, self.ln_f.weight, self.ln_f.bias, self.ln_f.eps, self.row_head)[None]

    def _finish_block(self, block: _Block, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual stream x (..., C) and attention output a (..., C), heads merged ->
        the residual stream after the block."""
        x = block.attn_out.add(a.to(self.dtype), x)
        return block.mlp_out.add(block.fc.gelu(block.ln_2(x)), x)


ROW_SLICE = {"bf16": 32, "int8": 64}  # K-elements per 512-bit register


def _blocked_weight(weight: torch.Tensor, width: int) -> list[torch.Tensor]:
    """W (N, K), nn.Linear's layout -> [blocks (N // 8, K / width, 8, width), tail
    (N % 8, K)], the layout of textgen/csrc/row_decode.cpp: each group of 8 output rows is
    one contiguous run, the rows' width-wide slices of K interleaved. K % width == 0."""
    n, k = weight.shape
    grouped = n - n % 8
    blocks = weight[:grouped].reshape(grouped // 8, 8, k // width, width).transpose(1, 2)
    return [blocks.contiguous(), weight[grouped:].contiguous()]


def _row_weights(weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> list[torch.Tensor]:
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


def _row_projection(conv: nn.Module, kind: str) -> list[torch.Tensor]:
    """A Hugging Face Conv1D (weight (n_in, n_out)) -> its tensors for row_decode.cpp."""
    return _row_weights(conv.weight.detach().t(), conv.bias, kind)


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


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.2f} MiB"


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA's free memory; on the CPU,
    MemAvailable, or less when a cgroup (a container's memory limit) allows less."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_room(Path("/sys/fs/cgroup"))
    return available if room is None else min(available, room)


def cgroup_room(root: Path) -> int | None:
    """cgroup v2 `memory.max - memory.current` under `root`; None when unlimited."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None
