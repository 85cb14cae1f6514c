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
    """Index plan for attention over group-packed rows (train/step.py's group_packed_layout: per
    group [prefix][member 1]...[member K], groups side by side in a row), computed once per
    micro-batch and used by every layer.

    The tree mask lets a prefix position see the earlier positions of its prefix, and a member
    position see its group's whole prefix and the earlier positions of its own member, nothing
    else. Dense attention over a row computes all S x S pairs; this plan computes only the
    allowed blocks: one causal SDPA over the prefixes (gathered, padded to the longest) and one
    over the members, each member's queries against [its prefix ++ itself] (padded to the longest
    prefix + the longest member). For 4 members of 64 tokens after a 40-token prompt that is ~3x
    fewer query-key pairs than one group per row, and far fewer when groups share a row.

    Flat positions index [R * S]. ``prefix_q`` [G, P]: each group's prefix positions (padding
    repeats a valid one); ``member_q`` [M, Lq] / ``member_k`` [M, Lk]: query / key positions per
    member; ``member_allowed`` [M, 1, Lq, Lk] bool (True = attend); ``*_pos`` / ``*_sel``: the
    real tokens' flat positions and where they sit in the flattened block outputs. ``mask``: the
    dense mask this plan replaces (the attention uses the plan only when called with it).
    """

    mask: torch.Tensor
    rows: int
    width: int
    prefix_q: torch.Tensor
    prefix_pos: torch.Tensor
    prefix_sel: torch.Tensor
    member_q: torch.Tensor
    member_k: torch.Tensor
    member_allowed: torch.Tensor
    member_pos: torch.Tensor
    member_sel: torch.Tensor

    def matches(self, attention_mask: Any) -> bool:
        """Whether ``attention_mask`` is this plan's mask: the same tensor, or a view of the same
        memory (activation recomputation calls the attention again with a detached copy)."""
        if attention_mask is self.mask:
            return True
        return (isinstance(attention_mask, torch.Tensor) and attention_mask.data_ptr() == self.mask.data_ptr()
                and attention_mask.shape == self.mask.shape and attention_mask.stride() == self.mask.stride())

    @staticmethod
    def build(spans: list[tuple[int, int, int, list[tuple[int, int]]]], rows: int, width: int,
              mask: torch.Tensor) -> GroupAttentionPlan:
        """``spans``: per group, (row, prefix offset, prefix length, [(offset, length) per member])."""
        p_max = max((sp for _, _, sp, _ in spans), default=0)
        prefixes = [(row * width + start, sp) for row, start, sp, _ in spans if sp > 0]
        members = [(row * width + start, sp, row * width + off, ln)
                   for row, start, sp, ms in spans for off, ln in ms if ln > 0]
        l_max = max((ln for *_, ln in members), default=1)
        ar_p, ar_l = torch.arange(max(p_max, 1)), torch.arange(l_max)
        prefix_q = torch.zeros(len(prefixes), p_max, dtype=torch.long)
        p_pos, p_sel = [], []
        for j, (first, sp) in enumerate(prefixes):
            prefix_q[j] = first + ar_p[:p_max].clamp(max=sp - 1)
            p_pos.append(first + torch.arange(sp))
            p_sel.append(j * p_max + torch.arange(sp))
        m = len(members)
        q_idx = torch.zeros(m, l_max, dtype=torch.long)
        k_idx = torch.zeros(m, p_max + l_max, dtype=torch.long)
        allowed = torch.zeros(m, 1, l_max, p_max + l_max, dtype=torch.bool)
        causal = torch.ones(l_max, l_max, dtype=torch.bool).tril()
        m_pos, m_sel = [], []
        for j, (pfirst, sp, first, ln) in enumerate(members):
            own = first + ar_l.clamp(max=ln - 1)
            q_idx[j] = own
            k_idx[j, :p_max] = pfirst + ar_p[:p_max].clamp(max=max(sp - 1, 0))
            k_idx[j, p_max:] = own
            allowed[j, 0, :, :sp] = True
            allowed[j, 0, :, p_max:p_max + ln] = causal[:, :ln]
            m_pos.append(first + torch.arange(ln))
            m_sel.append(j * l_max + torch.arange(ln))
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))  # noqa: E731
        dev = mask.device
        return GroupAttentionPlan(mask, rows, width, prefix_q.to(dev), cat(p_pos).to(dev), cat(p_sel).to(dev),
                                  q_idx.to(dev), k_idx.to(dev), allowed.to(dev), cat(m_pos).to(dev),
                                  cat(m_sel).to(dev))


