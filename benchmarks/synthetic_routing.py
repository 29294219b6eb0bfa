"""Synthetic routing traces with structure, for developing predictors and schedulers before real traces exist.

A fixed random "model" routes each token at layer l by top-k of ``a_l * token_score + (1 - a_l) * context_score
+ noise``: early layers follow the token id, deeper layers the request's context (an exponential average of
token vectors) — the pattern trained MoE routers show. Requests come from domains ("code", "prose") with
different token distributions (Zipf over overlapping vocabulary ranges) and a bigram chain; ``specialization``
adds a per-domain bias to the router scores (experts specialised by domain, as reported for OLMoE), so requests
of a domain share experts. The degree of specialisation is an assumption of this generator, not a measurement. Shapes: V vocabulary, L layers, E experts, K top-k, D latent width.
"""

from __future__ import annotations

import zlib

import numpy as np

from moeflow.routing.trace import Trace

DOMAINS = {"code": (0, 600), "prose": (400, 1000)}


class SyntheticRouter:
    def __init__(
        self,
        num_layers: int = 8,
        num_experts: int = 16,
        top_k: int = 2,
        vocab: int = 1000,
        dim: int = 16,
        noise: float = 0.35,
        seed: int = 0,
        specialization: float = 0.0,
    ):
        rng = np.random.default_rng(seed)
        self.L, self.E, self.K, self.V, self.noise = num_layers, num_experts, top_k, vocab, noise
        self.tok_vec = rng.normal(size=(vocab, dim)).astype(np.float32)  # [V, D]
        self.w_tok = rng.normal(size=(num_layers, dim, num_experts)).astype(np.float32)  # [L, D, E]
        self.w_ctx = rng.normal(size=(num_layers, dim, num_experts)).astype(np.float32)  # [L, D, E]
        self.alpha = np.linspace(0.9, 0.3, num_layers).astype(np.float32)  # [L] token share per layer
        self.seed, self.specialization = seed, specialization
        self.domain_bias = {d: rng.normal(size=(num_layers, num_experts)).astype(np.float32) for d in DOMAINS}

    def tokens(self, domain: str, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = DOMAINS[domain]
        ranks = np.arange(1, hi - lo + 1)
        p = 1.0 / ranks**1.1
        perm = np.random.default_rng(zlib.crc32(domain.encode())).permutation(hi - lo)
        p = p[perm] / p.sum()
        out = np.empty(n, np.int64)
        out[0] = lo + rng.choice(hi - lo, p=p)
        for i in range(1, n):  # bigram-ish: often a token near the previous one
            out[i] = lo + (
                rng.choice(hi - lo, p=p)
                if rng.random() < 0.6
                else (out[i - 1] - lo + rng.integers(1, 4)) % (hi - lo)
            )
        return out

    def route(self, tokens: np.ndarray, rng: np.random.Generator, domain: str | None = None) -> np.ndarray:
        """tokens [n] → experts [n, L, K]."""
        x = self.tok_vec[tokens]  # [n, D]
        ctx = np.zeros_like(x)
        acc = np.zeros(x.shape[1], np.float32)
        for i in range(len(x)):
            acc = 0.8 * acc + 0.2 * x[i]
            ctx[i] = acc * 2.0
        s = self.alpha[None, :, None] * np.einsum("nd,lde->nle", x, self.w_tok)
        s += (1 - self.alpha)[None, :, None] * np.einsum("nd,lde->nle", ctx, self.w_ctx)
        scale = s.std()
        if domain is not None and self.specialization:
            s += self.specialization * scale * self.domain_bias[domain][None]
        s += self.noise * rng.normal(size=s.shape) * scale
        return np.argsort(-s, axis=-1)[..., : self.K]

    def trace(
        self, domain: str, num_requests: int, prompt_len: int, decode_len: int, seed: int = 1, batch: int = 1
    ) -> Trace:
        """Requests run ``batch`` at a time: one prefill step each, then decode steps."""
        rng = np.random.default_rng(seed)
        cols = {k: [] for k in ("request", "position", "decode", "step", "token", "experts")}
        step = 0
        for b0 in range(0, num_requests, batch):
            group = range(b0, min(num_requests, b0 + batch))
            seqs = {r: self.tokens(domain, prompt_len + decode_len, rng) for r in group}
            routes = {r: self.route(t, rng, domain) for r, t in seqs.items()}
            for pos_range, dec in (
                (range(prompt_len), False),
                *((range(p, p + 1), True) for p in range(prompt_len, prompt_len + decode_len)),
            ):
                for r in group:
                    for p in pos_range:
                        for k, v in (
                            ("request", r),
                            ("position", p),
                            ("decode", dec),
                            ("step", step),
                            ("token", seqs[r][p]),
                            ("experts", routes[r][p]),
                        ):
                            cols[k].append(v)
                step += 1
        ex = np.asarray(cols["experts"], np.int64)
        return Trace(
            f"synthetic-L{self.L}E{self.E}K{self.K}-seed{self.seed}",
            self.E,
            self.K,
            np.asarray(cols["request"]),
            np.asarray(cols["position"]),
            np.asarray(cols["decode"]),
            np.asarray(cols["step"]),
            np.asarray(cols["token"]),
            ex,
            np.full(ex.shape, 1.0 / self.K, np.float32),
        )
