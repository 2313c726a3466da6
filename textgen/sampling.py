"""Choosing the next token of each running sequence from its logits.

Greedy rows take the argmax of the model's logits unless a penalty or the
min_new_tokens rule changes them; sampling rows go through repetition /
presence / frequency penalties, temperature, top-k and top-p, then draw with
the sequence's own seeded generator, so a seed gives the same text whatever
else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen.scheduler import Sequence


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: float | None  # log-probability under the model's own distribution
    top_logprobs: tuple[tuple[int, float], ...]  # (id, logprob), best first


def choose_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_id: int | None
) -> list[Choice]:
    """logits: (B, V) float32, row i for seqs[i]. Returns one Choice per sequence."""
    processed = logits
    needs = [i for i, seq in enumerate(seqs) if _needs_processing(seq, eos_token_id)]
    if needs:
        processed = logits.clone()
        for i in needs:
            _apply_rules(processed[i], seqs[i], eos_token_id)
    tokens = processed.argmax(dim=-1).tolist()  # greedy rows, and the default
    sampling = [i for i, seq in enumerate(seqs) if seq.params.do_sample]
    if sampling:
        probs = _sampling_probs(processed[sampling], [seqs[i] for i in sampling])  # (S, V)
        for row, i in enumerate(sampling):
            draw = torch.multinomial(probs[row], 1, generator=seqs[i].generator)
            tokens[i] = int(draw)
    return [_choice(logits[i], tokens[i], seq) for i, seq in enumerate(seqs)]


def _needs_processing(seq: Sequence, eos_token_id: int | None) -> bool:
    suppress_eos = eos_token_id is not None and len(seq.output_ids) < seq.params.min_new_tokens
    return suppress_eos or seq.params.penalized


def _apply_rules(row: torch.Tensor, seq: Sequence, eos_token_id: int | None) -> None:
    """Edits one row (V,) in place: penalties, then EOS suppression before min_new_tokens."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids + seq.output_ids)), device=row.device)
        scores = row[seen]
        row[seen] = torch.where(
            scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty
        )
    if seq.output_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(seq.output_ids, device=row.device).unique(return_counts=True)
        row[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(row.dtype)
    if eos_token_id is not None and len(seq.output_ids) < p.min_new_tokens:
        row[eos_token_id] = float("-inf")


def _sampling_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """(S, V) logits -> (S, V) probabilities after temperature, top-k and top-p."""
    temperature = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
    logits = logits / temperature[:, None]
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (S, V)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        k = torch.tensor([k or logits.shape[-1] for k in top_k], device=logits.device)
        drop = rank[None, :] >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        p = torch.tensor(top_p, device=logits.device, dtype=probs.dtype)
        drop |= mass_before >= p[:, None]  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _choice(logits: torch.Tensor, token_id: int, seq: Sequence) -> Choice:
    k = seq.params.logprobs
    if k is None:
        return Choice(token_id, None, ())
    logprobs = logits.log_softmax(dim=-1)  # (V,) the model's distribution
    top = ()
    if k:
        values, ids = logprobs.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Choice(token_id, float(logprobs[token_id]), top)
