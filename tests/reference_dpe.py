"""A slow, literal DPE attention (Lu et al. 2025, LuLuLuyi/DPE ``dpe_for_llama.py``; Self-Extend, Jin et al. 2024):
the oracle for ``convert/runtimes/dpe.py``.

Per query and per key, in float64, from the un-rotated projections: a key at distance < W is scored with both
rotated at their true positions; a key at distance >= W with the query rotated at floor(p / s_i) + W - W / s_i and
the key at floor(p / s_i), pair by pair; one softmax over all keys (what merging the two passes by their
log-sum-exp weights amounts to).  It shares nothing with the runtime but the model's projections.
"""

from __future__ import annotations

import math
import types

import torch


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [H, d] in rotate-half layout (pair i = dims i and i + d/2), angles [d/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def reference_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      **kwargs):
    """Replaces one attention module's forward (batch 1, no cache): the naive per-position loop."""
    st = self._reference_dpe
    T = hidden_states.shape[1]
    d = self.head_dim
    h = hidden_states[0].double()
    q = torch.nn.functional.linear(h, self.q_proj.weight.double(),
                                   None if self.q_proj.bias is None else self.q_proj.bias.double()).view(T, -1, d)
    k = torch.nn.functional.linear(h, self.k_proj.weight.double(),
                                   None if self.k_proj.bias is None else self.k_proj.bias.double()).view(T, -1, d)
    v = torch.nn.functional.linear(h, self.v_proj.weight.double(),
                                   None if self.v_proj.bias is None else self.v_proj.bias.double()).view(T, -1, d)
    rep = q.shape[1] // k.shape[1]
    pos = [int(p) for p in kwargs["position_ids"][0].tolist()]
    inv = st["inv_freq"].double()
    scales = [float(s) for s in st["pair_scales"].tolist()]
    W = st["window"]
    out = torch.zeros(T, q.shape[1], d, dtype=torch.float64)
    for i in range(T):
        logits, values = [], []
        for j in range(T):
            dist = pos[i] - pos[j]
            if dist < 0:
                continue
            if dist < W:
                aq = torch.tensor([pos[i] * f for f in inv.tolist()], dtype=torch.float64)
                ak = torch.tensor([pos[j] * f for f in inv.tolist()], dtype=torch.float64)
            else:
                aq = torch.tensor([(math.floor(pos[i] / s) + W - W / s) * f for s, f in zip(scales, inv.tolist())],
                                  dtype=torch.float64)
                ak = torch.tensor([math.floor(pos[j] / s) * f for s, f in zip(scales, inv.tolist())],
                                  dtype=torch.float64)
            qi = _rotate_pairs(q[i], aq)  # [H, d]
            kj = _rotate_pairs(k[j], ak).repeat_interleave(rep, dim=0)
            logits.append((qi * kj).sum(-1) * self.scaling)  # [H]
            values.append(v[j].repeat_interleave(rep, dim=0))  # [H, d]
        w = torch.softmax(torch.stack(logits), dim=0)  # [n_keys, H]
        out[i] = (w[:, :, None] * torch.stack(values)).sum(0)
    o = out.reshape(1, T, -1).to(hidden_states.dtype)
    return self.o_proj(o), None


def use_reference(model, pair_scales: torch.Tensor, window: int):
    """Every attention module of ``model`` runs :func:`reference_forward` (this model instance only)."""
    inv = model.get_decoder().rotary_emb.inv_freq
    for m in model.modules():
        if hasattr(m, "q_proj") and hasattr(m, "layer_idx"):
            m._reference_dpe = {"inv_freq": inv, "pair_scales": torch.as_tensor(pair_scales), "window": int(window)}
            m.forward = types.MethodType(reference_forward, m)
    return model