def group_attention(plan: GroupAttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    """Attention over group-packed rows by the plan. q, k, v [b, n, S, hn] (heads already
    expanded); returns [b, n, S, hn]; padding positions get zeros (nothing reads them: no
    position attends to padding and no loss sits on it)."""
    b, n, s, hn = q.shape
    flat = lambda t: t.permute(0, 2, 1, 3).reshape(b * s, n, hn)  # noqa: E731
    # index_select (backward: index_add) rather than advanced indexing (backward: a sorting
    # index_put with accumulation, measured 2x slower here); [blocks, L] -> [blocks, n, L, hn]
    take = lambda t, i: t.index_select(0, i.reshape(-1)).view(*i.shape, n, hn).permute(0, 2, 1, 3)  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    out = q.new_zeros(b * s, n, hn)
    for idx, keys, allowed, pos, sel in (
        (plan.prefix_q, plan.prefix_q, None, plan.prefix_pos, plan.prefix_sel),
        (plan.member_q, plan.member_k, plan.member_allowed, plan.member_pos, plan.member_sel),
    ):
        if not pos.numel():
            continue
        qb, kb, vb = take(qf, idx), take(kf, keys), take(vf, keys)  # [blocks, n, L, hn]
        if allowed is None:  # prefixes: plain causal attention within each one
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scale)
        ob = ob.permute(0, 2, 1, 3).reshape(-1, n, hn)
        out = out.index_copy(0, pos, ob.index_select(0, sel))
    return out.view(b, s, n, hn).permute(0, 2, 1, 3)


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention whose forward runs torch's fused scaled_dot_product_attention.

    ``group_plans``: GroupAttentionPlans set by train/step.py for one micro-batch's forward (and
    kept through its backward pass when the model recomputes activations); a call with one plan's
    mask computes only that plan's allowed blocks. Several are set at once under pipeline
    parallelism with recomputation: the 1F1B schedule runs later micro-batches' forwards before an
    earlier one's backward recomputes its attention, and each call finds its own plan by its mask.
    A mask no plan matches takes the dense masked path (the same result, more work)."""

    group_plans: tuple[GroupAttentionPlan, ...] = ()

    def plan_for(self, attention_mask: Any, rows: int, width: int) -> GroupAttentionPlan | None:
        """The plan made for ``attention_mask`` on [rows, width] inputs, or None."""
        for plan in self.group_plans:
            if plan.rows == rows and plan.width == width and plan.matches(attention_mask):
                return plan
        return None

    def _plain_softmax(self) -> bool:
        cfg = self.config
        return (getattr(cfg, "softmax_type", "vanilla") == "vanilla"
                and not getattr(cfg, "apply_query_key_layer_scaling", False))

    def _no_dropout(self) -> bool:
        return float(getattr(self.config, "attention_dropout", 0.0)) == 0.0

    def _fast_path(self, attention_bias: Any, packed_seq_params: Any) -> bool:
        return (attention_bias is None and packed_seq_params is None and self._plain_softmax()
                and (not self.training or self._no_dropout()))

    def takes_group_plans(self) -> bool:
        """Whether every call of this attention (training or not) runs the fast path, where a
        group-packed micro-batch's attention goes by its GroupAttentionPlan, so that the step may
        hand it a :func:`plan_only_mask` instead of the dense tree mask (Megatron passes no
        attention bias or packed_seq_params to it)."""
        return self._plain_softmax() and self._no_dropout()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        plan_only = is_plan_only_mask(attention_mask, query.shape[0])
        if not self._fast_path(attention_bias, packed_seq_params):
            if plan_only:
                raise RuntimeError("a group-packed micro-batch without its dense attention mask reached an "
                                   "attention path that needs one (attention bias, packed_seq_params, dropout or "
                                   "a non-vanilla softmax); build the layout with dense_mask=True")
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
        plan = self.plan_for(attention_mask, b, sq) if self.group_plans else None
        if plan is not None:
            out = group_attention(plan, q, k, v, self.softmax_scale)
        elif plan_only:
            raise RuntimeError(f"a group-packed micro-batch of {b} rows x {sq} positions came without its "
                               "GroupAttentionPlan (and without a dense mask to fall back on)")
        elif attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        else:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale)
        # [b, n, s, hn] -> [s, b, n * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def plan_only_mask(rows: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The attention mask of a group-packed micro-batch whose attention runs by its
    GroupAttentionPlan: a [rows, 1, 1, 1] stand-in for the dense [rows, 1, S, S] tree mask (at a
    row of 20,000 positions that one is 400 MB and seconds of CPU time to build). It only ties the
    micro-batch to its plan (GroupAttentionPlan.matches); SDPADotProductAttention refuses it on
    any path that would read it as a mask, and it masks everything, so nothing else can take it
    for a real one."""
    return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)


def is_plan_only_mask(attention_mask: Any, seq_len: int) -> bool:
    """Whether ``attention_mask`` is a :func:`plan_only_mask` for a sequence of ``seq_len`` positions."""
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and tuple(attention_mask.shape[-2:]) == (1, 1) and seq_len > 1)


def use_sdpa_core_attention(spec: Any) -> Any:
    """The local layer spec with SDPADotProductAttention as its core attention (in place)."""
    attn = spec.submodules.self_attention.submodules
    if attn.core_attention is DotProductAttention:
        attn.core_attention = SDPADotProductAttention
    return spec


__all__ = ["GroupAttentionPlan", "SDPADotProductAttention", "group_attention", "is_plan_only_mask", "plan_only_mask",
           "use_sdpa_core_attention"]
