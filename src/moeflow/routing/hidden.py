"""Router inputs recorded per token and MoE layer, with the routers that read them: what speculative gating
(``routing.speculative``) is fitted and judged on, away from the device.

``record_hidden`` runs a checkpoint with plain transformers (float32, CPU or any torch device): each prompt is cut
to ``prefill`` tokens, ``decode`` tokens are generated greedily, then one forward over the whole sequence records,
at every MoE layer ``l``, the residual stream entering the layer's MoE block (the input of its
``post_attention_layernorm``) and the router's top-k (``generate=False``: the prompt's own next ``decode`` tokens
instead of generated ones, teacher-forced). The prompt counts as one prefill step, each generated token
as its own decode step, as the engine runs them. Forward hooks only (nothing of transformers is patched).

File (``.npz``): the routing as a ``moeflow-trace/1`` trace's fields (``trace_*``), ``residual`` float16 [N, L, H]
(trace row order), ``embed`` float16 [N, H] (the token's embedding: the residual before the first layer, known
before the step; "layer -1"), ``norm_weight`` [L, H], ``norm_eps``, ``gate_weight`` [L, E, H].
Legend: N tokens, L MoE layers, E experts, K top-k, H hidden width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeflow.errors import MoeflowError
from moeflow.routing.trace import Trace

FORMAT = "moeflow-hidden/1"
_TRACE_FIELDS = ("request", "position", "decode", "step", "token", "experts", "weights")


@dataclass(frozen=True)
class HiddenRecord:
    trace: Trace
    residual: np.ndarray
    """[N, L, H] float16: residual stream entering each MoE layer's block, trace row order."""
    embed: np.ndarray
    """[N, H] float16: the token's input embedding (the residual before the first layer)."""
    norm_weight: np.ndarray
    """[L, H] float32: each MoE layer's pre-router RMSNorm weight."""
    norm_eps: float
    gate_weight: np.ndarray
    """[L, E, H] float32: each MoE layer's router."""

    def save(self, path: str | os.PathLike) -> None:
        t = self.trace
        arrays = {f"trace_{k}": getattr(t, k) for k in _TRACE_FIELDS}
        np.savez_compressed(
            path, format=np.array(FORMAT), model=np.array(t.model), num_experts=np.array(t.num_experts),
            top_k=np.array(t.top_k), residual=self.residual.astype(np.float16), embed=self.embed.astype(np.float16), norm_weight=self.norm_weight,
            norm_eps=np.array(self.norm_eps), gate_weight=self.gate_weight, **arrays,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> HiddenRecord:
        if not Path(path).exists():
            raise MoeflowError(
                f"hidden-state file {path} does not exist; record one with `moeflow predictor record`"
            )
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != FORMAT:
                raise MoeflowError(
                    f"{path} is not a {FORMAT} file; record one with `moeflow predictor record`"
                )
            f = {k: z[f"trace_{k}"] for k in _TRACE_FIELDS}
            trace = Trace(str(z["model"]), int(z["num_experts"]), int(z["top_k"]), **f)
            return cls(trace, z["residual"], z["embed"], z["norm_weight"].astype(np.float32), float(z["norm_eps"]),
                       z["gate_weight"].astype(np.float32))  # fmt: skip

    def select(self, mask: np.ndarray) -> HiddenRecord:
        """The rows where ``mask`` [N] is True (the routers kept)."""
        return HiddenRecord(self.trace.select(mask), self.residual[mask], self.embed[mask], self.norm_weight,
                            self.norm_eps, self.gate_weight)  # fmt: skip

    def source(self, rows: np.ndarray | slice, layer: int) -> np.ndarray:
        """[n, H] float32 residual entering MoE layer ``layer`` (-1: the embedding, before the first layer)."""
        return (self.embed[rows] if layer < 0 else self.residual[rows, layer]).astype(np.float32)

    def router_input(
        self, layer: int, rows: np.ndarray | slice = slice(None), source: int | None = None
    ) -> np.ndarray:
        """[n, H] ``layer``'s router input computed from the residual of MoE layer ``source`` (default: its own)."""
        r = self.residual[rows, layer if source is None else source].astype(np.float32)
        scale = 1.0 / np.sqrt((r * r).mean(axis=-1, keepdims=True) + self.norm_eps)
        return r * scale * self.norm_weight[layer]

    def gate_logits(
        self, layer: int, rows: np.ndarray | slice = slice(None), source: int | None = None
    ) -> np.ndarray:
        """[n, E] router logits of ``layer`` applied to the residual of layer ``source`` (speculative gating)."""
        return self.router_input(layer, rows, source) @ self.gate_weight[layer].T


def _moe_modules(model: object) -> list[tuple[object, object]]:
    """(post-attention norm, router) of each MoE decoder layer."""
    out = []
    for layer in model.model.layers:  # type: ignore[attr-defined]
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None)
        norm = getattr(layer, "post_attention_layernorm", None)
        weight = getattr(gate, "weight", None)
        if norm is not None and weight is not None and weight.ndim == 2 and weight.shape[0] > 1:
            out.append((norm, gate))
    if not out:
        raise MoeflowError(
            "no MoE layers with a post_attention_layernorm and an mlp.gate router found in this model"
        )
    return out


