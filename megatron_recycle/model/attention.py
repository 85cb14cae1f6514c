"""Core attention for the local (CPU-safe) layer spec: megatron-core's DotProductAttention with
its arithmetic done by torch's ``scaled_dot_product_attention``.

Megatron's local core attention materializes [b, heads, s, s] scores with baddbmm, a separate
masked softmax and a bmm, and keeps the probabilities for backward; torch's SDPA does the same
product in one fused kernel per call (flash attention on CPU and GPU) and takes the same boolean
mask (inverted: Megatron marks masked positions True, SDPA marks the allowed ones). The
difference is the masked value (-inf instead of -10000), which only matters for a fully masked
row, which no layout here produces (every position sees itself). Anything the fast path does
not cover (softmax offsets, attention bias, packed THD sequences, query-key layer scaling,
dropout) goes to Megatron's own forward unchanged. Tests: tests/model/test_parity.py (logits
equal transformers'), tests/train/test_step.py (gradients across TP/PP/DP layouts),
tests/model/test_group_packing.py (arbitrary tree masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


@dataclass
class GroupAttentionPlan:
    """Index plan for attention over group-packed rows ([prefix][member 1]...[member K] per row,
    train/step.py's group_packed_layout), computed once per micro-batch and used by every layer.

    The tree mask lets a prefix position see the earlier prefix, and a member position see the
    whole prefix and the earlier positions of its own member, nothing else. Dense attention over
    a row computes all S x S pairs; this plan computes only the allowed blocks: one causal SDPA
    over the prefixes (rows padded to the longest prefix) and one over the members, each member's
    queries against [its row's prefix ++ itself] (padded to the longest prefix + longest member).
    For 4 members of 64 tokens after a 40-token prompt that is ~3x fewer query-key pairs.

    ``prefix_len`` / ``prefix_pos``: the longest prefix and the flat positions (in [R * S]) of
    real prefix tokens; ``member_q`` [M, Lq] / ``member_k`` [M, Lk]: flat query / key positions per
    member (padding repeats a valid position); ``member_allowed`` [M, 1, Lq, Lk] bool (True =
    attend); ``member_pos`` / ``member_sel``: the real member tokens' flat positions and where they
    sit in the flattened [M * Lq] member output. ``mask``: the dense mask this plan replaces (the
    attention uses the plan only when called with that very tensor).
    """

    mask: torch.Tensor
    rows: int
    width: int
    prefix_len: int
    prefix_pos: torch.Tensor
    prefix_sel: torch.Tensor
    member_q: torch.Tensor
    member_k: torch.Tensor
    member_allowed: torch.Tensor
    member_pos: torch.Tensor
    member_sel: torch.Tensor

    @staticmethod
    def build(spans: list[tuple[int, list[tuple[int, int]]]], width: int, mask: torch.Tensor) -> GroupAttentionPlan:
        """``spans``: per packed row, (prefix length, [(offset, length) of each member])."""
        rows = len(spans)
        p_max = max((sp for sp, _ in spans), default=0)
        members = [(r, sp, off, ln) for r, (sp, ms) in enumerate(spans) for off, ln in ms if ln > 0]
        l_max = max((ln for *_, ln in members), default=1)
        m = len(members)
        q_idx = torch.zeros(m, l_max, dtype=torch.long)
        k_idx = torch.zeros(m, p_max + l_max, dtype=torch.long)
        allowed = torch.zeros(m, 1, l_max, p_max + l_max, dtype=torch.bool)
        causal = torch.ones(l_max, l_max, dtype=torch.bool).tril()
        pos, sel = [], []
        for j, (r, sp, off, ln) in enumerate(members):
            base = r * width
            own = base + off + torch.arange(l_max).clamp(max=ln - 1)
            q_idx[j] = own
            k_idx[j, :p_max] = base + torch.arange(p_max).clamp(max=max(sp - 1, 0))
            k_idx[j, p_max:] = own
            allowed[j, 0, :, :sp] = True
            allowed[j, 0, :, p_max:p_max + ln] = causal[:, :ln]
            pos.append(base + off + torch.arange(ln))
            sel.append(j * l_max + torch.arange(ln))
        prefix_pos = [r * width + torch.arange(sp) for r, (sp, _) in enumerate(spans)]
        prefix_sel = [r * p_max + torch.arange(sp) for r, (sp, _) in enumerate(spans)]
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
        dev = mask.device
        return GroupAttentionPlan(mask, rows, width, p_max, cat(prefix_pos).to(dev), cat(prefix_sel).to(dev),
                                  q_idx.to(dev), k_idx.to(dev), allowed.to(dev), cat(pos).to(dev), cat(sel).to(dev))


def group_attention(plan: GroupAttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    """Attention over group-packed rows by the plan. q [b, n, S, hn], k/v [b, n, S, hn] (heads
    already expanded); returns [b, n, S, hn]; positions that are neither prefix nor member (row
    padding) get zeros (nothing reads them: no position attends to padding, no loss sits on it)."""
    b, n, s, hn = q.shape
    out = q.new_zeros(b * s, n, hn)
    if plan.prefix_len > 0 and plan.prefix_pos.numel():
        p = plan.prefix_len
        po = F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], is_causal=True, scale=scale)
        po = po.permute(0, 2, 1, 3).reshape(b * p, n, hn)
        out = out.index_copy(0, plan.prefix_pos, po.index_select(0, plan.prefix_sel))
    if plan.member_q.numel():
        flat = lambda t: t.permute(0, 2, 1, 3).reshape(b * s, n, hn)  # noqa: E731
        mq, mk = plan.member_q, plan.member_k
        qm = flat(q)[mq].permute(0, 2, 1, 3)  # [M, n, Lq, hn]
        kf, vf = flat(k), flat(v)
        km, vm = kf[mk].permute(0, 2, 1, 3), vf[mk].permute(0, 2, 1, 3)
        mo = F.scaled_dot_product_attention(qm, km, vm, attn_mask=plan.member_allowed, scale=scale)
        mo = mo.permute(0, 2, 1, 3).reshape(-1, n, hn)  # [M * Lq, n, hn]
        out = out.index_copy(0, plan.member_pos, mo.index_select(0, plan.member_sel))
    return out.view(b, s, n, hn).permute(0, 2, 1, 3)


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention whose forward runs torch's fused scaled_dot_product_attention.

    ``group_plan``: set (by train/step.py, for the duration of one micro-batch's forward) to a
    GroupAttentionPlan; a call with that plan's mask computes only the allowed blocks."""

    group_plan: GroupAttentionPlan | None = None

    def _fast_path(self, attention_bias: Any, packed_seq_params: Any) -> bool:
        cfg = self.config
        return (
            attention_bias is None
            and packed_seq_params is None
            and getattr(cfg, "softmax_type", "vanilla") == "vanilla"
            and not getattr(cfg, "apply_query_key_layer_scaling", False)
            and (not self.training or float(getattr(cfg, "attention_dropout", 0.0)) == 0.0)
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._fast_path(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b, heads, hn = query.shape
        groups = key.shape[2]
        # [s, b, n, hn] -> [b, n, s, hn]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if heads != groups:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        plan = self.group_plan
        if plan is not None and attention_mask is plan.mask and b == plan.rows and sq == plan.width:
            out = group_attention(plan, q, k, v, self.softmax_scale)
        elif attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        else:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale)
        # [b, n, s, hn] -> [s, b, n * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def use_sdpa_core_attention(spec: Any) -> Any:
    """The local layer spec with SDPADotProductAttention as its core attention (in place)."""
    attn = spec.submodules.self_attention.submodules
    if attn.core_attention is DotProductAttention:
        attn.core_attention = SDPADotProductAttention
    return spec


__all__ = ["GroupAttentionPlan", "SDPADotProductAttention", "group_attention", "use_sdpa_core_attention"]
