"""Sampling parameters (validated at construction) and the token samplers (greedy, temperature, top-k, top-p): per
request with its own generator, or one batched draw on the device for the rows that need no generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeflow.errors import RequestError
from moeflow.validate import check_float, check_int


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    """Tokens to generate at most."""
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Stop strings: generation ends when the text contains one (it is cut from the output)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    seed: int | None = None
    """Seed of the sampler (random draws are per batch)."""
    truncate_prompt: bool = False
    """A prompt too long for the context with ``max_tokens`` keeps its last tokens (default: refused)."""
    repetition_penalty: float = 1.0
    """Scores of tokens already in the sequence (prompt and output) are divided by this when positive and
    multiplied when negative, as transformers' ``repetition_penalty`` does (1 = off)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        check_int("max_tokens", self.max_tokens, 1, error=RequestError)
        check_float("temperature", self.temperature, 0, error=RequestError)
        check_int("top_k", self.top_k, 0, error=RequestError)
        check_float("top_p", self.top_p, 0, 1, lo_open=True, error=RequestError)
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) for s in self.stop):
            raise RequestError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.seed is not None:
            check_int("seed", self.seed, -(2**63), 2**64 - 1, error=RequestError)
        if not isinstance(self.truncate_prompt, bool):
            raise RequestError(f"truncate_prompt must be True or False, got {self.truncate_prompt!r}")
        check_float("repetition_penalty", self.repetition_penalty, 0, lo_open=True, error=RequestError)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    history: list[list[int]] | None = None,
) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V] -> [B]; ``history`` (each row's tokens so far) feeds the repetition
    penalty. The draw is on the CPU, from ``generator`` (a seeded request draws the same tokens on any device)."""
    if params.repetition_penalty != 1 and history is not None:
        logits = penalise(logits, history, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    n = logits.shape[0]
    scaled = filtered(logits, [params.temperature] * n, [params.top_k] * n, [params.top_p] * n)
    probs = scaled.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def pick_tokens(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                gens: list[torch.Generator | None], history: Callable[[int], list[int]],
                sampled: Callable[[], None] | None = None) -> list[int]:  # fmt: skip
    """Request ``i``'s next token from row ``rows[i]`` of ``logits`` [R, V]: the greedy ones by one argmax over every
    row, the sampled ones without a generator or a repetition penalty by one batched draw (``sample_rows``), both
    read back at once; the others alone by ``sample`` (``history(i)``: request i's tokens so far, for the penalty).
    ``sampled()`` runs once everything is sampled on the device, before the read-back. Rows are taken by slicing:
    indexing with a list would copy the index from pageable memory, a host wait for the step."""
    plain = [p.repetition_penalty == 1 for p in params]
    greedy = [i for i, p in enumerate(params) if plain[i] and p.temperature == 0]
    drawn = [i for i, p in enumerate(params) if plain[i] and p.temperature > 0 and gens[i] is None]
    tokens, batched = [0] * len(params), {*greedy, *drawn}
    picked = [logits.argmax(dim=-1)] if greedy else []  # [R] each: one read-back for both
    if drawn:
        picked.append(sample_rows(logits, [rows[i] for i in drawn], [params[i] for i in drawn]))
    for i, p in enumerate(params):
        if i not in batched:  # its own generator or a repetition penalty: sampled alone
            r = rows[i]
            tokens[i] = int(sample(logits[r : r + 1], p, gens[i], [history(i)])[0])
    if sampled is not None:
        sampled()
    if picked:
        every = torch.stack(picked).tolist()
        for group, chosen in zip([greedy, drawn] if greedy else [drawn], every):
            for i in group:
                tokens[i] = chosen[rows[i]]
    return tokens


def sample_rows(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> torch.Tensor:
    """One draw for every row of ``logits`` [R, V] -> [R] on its device, row ``rows[i]`` by ``params[i]`` (sampled
    settings without a seed or a repetition penalty; the other rows' tokens mean nothing): one batch of device
    work that the host does not wait for, where ``sample`` per row waits for each row's probabilities."""
    n = logits.shape[0]
    temperature, top_k, top_p = [1.0] * n, [0] * n, [1.0] * n
    for r, p in zip(rows, params):
        temperature[r], top_k[r], top_p[r] = p.temperature, p.top_k, p.top_p
    probs = filtered(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def filtered(
    logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """``logits`` [B, V] in float32, shifted so each row's largest score is 0 and divided by its temperature, with
    the tokens outside each row's top-k (0: all) and top-p (1: all) set to -inf. A setting every row shares is
    applied as a number (no tensor built and copied for it: ``sample`` always passes one setting)."""
    logits, device, vocab = logits.float(), logits.device, logits.shape[-1]
    # shift so the largest score is 0 before dividing (the same distribution, and no overflow to inf, then NaN), and
    # divide by at least float32's smallest normal (a smaller temperature would round to 0 in float32)
    tiny = torch.finfo(torch.float32).tiny
    temps = per_row(device, [max(t, tiny) for t in temperature], torch.float32)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temps
    if any(top_k):
        k = per_row(device, [min(k, vocab) for k in top_k], torch.int64)
        values = torch.topk(logits, min(max(top_k), vocab), dim=-1).values
        if isinstance(k, torch.Tensor):
            logits = logits.masked_fill(
                (k > 0) & (logits < values.gather(1, (k - 1).clamp(min=0))), float("-inf")
            )
        else:
            logits = logits.masked_fill(logits < values[:, -1:], float("-inf"))
    if any(p < 1 for p in top_p):
        p = per_row(device, top_p, torch.float32)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p  # keep the first token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop & (p < 1), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def per_row(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor | float | int:
    """``values`` (one per row) as a number when all are equal, else a [B, 1] tensor on ``device``, copied from
    pinned memory without a host wait where it is a GPU."""
    if all(v == values[0] for v in values):
        return values[0]
    cuda = device.type == "cuda"
    return torch.tensor([[v] for v in values], dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def penalise(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """``logits`` [B, V] with each row's seen tokens penalised (transformers' repetition-penalty rule)."""
    width = max(len(h) for h in history)
    ids = torch.tensor(
        [h + h[:1] * (width - len(h)) for h in history], device=logits.device
    )  # pad with a seen id
    seen = torch.gather(logits, 1, ids)
    return logits.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
