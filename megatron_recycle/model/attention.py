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

from typing import Any

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention whose forward runs torch's fused scaled_dot_product_attention."""

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
        if attention_mask is not None:
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


__all__ = ["SDPADotProductAttention", "use_sdpa_core_attention"]
