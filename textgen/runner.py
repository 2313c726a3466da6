"""The tensor work's batching: a slot-per-sequence KV cache and the steps that run
GPT-2 (textgen/gpt2.py) over it.

The cache is allocated once, at start, for `max_batch_size` slots of the full
context; a running sequence owns one slot (the scheduler hands them out) and
nothing in the cache ever moves. The runner turns a step's rows (token ids,
positions, slots) into tensors and attention metadata (`textgen.gpt2.Attention`) and
calls the model; the model holds the weights and the arithmetic. Sequences of
different lengths share one decode step without padding (`RaggedDecode`). A lone
sequence in bfloat16 or int8 on a CPU decodes through textgen/csrc's kernels.

With fixed shapes (the default on CUDA) decode runs at a few sizes only: the live rows
padded to a batch bucket, attending a length bucket (`FixedDecode`), over static input
buffers, so the same few shapes recur as sequences grow and come and go; on CUDA each
(batch, length) bucket is a CUDA graph captured at start and replayed.

Shapes: B sequences, S slots, T positions (the context), L attended positions
(the longest live sequence), C = n_embd, H heads of D = C / H, V vocab.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from torch import nn

from textgen.gpt2 import GPT2, CausalPrefill, FixedDecode, PrefixPrefill, RaggedDecode
from textgen.scheduler import length_groups

logger = logging.getLogger("bentoml.textgen")  # BentoML's logger shows it in its format
GIB = 1 << 30
SMALL_BATCH_BUCKETS = (1, 2, 4, 8)  # fixed-shape batch sizes below BATCH_BUCKET_STEP
BATCH_BUCKET_STEP = 16  # then every multiple of this, then max_batch_size
MIN_LENGTH_BUCKET = 128  # fixed-shape attended lengths: 128, 256, ... (doubling), then n_ctx


class CacheDoesNotFit(RuntimeError):
    """The KV cache is larger than the memory the settings allow it."""


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
        fixed_shapes: bool | None = None,
        cuda_graphs: bool = True,
        reuse_logits: bool = False,
    ) -> None:
        """Takes `model` over (`GPT2` converts it in place to the device and dtype).
        `n_ctx`: positions per slot (default: the model's); `memory_utilization`: the
        share of the memory available after loading the weights that the KV cache may
        take; `native_kernels`: whether bfloat16 and int8 on the CPU may decode one row
        with textgen/csrc's kernels (`row_kind`); `fixed_shapes`: decode at bucketed
        shapes (`_decode_fixed`), None: on CUDA only; `cuda_graphs`: with fixed shapes
        on CUDA, capture each bucket's decode as a CUDA graph now and replay it;
        `reuse_logits`: for a caller that reads `decode`'s logits before its next decode
        (the engine's step), they may be a view of a buffer that the next one overwrites:
        ragged decode writes them into one (max_batch_size, V) float32 buffer (the GEMM
        itself in float32; other dtypes copy the head's output in), and a graph replay
        returns its static logits uncloned. On the CPU a fresh (B, V) float32 tensor
        past glibc's mmap threshold is mapped, faulted in and unmapped at every step.
        Fixed shapes without a graph and the one-row native path still allocate theirs."""
        self.model = GPT2(model, device, dtype, quantize_int8, native_kernels)
        self.device = device
        self.dtype = self.model.dtype
        self.cache_dtype = self.model.cache_dtype
        self.dense_kind = self.model.dense_kind
        self.row_kind = self.model.row_kind  # "bf16", "int8" or None: one row's kernels
        self.vocab_size = self.model.vocab_size
        self.max_batch_size = max_batch_size
        self.n_ctx: int = n_ctx or self.model.n_positions
        self.fixed_shapes = device.type == "cuda" if fixed_shapes is None else fixed_shapes
        # Fixed shapes: one more slot after the sequences', the scratch slot, which
        # padding rows write and read and no sequence ever holds.
        self.scratch_slot = max_batch_size
        # Per layer, keys and values: (S, H, T, D), S = max_batch_size (+ 1 scratch).
        # One allocation, zero-filled: a position a mask hides must hold a finite number
        # (0 x NaN is NaN), so a slot that may hold NaN is cleared before reuse
        # (`clear_slots`).
        self.kv_cache = self._allocate_cache(
            max_batch_size, int(self.fixed_shapes), memory_utilization
        )
        self.kv_cache_bytes = self.kv_cache.numel() * self.kv_cache.itemsize
        self.batch_buckets = batch_buckets(max_batch_size)
        self.length_buckets = length_buckets(self.n_ctx)
        # Fixed shapes: per batch bucket B', the static inputs (3, B') long: token ids,
        # positions, slots. A step copies its rows (and padding) in with one copy.
        self.static_inputs: dict[int, torch.Tensor] = {}
        if self.fixed_shapes:
            self.static_inputs = {
                rows: torch.zeros((3, rows), dtype=torch.long, device=device)
                for rows in self.batch_buckets
            }
        # (B', L) -> the captured decode, which writes its logits into the first B' rows
        # of `static_logits` (max B', V) float32.
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.static_logits: torch.Tensor | None = None
        self.reuse_logits = reuse_logits
        self._logits_out: torch.Tensor | None = None  # (max_batch_size, V): `reuse_logits`
        if self.fixed_shapes and cuda_graphs and device.type == "cuda":
            self._capture_graphs()

    def _allocate_cache(self, slots: int, scratch: int, memory_utilization: float) -> torch.Tensor:
        """The zero-filled cache (layers, 2, slots + scratch, H, T, D), or CacheDoesNotFit."""
        shape = self.model.cache_shape(slots + scratch, self.n_ctx)
        needed = math.prod(shape) * self.cache_dtype.itemsize
        available = available_memory(self.device)
        if needed > memory_utilization * available:
            allowed = memory_utilization * available
            raise CacheDoesNotFit(
                f"the KV cache needs {_size(needed)} ({slots} slots"
                f"{f' + {scratch} scratch' if scratch else ''} x {self.n_ctx} "
                f"positions x {shape[0]} layers x {self.model.n_embd} x 2 (keys, values) x "
                f"{self.cache_dtype.itemsize} bytes) but may take only {_size(allowed)} "
                f"(TEXTGEN_MEMORY_UTILIZATION={memory_utilization:g} of {_size(available)} "
                f"available on {self.device}); lower TEXTGEN_MAX_BATCH_SIZE or "
                "TEXTGEN_MAX_MODEL_LEN"
            )
        return torch.zeros(shape, device=self.device, dtype=self.cache_dtype)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """Captures `forward_fixed` at every (batch, length) bucket as a CUDA graph, the
        largest first so that the others reuse its memory pool, and logs the time and
        memory they took. Capture runs padding rows only: it writes the scratch slot."""
        started = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        for inputs in self.static_inputs.values():  # every row a padding row
            inputs.copy_(torch.tensor([0, 0, self.scratch_slot])[:, None].expand_as(inputs))
        logits = torch.empty((self.batch_buckets[-1], self.vocab_size), device=self.device)
        pool = torch.cuda.graph_pool_handle()
        for length in reversed(self.length_buckets):
            for rows in reversed(self.batch_buckets):
                self.forward_fixed(rows, length)  # eager first: kernels chosen, workspaces made

                def step(rows: int = rows, length: int = length) -> None:
                    logits[:rows] = self.forward_fixed(rows, length)

                self.graphs[(rows, length)] = self._capture(step, pool)
        self.static_logits = logits
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        logger.info(
            "CUDA graphs: %d captured (batch sizes %s x attended lengths %s) in %.2fs, taking %s",
            len(self.graphs),
            self.batch_buckets,
            self.length_buckets,
            time.perf_counter() - started,
            _size(max(0, free_before - free_after)),
        )

    @staticmethod
    def _capture(step: Callable[[], None], pool: tuple[int, int]) -> torch.cuda.CUDAGraph:
        """`step`, captured as a CUDA graph in memory pool `pool`: each replay reruns its
        kernels over the same tensors (what they hold then)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            step()
        return graph

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
        ids = _padded(prompts).to(self.device)  # padding is never attended
        positions = torch.arange(ids.shape[1], device=self.device)  # (T,)
        attention = CausalPrefill(torch.tensor(slots, device=self.device))
        x = self.model.forward(ids, positions, attention, self.kv_cache)  # (n, T, C)
        return self._prefill_logits(x, prompts, every_position)

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
        ids = _padded(prompts)
        n, t = ids.shape
        lengths = torch.tensor([len(p) for p in prompts])  # (n,)
        start = torch.tensor(starts)[:, None]  # (n, 1)
        positions = start + torch.arange(t)  # (n, T); padding's may pass the context
        real = torch.arange(t) < lengths[:, None]  # (n, T)
        attended = int((start[:, 0] + lengths).max())  # L: keys 0..L-1 of every row's slot
        # Query at position p attends keys 0..p of its slot: (n, 1, T, L). A padding
        # query attends from key 0 on, so no softmax row is empty (its output is dropped).
        mask = (torch.arange(attended) <= positions[:, :, None])[:, None]
        attention = PrefixPrefill(
            slots=torch.tensor(slots, device=self.device),
            real=real.to(self.device),
            write_slots=torch.tensor(slots)[:, None].expand(n, t)[real].to(self.device),
            write_positions=positions[real].to(self.device),
            mask=mask.to(self.device),
            length=attended,
        )
        ids = ids.to(self.device)
        positions = positions.clamp(max=self.n_ctx - 1).to(self.device)
        x = self.model.forward(ids, positions, attention, self.kv_cache)  # (n, T, C)
        return self._prefill_logits(x, prompts, every_position)

    def _prefill_logits(
        self, x: torch.Tensor, prompts: list[list[int]], every_position: Seq[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Residual stream (n, T, C) after the last block -> the logits of each row's last
        position (n, V) and, for the rows in `every_position`, of all its positions."""
        scored = [self.model.logits(x[i, : len(prompts[i])]) for i in every_position]
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # (n,)
        x = x[torch.arange(len(prompts), device=self.device), last]  # (n, C)
        return self.model.logits(x), scored

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token for each sequence at its position, in its slot; returns logits (B, V)
        float32. `slots` ascend."""
        if len(token_ids) == 1 and self.row_kind is not None:
            return self.model.decode_row(token_ids[0], positions[0], slots[0], self.kv_cache)
        if self.fixed_shapes:
            return self._decode_fixed(token_ids, positions, slots)
        return self._decode_ragged(token_ids, positions, slots)

    def _decode_fixed(
        self, token_ids: list[int], positions: list[int], slots: list[int]
    ) -> torch.Tensor:
        """`decode` at bucketed shapes: the B rows padded to B' (the first batch bucket
        >= B) with rows of token 0 at position 0 of the scratch slot, attending L keys
        (the first length bucket > every position). Replays the (B', L) CUDA graph
        where one was captured."""
        b = len(token_ids)
        rows = bucket(self.batch_buckets, b)
        length = bucket(self.length_buckets, max(positions) + 1)
        pad = rows - b
        host = torch.tensor(
            [token_ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad],
            pin_memory=self.device.type == "cuda",
        )  # (3, B')
        self.static_inputs[rows].copy_(host, non_blocking=True)
        graph = self.graphs.get((rows, length))
        if graph is None or self.static_logits is None:
            return self.forward_fixed(rows, length)[:b]
        graph.replay()
        logits = self.static_logits[:b]  # the next replay overwrites static_logits
        return logits if self.reuse_logits else logits.clone()

    def forward_fixed(self, rows: int, length: int) -> torch.Tensor:
        """The decode step over the static inputs of batch bucket `rows` (B'), attending
        `length` (L) keys per row: logits (B', V) float32, padding rows' included. Reads
        and writes device tensors only (no host work), so a CUDA graph can capture it."""
        ids, positions, slots = self.static_inputs[rows]  # each (B',)
        attention = FixedDecode.build(slots, positions, length)
        return self.model.logits(self.model.forward(ids, positions, attention, self.kv_cache))

    def _decode_ragged(
        self, token_ids: list[int], positions: list[int], slots: list[int]
    ) -> torch.Tensor:
        """`decode` with shapes fitted to this step (`RaggedDecode`): when the slots are
        0..B-1 no slot is gathered or scattered."""
        b = len(token_ids)
        span = slots[-1] + 1  # attention runs over slots 0..span-1, holes included
        length = max(positions) + 1  # L: no slot attends past the longest live sequence
        ids = torch.tensor(token_ids, device=self.device)  # (B,)
        pos = torch.tensor(positions, device=self.device)  # (B,)
        slot_ids = torch.tensor(slots, device=self.device)  # (B,)
        # Slot s attends to its own positions 0..pos[s]; a hole attends to position 0
        # only (a finite row, discarded), so no row of the softmax is empty. When every
        # row attends all L positions (one sequence, or all at one length) no mask is
        # needed, and SDPA takes its faster unmasked path.
        mask = None
        if span != b:  # slots are sorted and unique: holes iff they are not 0..B-1
            live_pos = torch.zeros(span, dtype=pos.dtype, device=self.device)
            live_pos[slot_ids] = pos
            mask = torch.arange(length, device=self.device) <= live_pos[:, None]  # (S', L)
        elif min(positions) != length - 1:
            mask = torch.arange(length, device=self.device) <= pos[:, None]  # (B, L)
        if mask is not None:
            mask = mask[:, None, None, :]  # (S' or B, 1, 1, L)
        attention = RaggedDecode(slot_ids, pos, span, length, mask)
        x = self.model.forward(ids, pos, attention, self.kv_cache)  # (B, C)
        if not self.reuse_logits:
            return self.model.logits(x)
        if self._logits_out is None:
            shape = (self.max_batch_size, self.vocab_size)
            self._logits_out = torch.empty(shape, device=self.device)
        return self.model.logits(x, out=self._logits_out[:b])


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes fixed-shape decode runs at: 1, 2, 4, 8, then every multiple of 16,
    then `max_batch_size`, none above it (as nano-vllm's graph batch sizes)."""
    sizes = {b for b in SMALL_BATCH_BUCKETS if b < max_batch_size}
    sizes.update(range(BATCH_BUCKET_STEP, max_batch_size, BATCH_BUCKET_STEP))
    return sorted({*sizes, max_batch_size})


def length_buckets(n_ctx: int) -> list[int]:
    """The attended lengths fixed-shape decode runs at: 128, 256, ... below `n_ctx`,
    then `n_ctx`."""
    sizes, length = [], MIN_LENGTH_BUCKET
    while length < n_ctx:
        sizes.append(length)
        length *= 2
    return [*sizes, n_ctx]


def bucket(sizes: list[int], n: int) -> int:
    """The first of the ascending `sizes` that holds `n` (n <= sizes[-1])."""
    return sizes[bisect.bisect_left(sizes, n)]


def _padded(prompts: list[list[int]]) -> torch.Tensor:
    """Token ids (n, T), each row right-padded with 0 to the longest, on the CPU."""
    ids = torch.zeros((len(prompts), max(len(p) for p in prompts)), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt)
    return ids


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
