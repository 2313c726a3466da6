"""Choosing the next token of every running sequence, as batched tensor work.

One `choose` per step over the step's (B, V) logits. In order, as transformers
applies its processors and warpers:

1. penalties, on the rows that have any: repetition (CTRL-style, over the
   prompt and the output), then presence and frequency (OpenAI, the output);
2. each row's `logit_bias` added (OpenAI), then EOS and the row's stop token
   ids suppressed while it is below its `min_new_tokens`, then, on constrained
   rows (structured output), every token its grammar does not allow;
3. greedy rows take the argmax; sampling rows divide by their temperature,
   keep their top-k, then their top-p nucleus, then drop tokens below
   min_p x the best one's probability, and draw.

Each sampling row draws one uniform number from its own request's generator
and picks by inverse CDF, so a seed gives the same text whatever shares the
batch. Token histories live in per-slot tensors, updated by one scatter a step.

Numerically total: a row whose model logits are not finite (NaN, +inf), or
that is left with no candidate at all (its only finite logit is a suppressed
EOS, or its grammar allows no token with a finite logit), fails alone (token
INVALID); penalties or temperatures that overflow are
clamped in their own row (NaN -> -inf, +inf -> the largest float). Nothing a
row does can raise for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from textgen.params import SamplingParams
from textgen.scheduler import PromptLogprob, Sequence, TopLogprobs

INVALID = -1  # the token of a row whose model logits are not finite
# Candidates taken for top-p without top-k. A row whose nucleus (or whose run of ties with
# its k-th) is wider is drawn again over NUCLEUS_WIDE, then over the whole sorted vocabulary:
# a top-k of a few thousand costs a fraction of a full sort on the CPU.
NUCLEUS_GUESS = 256
NUCLEUS_WIDE = 4096
# A nucleus row goes to NUCLEUS_WIDE only when the candidates it needs at least (a bound that
# takes the tail as flat as its most likely token, `_draw_group`) are at most 1 / WIDE_MARGIN
# of them: a tail's probabilities fall, so a nucleus needs several times the bound. A row
# whose ties with its k-th passed its candidates goes there whenever they are fewer.
WIDE_MARGIN = 4
TIE_ROOM = 64  # candidates beyond top_k for ties with the k-th (bf16 logits tie often)


# What `choose` returns: one token id per row (INVALID for a row that failed), and for
# the rows whose sequences ask for logprobs, (logprob, top logprobs) by row.
Choices = tuple[list[int], dict[int, tuple[float, TopLogprobs]]]


class Sampler:
    """Per-slot token histories for the penalties, and the batched choice."""

    def __init__(
        self,
        num_slots: int,
        vocab_size: int,
        device: torch.device,
        eos_token_id: int | None,
        max_tokens: int = 1024,
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_id = eos_token_id
        # Token histories, per slot; only penalized sequences keep them, from admission.
        # history[s, :n] holds the n prompt and output tokens of the sequence in slot s;
        # output_counts[s, t] how often t was generated there.
        self.history = torch.zeros((num_slots, max_tokens), dtype=torch.long, device=device)
        self.output_counts = torch.zeros((num_slots, vocab_size), device=device)  # (S, V)
        # logit_bias[s] is the bias of the sequence in slot s, written when it is admitted
        # (only sequences that have one read their row).
        self.logit_bias = torch.zeros((num_slots, vocab_size), device=device)  # (S, V)

    def admit(self, seqs: Seq[Sequence]) -> None:
        """Starts the token histories and biases of newly admitted sequences that need them."""
        for seq in seqs:
            if seq.params.penalized:
                prompt = torch.tensor(seq.prompt_ids, device=self.device)
                self.history[seq.slot, : len(seq.prompt_ids)] = prompt
                self.output_counts[seq.slot].zero_()
            if seq.params.logit_bias:
                tokens, values = zip(*seq.params.logit_bias, strict=True)
                row = self.logit_bias[seq.slot]
                row.zero_()
                index = torch.tensor(tokens, device=self.device)
                row[index] = torch.tensor(values, device=self.device)  # ids are distinct

    @torch.inference_mode()
    def choose(
        self,
        logits: torch.Tensor,
        seqs: Seq[Sequence],
        forbidden: tuple[list[int], torch.Tensor] | None = None,
    ) -> Choices:
        """logits: (B, V) float32, row i for seqs[i]; the sampler may write into it.
        `forbidden`: (rows, (C, V) bool) the tokens each constrained row's grammar does not
        allow, mask c for row rows[c] (rows ascending)."""
        processed, bad = self._process(logits, seqs, forbidden)
        sampling = [i for i, seq in enumerate(seqs) if seq.params.do_sample]
        greedy = len(sampling) < len(seqs)  # some rows take the argmax
        if processed is logits:  # the common batch: one pass over the logits
            best, tokens = _max(logits, values_only=not greedy)  # (B,) each
            valid = best.isfinite()  # NaN and +inf reach the max, and so does all -inf
        else:
            valid = _max(logits, values_only=True)[0].isfinite()
            best, tokens = _max(processed, values_only=not greedy)
            valid &= best > float("-inf")  # something is left to choose from
        if not greedy:
            tokens = self._sample(processed, list(seqs))
        elif sampling:
            rows = torch.tensor(sampling, device=self.device)
            tokens[rows] = self._sample(processed[rows], [seqs[i] for i in sampling])
        if bad is not None:
            valid &= ~bad
        tokens = torch.where(valid, tokens, INVALID)
        token_ids: list[int] = tokens.tolist()  # the step's one host synchronisation
        self._count(token_ids, seqs)
        return token_ids, self._logprobs(logits, token_ids, seqs)

    def _process(
        self,
        logits: torch.Tensor,
        seqs: Seq[Sequence],
        forbidden: tuple[list[int], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Penalties, logit biases, EOS and stop-token suppression, grammar masks, when
        any. Returns the processed logits (a copy, unless only suppression applies and no
        row reads the model's own distribution for logprobs: then `logits` itself, written
        in place),
        and for in-place suppression the rows (B,) bool whose suppressed entries were NaN
        or +inf, which the max over the row can no longer see."""
        penalized = [i for i, seq in enumerate(seqs) if seq.params.penalized]
        biased = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
        # Below min_new_tokens, EOS and the stop tokens can't be chosen (as in vLLM).
        suppress = [
            (i, t)
            for i, seq in enumerate(seqs)
            if len(seq.output_ids) < seq.params.min_new_tokens
            for t in (
                *((self.eos_token_id,) if self.eos_token_id is not None else ()),
                *seq.params.stop_token_ids,
            )
        ]
        if not penalized and not biased and not suppress and forbidden is None:
            return logits, None
        if not penalized and not biased and not suppress and len(forbidden[0]) == len(seqs):
            return _masked_copy(logits, forbidden[1]), None  # one pass: no clone, then mask
        # Only suppression, and no row reads the model's own distribution (logprobs):
        # every request that asks for exactly n tokens, every step. Written in place: no
        # (B, V) copy, and the greedy batch keeps its one pass.
        in_place = (
            not penalized
            and not biased
            and forbidden is None
            and all(s.params.logprobs is None for s in seqs)
        )
        processed = logits if in_place else logits.clone()
        if penalized:
            rows = torch.tensor(penalized, device=self.device)
            processed[rows] = self._penalize(processed[rows], [seqs[i] for i in penalized])
        if biased:  # |bias| <= 100: finite logits stay finite, -inf stays -inf
            rows = torch.tensor(biased, device=self.device)
            slots = torch.tensor([seqs[i].slot for i in biased], device=self.device)
            processed[rows] += self.logit_bias[slots]
        bad = None
        if suppress:
            index = torch.tensor(suppress, device=self.device).T  # (2, N): rows, tokens
            if in_place:  # what the max over the raw row would have seen
                held = processed[index[0], index[1]]  # (N,)
                hidden = (held.isnan() | (held == float("inf"))).int()
                bad = torch.zeros(len(seqs), dtype=torch.int32, device=self.device)
                bad = bad.index_add_(0, index[0], hidden) > 0
            processed[index[0], index[1]] = float("-inf")
        if forbidden is not None:  # last: nothing after it can make a masked token finite
            rows, mask = forbidden
            if len(rows) == len(seqs):  # every row constrained: rows are 0 .. B - 1
                _mask_out(processed, mask)
            else:
                index = torch.tensor(rows, device=self.device)
                constrained = processed[index]  # (C, V) a copy
                _mask_out(constrained, mask)
                processed[index] = constrained
        return processed, bad

    def _penalize(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(P, V) logits -> penalized logits, clamped finite or -inf. Works on the seen
        tokens only: (P, N) for N the longest history, not (P, V)."""
        slots = torch.tensor([s.slot for s in seqs], device=self.device)[:, None]  # (P, 1)
        lengths = torch.tensor([s.num_tokens for s in seqs], device=self.device)[:, None]
        n = max(s.num_tokens for s in seqs)
        seen = self.history[slots[:, 0], :n]  # (P, N) token ids
        # Past a row's length, repeat its first token: gathered and written back alike.
        seen = torch.where(torch.arange(n, device=self.device) < lengths, seen, seen[:, :1])
        counts = self.output_counts[slots, seen]  # (P, N)

        def column(name: str) -> torch.Tensor:  # (P, 1)
            values = [getattr(s.params, name) for s in seqs]
            return torch.tensor(values, device=self.device)[:, None]

        rep = column("repetition_penalty")
        scores = x.gather(1, seen)
        scores = torch.where(scores < 0, scores * rep, scores / rep)
        scores = scores - column("presence_penalty") * (counts > 0)
        scores = scores - column("frequency_penalty") * counts
        return x.scatter(1, seen, _finite(scores))

    def _sample(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(R, V) processed logits of sampling rows -> (R,) drawn token ids.

        Rows are grouped by how many candidates they take (`_width`), which depends on
        the row alone, one topk per group: so a seed draws the same token alone or
        batched, even where logits tie (bfloat16). A row the group's width was too
        narrow for is drawn again, with the same uniform, over NUCLEUS_WIDE candidates, and
        past those over the sorted vocabulary.
        """
        temperature = torch.tensor([s.params.temperature for s in seqs], device=self.device)
        u = torch.tensor([s.rng.random() for s in seqs], device=self.device)  # (R,)
        out = torch.empty(len(seqs), dtype=torch.long, device=self.device)
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(self._width(seq.params), []).append(i)
        while groups:
            width, group = groups.popitem()
            # Rows join a wider group as they fall short, in no set order; in row order,
            # a group of every row is the batch itself (`every`: no gather, no scatter).
            group.sort()
            rows = torch.tensor(group, device=self.device)
            every = len(group) == len(seqs)  # the usual batch: no gather, no scatter
            args = (x, temperature, u) if every else (x[rows], temperature[rows], u[rows])
            group_seqs = [seqs[i] for i in group]
            if width == 0:  # neither top-k nor top-p
                out[rows] = self._draw_whole(*args, group_seqs)
                continue
            tokens, wanted = self._draw_group(*args, group_seqs, width)
            out[rows] = tokens
            if wanted is not None:
                can_widen = width < NUCLEUS_WIDE < self.vocab_size
                for i, n in zip(group, wanted.tolist(), strict=True):
                    if n > width:  # NUCLEUS_WIDE when likely enough, else all
                        wide = can_widen and n <= NUCLEUS_WIDE
                        groups.setdefault(NUCLEUS_WIDE if wide else self.vocab_size, []).append(i)
        return out

    def _width(self, params: SamplingParams) -> int:
        """Candidates a row takes: 0 (the whole distribution) without top-k and top-p,
        its top_k and room for ties, else NUCLEUS_GUESS."""
        if 0 < params.top_k < self.vocab_size:
            return min(self.vocab_size, params.top_k + TIE_ROOM)
        if params.top_p < 1.0:
            return min(self.vocab_size, NUCLEUS_GUESS)
        return 0

    def _draw_whole(
        self, x: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor, seqs: list[Sequence]
    ) -> torch.Tensor:
        """Rows with neither top-k nor top-p: (R, V) logits, (R,), (R,) -> (R,) ids."""
        probs = self._min_p(_finite(x / temperature[:, None]).softmax(dim=-1), seqs)  # (R, V)
        return _inverse_cdf(probs, u)

    def _draw_group(
        self,
        x: torch.Tensor,
        temperature: torch.Tensor,
        u: torch.Tensor,
        seqs: list[Sequence],
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G, V) logits, (G,), (G,) -> (G,) ids, and None when `width` candidates were
        enough for every row, else (G,) how many each row likely wants: `width` where they
        were enough, more where its nucleus (top-p alone) or the tokens tied with its k-th
        go past them. A nucleus short of top_p by m after candidates whose last has
        probability q needs at least m / q more (no token past them is more likely), and
        likely WIDE_MARGIN times its width and those; a run of ties, one more. Such rows
        are drawn again over more candidates (`_sample`)."""
        vocab = self.vocab_size
        temperature = temperature[:, None]  # (G, 1)
        if width < vocab:
            values, ids = x.topk(width, dim=-1)  # (G, W) best first
        else:
            values, ids = x.sort(dim=-1, descending=True, stable=True)
        values = _finite(values / temperature)
        k = [s.params.top_k if 0 < s.params.top_k < vocab else 0 for s in seqs]  # 0: none
        nucleus_only = torch.tensor([kk == 0 for kk in k], device=self.device)[:, None]
        # Top-k keeps the candidates tied with the k-th, as transformers does. A last
        # candidate at -inf ties with nothing: no finite token lies past it (a row with
        # fewer than top_k tokens allowed, as a grammar leaves most of them).
        kth = torch.tensor([kk - 1 if kk else width - 1 for kk in k], device=self.device)
        kth_value = values.gather(1, kth[:, None])  # (G, 1)
        last = values[:, -1:]  # (G, 1)
        ties_beyond = ~nucleus_only & (last >= kth_value) & (last > float("-inf"))
        values = values.masked_fill(values < kth_value, float("-inf"))
        # Probabilities after top-k over its survivors, and over the whole distribution
        # for top-p alone (as transformers applies them). log_softmax, not logsumexp:
        # its per-row result does not depend on how many rows share the call.
        probs = values.log_softmax(dim=-1).exp()  # (G, W)
        if 0 in k and width < vocab:
            whole = _finite(x / temperature).log_softmax(dim=-1).gather(1, ids).exp()
            probs = torch.where(nucleus_only, whole, probs)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=self.device)[:, None]
        short_by = top_p - probs.sum(dim=-1, keepdim=True)  # (G, 1)
        too_narrow = nucleus_only & (short_by > 0)
        least = probs[:, -1:]  # (G, 1) the least likely candidate
        mass_before = probs.cumsum(dim=-1) - probs
        rank = torch.arange(width, device=self.device)
        cut = (mass_before >= top_p) & (top_p < 1) & (rank > 0)  # the best always stays
        probs = self._min_p(probs.masked_fill(cut, 0), seqs)
        tokens = ids.gather(1, _inverse_cdf(probs, u)[:, None])[:, 0]
        if width >= vocab or not bool((too_narrow | ties_beyond).any()):  # a host sync
            return tokens, None
        nucleus = (width + (short_by / least).ceil().clamp(1, vocab)) * WIDE_MARGIN
        wanted = torch.where(too_narrow, nucleus, width + torch.where(ties_beyond, 1, 0))
        return tokens, wanted.clamp(max=vocab).long()[:, 0]

    def _min_p(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Drops tokens below min_p x the best token's probability (rows with min_p > 0)."""
        min_p = [s.params.min_p for s in seqs]
        if not any(min_p):
            return probs
        floor = torch.tensor(min_p, device=self.device)[:, None] * probs.amax(-1, keepdim=True)
        return probs.masked_fill(probs < floor, 0)

    def _count(self, token_ids: list[int], seqs: Seq[Sequence]) -> None:
        """Adds this step's tokens to the histories of penalized sequences."""
        rows = [
            (seq.slot, seq.num_tokens, t)
            for seq, t in zip(seqs, token_ids, strict=True)
            if seq.params.penalized and t != INVALID and seq.num_tokens < self.history.shape[1]
        ]
        if rows:
            slot, position, token = torch.tensor(rows, device=self.device).T  # each (P,)
            self.history[slot, position] = token
            ones = torch.ones(len(rows), device=self.device)
            self.output_counts.index_put_((slot, token), ones, accumulate=True)

    def _logprobs(
        self, logits: torch.Tensor, token_ids: list[int], seqs: Seq[Sequence]
    ) -> dict[int, tuple[float, TopLogprobs]]:
        """(logprob, top logprobs) of the chosen token under the model's own distribution,
        by row, for the rows whose sequences ask for logprobs and did not fail."""
        wanted = [
            i for i, s in enumerate(seqs) if s.params.logprobs is not None and token_ids[i] >= 0
        ]
        if not wanted:
            return {}
        rows = torch.tensor(wanted, device=self.device)
        logprobs = logits[rows].log_softmax(dim=-1)  # (W, V) the model's distribution
        ids = torch.tensor([token_ids[i] for i in wanted], device=self.device)
        chosen = logprobs.gather(1, ids[:, None])  # (W, 1)
        k = max(seqs[i].params.logprobs or 0 for i in wanted)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0],) * 2
        out = {}
        for i, lp, values, ids in zip(
            wanted, chosen[:, 0].tolist(), top_values.tolist(), top_ids.tolist(), strict=True
        ):
            n = seqs[i].params.logprobs or 0
            out[i] = (lp, tuple(zip(ids[:n], values[:n], strict=True)))
        return out


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[PromptLogprob]:
    """(T, V) float32 logits of every prompt position (row t predicts token t + 1) -> one
    entry per prompt token: None for the first, then (logprob, top k). Raises ValueError
    when the model's logits are not finite."""
    if not bool(logits.isfinite().all()):
        raise ValueError("the model's logits for the prompt are not finite")
    logprobs = logits[:-1].log_softmax(dim=-1)  # (T - 1, V)
    ids = torch.tensor(prompt_ids[1:], device=logits.device)
    chosen: list[float] = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0],) * 2
    entries: list[PromptLogprob] = [None]
    for lp, values, tops in zip(chosen, top_values.tolist(), top_ids.tolist(), strict=True):
        entries.append((lp, tuple(zip(tops, values, strict=True))))
    return entries


