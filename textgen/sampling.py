"""Choosing the next token of every running sequence, as batched tensor work.

One `choose` per step over the step's (B, V) logits. In order, as transformers
applies its processors and warpers:

1. penalties, on the rows that have any: repetition (CTRL-style, over the
   prompt and the output), then presence and frequency (OpenAI, the output);
2. EOS suppressed in rows below their `min_new_tokens`;
3. greedy rows take the argmax; sampling rows divide by their temperature,
   keep their top-k, then their top-p nucleus, then drop tokens below
   min_p x the best one's probability, and draw.

Each sampling row draws one uniform number from its own request's generator
and picks by inverse CDF, so a seed gives the same text whatever shares the
batch. Token histories live in per-slot tensors, updated by one scatter a step.

Numerically total: a row whose model logits are not finite (NaN, +inf) fails
alone (token -1); penalties or temperatures that overflow are clamped in their
own row (NaN -> -inf, +inf -> the largest float); a row left with no candidate
falls back to the model's argmax. Nothing a row does can raise for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from textgen.scheduler import Sequence

INVALID = -1  # the token of a row whose model logits are not finite


@dataclass(frozen=True)
class Choice:
    token_id: int  # INVALID when the model's logits for the row were not finite
    logprob: float | None  # log-probability under the model's own distribution
    top_logprobs: tuple[tuple[int, float], ...]  # (id, logprob), best first


class Sampler:
    """Per-slot token histories for the penalties, and the batched choice."""

    def __init__(
        self, num_slots: int, vocab_size: int, device: torch.device, eos_token_id: int | None
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_id = eos_token_id
        # Only penalized sequences keep these up to date; admission resets a slot.
        self.output_counts = torch.zeros((num_slots, vocab_size), device=device)  # (S, V)
        self.in_prompt = torch.zeros((num_slots, vocab_size), dtype=torch.bool, device=device)

    def admit(self, seqs: Seq[Sequence]) -> None:
        """Starts the token histories of newly admitted sequences that need them."""
        for seq in seqs:
            if seq.params.penalized:
                self.output_counts[seq.slot].zero_()
                self.in_prompt[seq.slot].zero_()
                self.in_prompt[seq.slot, torch.tensor(seq.prompt_ids, device=self.device)] = True

    @torch.inference_mode()
    def choose(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[Choice]:
        """logits: (B, V) float32, row i for seqs[i]. One Choice per sequence."""
        valid = logits.amax(dim=-1).isfinite()  # (B,) NaN and +inf propagate to the max
        processed = self._process(logits, seqs)
        tokens = processed.argmax(dim=-1)  # (B,) greedy rows, and the fallback
        sampling = [i for i, seq in enumerate(seqs) if seq.params.do_sample]
        if sampling:
            rows = torch.tensor(sampling, device=self.device)
            drawn = self._sample(processed[rows], [seqs[i] for i in sampling])
            tokens[rows] = drawn
        # A row left with nothing to choose (all -inf) takes the model's own argmax.
        empty = processed.amax(dim=-1) == float("-inf")
        tokens = torch.where(empty, logits.argmax(dim=-1), tokens)
        tokens = torch.where(valid, tokens, INVALID)
        token_ids: list[int] = tokens.tolist()  # the step's one host synchronisation
        self._count(token_ids, seqs)
        return self._choices(logits, token_ids, seqs)

    def _process(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """Penalties and EOS suppression, on a copy, only when a row has any."""
        penalized = [i for i, seq in enumerate(seqs) if seq.params.penalized]
        eos = self.eos_token_id
        suppress = (
            [i for i, seq in enumerate(seqs) if len(seq.output_ids) < seq.params.min_new_tokens]
            if eos is not None
            else []
        )
        if not penalized and not suppress:
            return logits
        processed = logits.clone()
        if penalized:
            rows = torch.tensor(penalized, device=self.device)
            processed[rows] = self._penalize(processed[rows], [seqs[i] for i in penalized])
        if suppress:
            processed[torch.tensor(suppress, device=self.device), eos] = float("-inf")
        return processed

    def _penalize(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(P, V) logits -> penalized logits, clamped finite or -inf."""
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        counts = self.output_counts[slots]  # (P, V)
        generated = counts > 0
        seen = generated | self.in_prompt[slots]

        def column(name: str) -> torch.Tensor:  # (P, 1)
            return torch.tensor([getattr(s.params, name) for s in seqs], device=self.device)[
                :, None
            ]

        rep = column("repetition_penalty")
        x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)
        x = x - column("presence_penalty") * generated - column("frequency_penalty") * counts
        return _finite(x)

    def _sample(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(R, V) processed logits of sampling rows -> (R,) drawn token ids."""
        temperature = torch.tensor([s.params.temperature for s in seqs], device=self.device)
        x = x / temperature[:, None]
        k = [s.params.top_k or self.vocab_size for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        u = torch.tensor([s.rng.random() for s in seqs], device=self.device)  # (R,)
        if max(k) < self.vocab_size or min(top_p) < 1.0:
            # Candidates best first: top-k of the widest k in the batch (a full sort
            # only when some row has top_p without top_k).
            width = min(max(k), self.vocab_size)
            values, ids = x.topk(width, dim=-1) if width < self.vocab_size else x.sort(-1, True)
            rank = torch.arange(width, device=self.device)
            beyond_k = rank >= torch.tensor(k, device=self.device)[:, None]  # (R, K)
            values = _finite(values.masked_fill(beyond_k, float("-inf")))
            probs = values.softmax(dim=-1)  # (R, K) after top-k
            mass_before = probs.cumsum(dim=-1) - probs
            p = torch.tensor(top_p, device=self.device)[:, None]
            probs = probs.masked_fill((mass_before >= p) & (rank > 0), 0)  # the best stays
            probs = self._min_p(probs, seqs)
            return ids.gather(1, _inverse_cdf(probs, u)[:, None])[:, 0]
        probs = self._min_p(_finite(x).softmax(dim=-1), seqs)  # (R, V)
        return _inverse_cdf(probs, u)

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
            (seq.slot, t)
            for seq, t in zip(seqs, token_ids, strict=True)
            if seq.params.penalized and t != INVALID
        ]
        if rows:
            index = torch.tensor(rows, device=self.device).T  # (2, P)
            ones = torch.ones(index.shape[1], device=self.device)
            self.output_counts.index_put_((index[0], index[1]), ones, accumulate=True)

    def _choices(
        self, logits: torch.Tensor, token_ids: list[int], seqs: Seq[Sequence]
    ) -> list[Choice]:
        wanted = [
            i for i, s in enumerate(seqs) if s.params.logprobs is not None and token_ids[i] >= 0
        ]
        choices = [Choice(t, None, ()) for t in token_ids]
        if not wanted:
            return choices
        rows = torch.tensor(wanted, device=self.device)
        logprobs = logits[rows].log_softmax(dim=-1)  # (W, V) the model's distribution
        ids = torch.tensor([token_ids[i] for i in wanted], device=self.device)
        chosen = logprobs.gather(1, ids[:, None])  # (W, 1)
        k = max(seqs[i].params.logprobs or 0 for i in wanted)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0],) * 2
        for i, lp, values, ids in zip(
            wanted, chosen[:, 0].tolist(), top_values.tolist(), top_ids.tolist(), strict=True
        ):
            n = seqs[i].params.logprobs or 0
            choices[i] = Choice(token_ids[i], lp, tuple(zip(ids[:n], values[:n], strict=True)))
        return choices


def _finite(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never chosen), +inf -> the largest float (chosen, without NaN)."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)


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