def record_hidden(model_dir: str | os.PathLike, prompts: list[str], prefill: int = 64, decode: int = 32,
                  device: str = "cpu", progress: bool = True, generate: bool = True) -> HiddenRecord:  # fmt: skip
    """Record ``prompts`` (see the module docstring). ``generate`` False: the ``decode`` tokens are the prompt's
    own next tokens (teacher-forced; one forward per prompt), still counted as decode steps."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    mods = _moe_modules(model)
    k = int(getattr(model.config, "num_experts_per_tok", 0) or mods[0][1].top_k)
    captured: dict[int, torch.Tensor] = {}
    emb = model.get_input_embeddings().register_forward_hook(
        lambda m, a, o: captured.__setitem__(-1, o.detach())
    )
    hooks = [emb] + [norm.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, a[0].detach()))
             for i, (norm, _) in enumerate(mods)]  # fmt: skip
    rows: dict[str, list] = {k_: [] for k_ in _TRACE_FIELDS}
    resid: list[np.ndarray] = []
    embeds: list[np.ndarray] = []
    step = 0
    try:
        for rid, text in enumerate(tqdm(prompts, desc="record", disable=not progress, leave=False)):
            all_ids = tok(text, return_tensors="pt").input_ids.to(device)
            ids = all_ids[:, :prefill]
            if ids.shape[1] == 0:
                continue
            with torch.no_grad():
                if not generate:
                    full = all_ids[:, : prefill + decode]
                elif decode:
                    full = model.generate(ids, max_new_tokens=decode, do_sample=False, pad_token_id=0)
                else:
                    full = ids
                model(full)
                h = torch.stack([captured[i][0] for i in range(len(mods))], dim=1)  # [n, L, H]
                x = torch.stack(
                    [mods[i][0](h[:, i]) for i in range(len(mods))], dim=1
                )  # [n, L, H] router inputs
                probs = torch.softmax(
                    torch.einsum("nlh,leh->nle", x, torch.stack([g.weight for _, g in mods])), -1
                )
                w, ex = torch.topk(probs.float(), k, dim=-1)
            n, p = full.shape[1], ids.shape[1]
            resid.append(h.cpu().numpy().astype(np.float16))
            embeds.append(captured[-1][0].cpu().numpy().astype(np.float16))
            rows["request"].append(np.full(n, rid)), rows["position"].append(np.arange(n))
            rows["decode"].append(np.arange(n) >= p), rows["token"].append(full[0].cpu().numpy())
            rows["step"].append(step + np.maximum(0, np.arange(n) - p + 1))
            rows["experts"].append(ex.cpu().numpy()), rows["weights"].append(w.cpu().numpy())
            step += n - p + 1
    finally:
        for hk in hooks:
            hk.remove()
    f = {k_: np.concatenate(v) for k_, v in rows.items()}
    trace = Trace(Path(model_dir).name, int(mods[0][1].weight.shape[0]), k, **f)
    norms = np.stack([n_.weight.detach().float().cpu().numpy() for n_, _ in mods])
    eps = float(getattr(mods[0][0], "variance_epsilon", getattr(mods[0][0], "eps", 1e-6)))
    gates = np.stack([g.weight.detach().float().cpu().numpy() for _, g in mods])
    return HiddenRecord(trace, np.concatenate(resid), np.concatenate(embeds), norms, eps, gates)