def _max(x: torch.Tensor, values_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) -> (B,) the row maxima and (B,) their first indices (NaN counts as the
    largest, as torch's max does); `values_only` leaves the indices empty. On the CPU by
    numpy, whose argmax over float32 rows is vectorized and torch's max with indices
    is not."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        a = x.numpy()
        if values_only:
            return torch.from_numpy(a.max(axis=-1)), torch.empty(0, dtype=torch.long)
        index = a.argmax(axis=-1)
        return torch.from_numpy(a[np.arange(len(a)), index]), torch.from_numpy(index)
    if values_only:
        return x.amax(dim=-1), torch.empty(0, dtype=torch.long, device=x.device)
    best, index = x.max(dim=-1)
    return best, index


def _mask_out(x: torch.Tensor, forbidden: torch.Tensor) -> None:
    """x[forbidden] = -inf, in place: (C, V) float, (C, V) bool on x's device. On the CPU
    by numpy's masked copy, which is faster there than torch's masked_fill_."""
    cpu = x.device.type == "cpu" and x.dtype == torch.float32
    if cpu and x.is_contiguous() and forbidden.is_contiguous():
        np.copyto(x.numpy(), -np.inf, where=forbidden.numpy(), casting="unsafe")
    else:
        x.masked_fill_(forbidden, float("-inf"))


def _masked_copy(x: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """x with x[forbidden] = -inf, as a new tensor: (C, V) float, (C, V) bool on x's device.
    On the CPU by numpy's `where`, one pass that writes each entry once (a copy, then a
    masked write, is two)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        masked = np.where(forbidden.numpy(), np.float32(-np.inf), x.numpy())
        return torch.from_numpy(masked)
    return x.masked_fill(forbidden, float("-inf"))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest float (chosen, without NaN)."""
    inf = float("inf")
    return torch.nan_to_num(x, nan=-inf, posinf=torch.finfo(x.dtype).max, neginf=-inf)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(R, N) unnormalized probabilities, (R,) uniforms in [0, 1) -> (R,) column indices.

    Picks the first column whose running mass exceeds u x the total, which is
    always a column of nonzero probability. A row with no mass picks column 0.
    """
    cdf = probs.cumsum(dim=-1)  # (R, N)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    picked = torch.searchsorted(cdf, target[:, None].contiguous(), right=True)[:, 0]
    return torch.where(total > 0, picked.clamp_(max=probs.shape[-1] - 1), 0)
