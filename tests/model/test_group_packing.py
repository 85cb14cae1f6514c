"""Group packing in the training step: a group's shared prefix computed once, the same result.

Tiny random Llama and Qwen3 (fp32, one process). Three groups of three sequences: plain
prompt + completion; a multi-turn one (a loss-free observation between two generated parts,
members of different lengths); and one whose members also share their first generated tokens
(those carry loss, so they must not be shared). One SGD step with lr 1 and no clipping makes
the weight change equal to minus the gradient, so packed and padded gradients are compared
directly. Tolerances: log-probs 2e-5 absolute, gradients 1e-5 * max|grad| (fp32 sums in a
different order; measured ~1e-7).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from megatron_recycle.model.build import build_model_chunks
from megatron_recycle.model.convert import load_hf_weights
from megatron_recycle.train.batch import build_batch
from megatron_recycle.train.optim import wrap_model_and_build_optimizer
from megatron_recycle.train.packing import group_packed_layout, shared_prefix_length
from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

K = 3


def _sequences(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(4, 128, (n,), generator=g).tolist()  # noqa: E731
    seqs, masks, gids = [], [], []
    for gi in range(3):
        prompt = rand(6 + 3 * gi)
        common_start = rand(2)
        for _ in range(K):
            comp = rand(int(torch.randint(2, 9, (1,), generator=g)))
            if gi == 2:
                comp = common_start + comp
            seq, mask = prompt + comp, [0] * len(prompt) + [1] * len(comp)
            if gi == 1:  # a retrieved observation (no loss), then a second generated turn
                obs, more = rand(4), rand(int(torch.randint(1, 4, (1,), generator=g)))
                seq, mask = seq + obs + more, mask + [0] * 4 + [1] * len(more)
            seqs.append(seq)
            masks.append(mask)
            gids.append(gi)
    adv = torch.randn(len(seqs), generator=g)
    return seqs, masks, gids, adv


def _model(tiny, kind, tied):
    hf = tiny.tiny_hf_model(kind, tied)
    chunks = build_model_chunks(hf.config, layer_spec="local")
    load_hf_weights(chunks, hf)
    return wrap_model_and_build_optimizer(chunks, lr=1.0, clip_grad=1e9, optimizer="sgd",
                                          lr_decay_style="constant", total_steps=10)


def test_layout_shares_only_loss_free_prefixes():
    seqs, masks, gids, adv = _sequences()
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    lens = batch.lengths.tolist()
    prefix = [shared_prefix_length(batch.tokens[i:i + K], batch.loss_mask[i:i + K], lens[i:i + K])
              for i in range(0, 9, K)]
    # the last prompt token is repeated in every suffix; shared generated tokens are never shared
    assert prefix == [6 - 1, 9 - 1, 12 - 1]
    p = group_packed_layout(batch)
    assert p.tokens.shape[0] == 1 and p.saved_tokens > 0  # all three groups side by side in one row
    assert p.tokens.shape[1] == sum(sp + sum(ln for _, ln in ms) for _, _, sp, ms in p.spans)  # no padding
    for i, (seq, ln) in enumerate(zip(seqs, lens)):
        # every target of every sequence is found at its gathered position
        flat_targets = p.targets.reshape(-1)[p.gather_index[i, : ln - 1]]
        assert flat_targets.tolist() == seq[1:]
        flat_pos = p.position_ids.reshape(-1)[p.gather_index[i, : ln - 1]]
        assert flat_pos.tolist() == list(range(ln - 1))
    m = ~p.attention_mask[0, 0]
    assert sorted(sp for _, _, sp, _ in p.spans) == sorted(prefix)
    spans = sorted(p.spans, key=lambda sp: sp[1])  # by offset in the row
    (_, a0, s0, ms0), (_, a1, s1, _) = spans[0], spans[1]
    assert a0 == 0 and a1 == s0 + sum(ln for _, ln in ms0)
    (o1, l1), (o2, _) = ms0[0], ms0[1]
    # a suffix never sees another member's suffix; the prefix sees only itself
    assert m[o2, o1 : o1 + l1].sum() == 0  # member 2's first token vs member 1
    assert m[o2, a0 : a0 + s0].all() and m[a0 : a0 + s0, o1:].sum() == 0
    # groups never see each other
    assert m[a1:, : a1].sum() == 0
    assert torch.equal(m[a1 : a1 + s1, a1 : a1 + s1], torch.ones(s1, s1, dtype=torch.bool).tril())
    # one group per row when the row budget is small; rows then pad to the longest group
    narrow = group_packed_layout(batch, row_tokens=1)
    assert narrow.tokens.shape[0] == 3 and narrow.saved_tokens < p.saved_tokens
    with pytest.raises(ValueError, match="group_ids"):
        group_packed_layout(build_batch(seqs, masks))


def test_one_packed_shape_for_interleaved_pipelines():
    """Virtual pipeline stages exchange one tensor shape: each micro-batch's packed layout is
    padded (rows and columns) to the largest one, keeping its tokens, targets and gathers; when
    that would cost as many positions as padded rows, the micro-batches stay padded."""
    from megatron_recycle.train.packing import one_packed_shape

    seqs, masks, gids, adv = _sequences(seed=3)
    cuts = [build_batch(seqs[i:i + K], masks[i:i + K], advantages=adv[i:i + K], group_ids=gids[i:i + K])
            for i in range(0, 9, K)]
    natural = [group_packed_layout(mb) for mb in cuts]
    assert len({p.tokens.shape for p in natural}) > 1  # the groups pack to different widths
    rows = max(p.tokens.shape[0] for p in natural)
    width = max(p.tokens.shape[1] for p in natural)
    assert one_packed_shape(cuts, multiple=1, padded_positions=10**6) == (rows, width)
    padded = [group_packed_layout(mb, shape=(rows, width)) for mb in cuts]
    assert all(p.tokens.shape == (rows, width) and p.attention_mask.shape == (rows, 1, width, width) for p in padded)
    for nat, pad in zip(natural, padded):
        r, w = nat.tokens.shape
        assert torch.equal(pad.tokens[:r, :w], nat.tokens) and pad.tokens.sum() == nat.tokens.sum()
        assert torch.equal(pad.targets[:r, :w], nat.targets) and torch.equal(pad.position_ids[:r, :w], nat.position_ids)
        # the same flat positions within each row, now rows of the common width
        row, col = nat.gather_index // w, nat.gather_index % w
        assert torch.equal(pad.gather_index, row * width + col)
        assert torch.equal(pad.attention_mask[:r, :, :w, :w], nat.attention_mask)
        assert not (~pad.attention_mask[:r, :, :w, w:]).any()  # real positions never see the padding
        assert pad.spans == nat.spans and pad.saved_tokens == nat.saved_tokens - (rows * width - r * w)
    assert one_packed_shape(cuts, multiple=1, padded_positions=len(cuts) * rows * width) is None
    with pytest.raises(ValueError, match="cannot hold"):
        group_packed_layout(cuts[0], shape=(rows, 2))


def _plan_case():
    """A packed layout for the plan tests: ragged prefixes and members, the shortest members (the
    last prompt token + one generated token), rows holding two groups, padded rows; its plan,
    the real positions and float64 q, k, v [rows, 4 heads, width, 8]."""
    from megatron_recycle.model.attention import GroupAttentionPlan

    seqs, masks, gids, adv = _sequences(seed=4)
    seqs += [[5, 6, 7, 8, 9], [5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    masks += [[0, 0, 0, 0, 1], [0, 0, 0, 0] + [1] * 12]  # a one-token member; a long one
    gids += [3, 3]
    p = group_packed_layout(build_batch(seqs, masks, group_ids=gids), row_tokens=40)
    rows, width = p.tokens.shape
    assert rows < len(p.spans) and min(ln for *_, ms in p.spans for _, ln in ms) == 2  # last prompt token + 1
    assert any(start > 0 for _, start, _, _ in p.spans)  # some row holds two groups
    plan = GroupAttentionPlan.build(p.spans, rows, width, p.attention_mask)
    assert len({blk.k.shape[1] - blk.q.shape[1] for blk in plan.blocks[1:]}) == 4  # member blocks per prefix length
    held = sum(t.numel() for blk in plan.blocks for t in (blk.q, blk.k, blk.pos, blk.sel))
    assert held <= 4 * len(seqs) * max(map(len, seqs)), held
    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(rows, 4, width, 8, generator=g, dtype=torch.float64, requires_grad=True)
                for _ in range(3))
    real = torch.zeros(rows, width, dtype=torch.bool)
    for r, start, sp, ms in p.spans:
        real[r, start:start + sp] = True
        for off, ln in ms:
            real[r, off:off + ln] = True
    assert (~real).any()  # some row is padded
    return p, plan, real, qkv, g


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("route", ["split", "bool-mask", "causal-bias", "varlen"])
def test_group_attention_plan_equals_dense_tree_mask(route, kv_heads, monkeypatch):
    """GroupAttentionPlan's block attention == SDPA with the dense tree mask, outputs and
    gradients, float64: ragged prefixes and members, the shortest members (the last prompt token +
    one generated token), padded rows, four prefix lengths. ``split`` (the CPU default): a member
    block as two flash calls merged by log-sum-exp, with their backward kernels given the merged
    output. ``bool-mask``: one masked call per block. ``causal-bias``: the blocks go through
    torch's causal_lower_right bias as on CUDA (on a CPU torch builds its mask), so the alignment
    the GPU route relies on is checked here. The plan holds no mask: its index tensors grow with
    the tokens, not with their square. ``kv_heads=2``: grouped-query attention, the plan given the
    2 key/value heads of 4 query heads unexpanded (as on a CPU), against the dense mask over the
    expanded heads (whose gradients autograd sums back into the 2). ``varlen``: every segment in
    one variable-length call (on a CPU the per-segment emulation of torch's varlen_attn, given
    exactly the arguments the CUDA kernel gets: ``test_varlen_route_on_cuda`` checks the kernel)."""
    import warnings

    from megatron_recycle.model import attention
    from megatron_recycle.model.attention import expand_kv, group_attention

    if route == "split":
        assert attention.packed_route("cpu") == "split", "this torch lacks the CPU flash-attention ops"
        split_calls = []
        real_apply = attention._PrefixThenCausal.apply
        monkeypatch.setattr(attention._PrefixThenCausal, "apply",
                            lambda *a: split_calls.append(1) or real_apply(*a))
    if route == "causal-bias":
        warnings.filterwarnings("ignore", message=".*(flash|efficient|Memory|Flash|Mem).*")

    if route == "varlen":  # the plan builds its variable-length form when the route is named
        monkeypatch.setenv(attention.ROUTE_ENV, "varlen")
    p, plan, real, (q, k, v), g = _plan_case()
    assert (plan.varlen is not None) == (route == "varlen")
    if kv_heads != 4:
        k, v = (t[:, :kv_heads].detach().clone().requires_grad_() for t in (k, v))
    rows, width = p.tokens.shape
    weights = torch.randn(rows, 4, width, 8, generator=g, dtype=torch.float64) * real[:, None, :, None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4),
                                                             attn_mask=~p.attention_mask, scale=0.3)
    block = group_attention(plan, q, k, v, 0.3, route=None if route == "split" else route)  # split: the CPU default
    torch.testing.assert_close(block * real[:, None, :, None], dense * real[:, None, :, None], atol=1e-12, rtol=0)
    assert not block.permute(0, 2, 1, 3)[~real].any()  # padding positions: zeros on every route
    gd = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    gb = torch.autograd.grad((block * weights).sum(), (q, k, v))
    for a, b in zip(gb, gd):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    if route == "split":
        assert len(split_calls) == 4  # one per prefix length: every member block went the split way


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: the CUDA kernels behind causal_lower_right"))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_group_attention_plan_in_low_precision(device, dtype, tol):
    """The plan's blocks in fp32 and bf16 on each device's default route (CUDA: torch's
    causal_lower_right bias, i.e. flash attention in bf16 and memory-efficient attention in fp32;
    CPU: the split flash calls, whose bf16 log-sum-exps come back in fp32): outputs and gradients
    against the float64 dense tree mask on the CPU. Tolerance: ``tol`` x the largest reference
    value."""
    from megatron_recycle.model.attention import GroupAttentionPlan, group_attention

    p, _, real, (q, k, v), g = _plan_case()
    rows, width = p.tokens.shape
    weights = torch.randn(rows, 4, width, 8, generator=g, dtype=torch.float64) * real[:, None, :, None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~p.attention_mask, scale=0.3)
    gd = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    plan = GroupAttentionPlan.build(p.spans, rows, width, p.attention_mask.to(device))
    qc, kc, vc = (t.detach().to(device, dtype).requires_grad_() for t in (q, k, v))
    block = group_attention(plan, qc, kc, vc, 0.3)
    keep = real[:, None, :, None]
    torch.testing.assert_close(block.double().cpu() * keep, dense.detach() * keep, atol=tol * float(dense.abs().max()), rtol=0)
    gb = torch.autograd.grad((block * weights.to(device, dtype)).sum(), (qc, kc, vc))
    for a, b in zip(gb, gd):
        torch.testing.assert_close(a.double().cpu(), b, atol=tol * float(b.abs().max()), rtol=0)


@pytest.mark.parametrize("kind,tied", [("llama", True), ("qwen3", False)])
def test_packed_logprobs_and_gradient_equal_padded(world1, tiny, kind, tied, monkeypatch):
    import megatron_recycle.model.attention as attn

    used = []
    real_group_attention = attn.group_attention
    monkeypatch.setattr(attn, "group_attention", lambda *a, **kw: used.append(1) or real_group_attention(*a, **kw))
    seqs, masks, gids, adv = _sequences(seed=1)
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    lens = batch.lengths
    real = torch.arange(batch.seq_length - 1)[None] < (lens - 1)[:, None]

    chunks, opt, sched = _model(tiny, kind, tied)
    lp_pad = compute_logprobs(chunks, batch, 9, pack_groups=False)
    lp_pack = compute_logprobs(chunks, batch, 9, pack_groups=True)
    torch.testing.assert_close(lp_pack[real], lp_pad[real], atol=2e-5, rtol=0)
    assert not torch.equal(lp_pack[real], torch.zeros_like(lp_pack[real]))

    # off-policy old log-probs, so the clipped branches take part too
    old = lp_pad + 0.3 * torch.randn(lp_pad.shape, generator=torch.Generator().manual_seed(2))
    batch = batch.replace(old_logprobs=old)
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28)
    results = {}
    runs = (("pad", False, 9), ("pack", True, 9), ("pack_split", True, 3), ("pack_4", True, 1),
            ("pack_no_lengths", True, 9))
    for name, pack, mbs in runs:
        chunks, opt, sched = _model(tiny, kind, tied)
        before = [p.detach().clone() for p in chunks[0].parameters()]
        step_batch = batch.replace(lengths=None) if name == "pack_no_lengths" else batch
        m = grpo_train_step(chunks, opt, sched, step_batch, mbs, cfg, pack_groups=pack)
        grads = [b - p.detach() for b, p in zip(before, chunks[0].parameters())]
        results[name] = (m, grads)
    ref_m, ref_g = results["pad"]
    gmax = max(g.abs().max().item() for g in ref_g)
    assert gmax > 1e-3
    assert ref_m["packed_saved_tokens"] == 0
    for name in ("pack", "pack_split", "pack_4", "pack_no_lengths"):
        m, g = results[name]
        diff = max((a - b).abs().max().item() for a, b in zip(g, ref_g))
        assert diff <= 1e-5 * gmax, f"{name}: {diff} vs {gmax}"
        assert m["loss"] == pytest.approx(ref_m["loss"], rel=1e-5)
        assert m["tokens"] == ref_m["tokens"]
    assert results["pack"][0]["packed_saved_tokens"] > 0
    # without real lengths each member still ends after its last loss token (here its last token):
    # the right padding is not packed
    assert results["pack_no_lengths"][0]["packed_saved_tokens"] == results["pack"][0]["packed_saved_tokens"]
    # one sequence per micro-batch: nothing to share, but the padding still goes
    assert results["pack_4"][0]["packed_saved_tokens"] < results["pack"][0]["packed_saved_tokens"]
    rope = chunks[0].module.rotary_pos_emb
    assert "forward" not in rope.__dict__  # the RoPE override is removed after each forward
    assert used  # the packed steps ran the block attention of the group plan ...
    assert all("group_plans" not in layer.self_attention.core_attention.__dict__  # ... only inside them
               for layer in chunks[0].module.decoder.layers)


def test_the_varlen_route_through_a_packed_step(world1, tiny, monkeypatch):
    """$MEGATRON_RECYCLE_PACKED_ATTENTION=varlen through the model (Qwen3: grouped-query heads,
    QK-norm): packed log-probs and one packed GRPO step's weight update equal the default route's,
    and every layer's attention went the variable-length way (on a CPU its emulation)."""
    import megatron_recycle.model.attention as attn

    seqs, masks, gids, adv = _sequences(seed=1)
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    real = torch.arange(batch.seq_length - 1)[None] < (batch.lengths - 1)[:, None]
    calls = []
    real_varlen = attn._varlen_attention
    monkeypatch.setattr(attn, "_varlen_attention", lambda *a: calls.append(1) or real_varlen(*a))
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28)
    out = {}
    for route in ("auto", "varlen"):
        monkeypatch.setenv(attn.ROUTE_ENV, route)
        chunks, opt, sched = _model(tiny, "qwen3", False)
        lp = compute_logprobs(chunks, batch, 9, pack_groups=True)
        old = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
        before = [p.detach().clone() for p in chunks[0].parameters()]
        m = grpo_train_step(chunks, opt, sched, batch.replace(old_logprobs=old), 9, cfg, pack_groups=True)
        out[route] = (lp, m, [b - p.detach() for b, p in zip(before, chunks[0].parameters())])
        if route == "auto":
            assert not calls
    layers = len(chunks[0].module.decoder.layers)
    assert len(calls) >= 2 * layers and len(calls) % layers == 0  # every layer, in both forwards
    (lp_a, m_a, g_a), (lp_v, m_v, g_v) = out["auto"], out["varlen"]
    torch.testing.assert_close(lp_v[real], lp_a[real], atol=2e-5, rtol=0)
    gmax = max(g.abs().max().item() for g in g_a)
    assert gmax > 1e-3
    assert max((a - b).abs().max().item() for a, b in zip(g_v, g_a)) <= 1e-5 * gmax
    assert m_v["loss"] == pytest.approx(m_a["loss"], rel=1e-5)


def test_plan_only_masks_replace_the_dense_tree_mask(world1, tiny):
    """Where every attention call of the model runs by the group plan, the step's packed
    micro-batches carry a [rows, 1, 1, 1] stand-in instead of the O(S^2) dense tree mask; a model
    whose attention could take another path (dropout) gets the dense mask; and the attention
    refuses a stand-in on any path that would read it as a mask."""
    from megatron_recycle.model.attention import plan_only_mask
    from megatron_recycle.train.step import _micro_batches

    seqs, masks, gids, adv = _sequences(seed=5)
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    dense, light = group_packed_layout(batch), group_packed_layout(batch, dense_mask=False)
    rows, width = dense.tokens.shape
    assert dense.attention_mask.shape == (rows, 1, width, width) and light.attention_mask.shape == (rows, 1, 1, 1)
    for name in ("tokens", "targets", "position_ids", "gather_index"):
        assert torch.equal(getattr(light, name), getattr(dense, name)), name
    assert light.spans == dense.spans and light.saved_tokens == dense.saved_tokens

    chunks, _, _ = _model(tiny, "llama", True)
    (mb,) = _micro_batches(batch, 9, True, chunks, select=True)
    assert mb.packed.attention_mask.shape == (rows, 1, 1, 1)
    core = chunks[0].module.decoder.layers[0].self_attention.core_attention
    config = core.config
    config.attention_dropout = 0.1  # dropout in training: the attention may take Megatron's masked path
    try:
        (mb,) = _micro_batches(batch, 9, True, chunks, select=True)
        assert mb.packed.attention_mask.shape == (rows, 1, width, width)
        q = torch.randn(width, rows, 4, 8)
        core.train()
        with pytest.raises(RuntimeError, match="without its dense attention mask"):
            core(q, q, q, plan_only_mask(rows))
    finally:
        config.attention_dropout = 0.0
    core.eval()
    with pytest.raises(RuntimeError, match="came without its GroupAttentionPlan"):
        core(q, q, q, plan_only_mask(rows))  # the fast path, but no plan for this micro-batch


def test_logits_only_at_loss_positions(world1, tiny):
    """compute_logprobs(only_loss_positions=True) (the selection the train step always uses)
    agrees at every loss position, packed or not, and computes one logit row per loss token."""
    from megatron_recycle.train.step import LogitSelection, _selection_for

    seqs, masks, gids, adv = _sequences(seed=4)
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    loss = batch.target_mask.bool()
    chunks, _, _ = _model(tiny, "llama", True)
    full = compute_logprobs(chunks, batch, 9, pack_groups=False)
    for pack in (False, True):
        part = compute_logprobs(chunks, batch, 9, pack_groups=pack, only_loss_positions=True)
        torch.testing.assert_close(part[loss], full[loss], atol=2e-5, rtol=0)
    sel = _selection_for(batch, None)
    assert isinstance(sel, LogitSelection) and sel.flat.numel() == int(loss.sum())
    packed = group_packed_layout(batch)
    sel = _selection_for(batch, packed)
    assert sel.flat.numel() == int(loss.sum())  # loss tokens are never shared, so none is merged
    # an all-masked micro-batch still selects one position (shapes stay valid)
    empty = build_batch([[5, 6, 7]], [[0, 0, 0]], advantages=[0.0])
    assert _selection_for(empty, None).flat.numel() == 1


def test_token_ids_outside_the_vocabulary_stop_the_step_before_the_model(world1, tiny, monkeypatch):
    """The step checks every token id against the model's vocabulary once, where it cuts the
    micro-batches, with the row and position named, before the model runs (on a GPU the
    embedding would stop with a device-side assert); its log-prob calls then skip
    token_logprobs' own check of the same ids (a host sync per micro-batch): the step's loss
    functions pass validate_targets=False, and a valid batch gives the validated result."""
    import megatron_recycle_kernels as K

    from megatron_recycle.train import step as step_mod

    seqs, masks, gids, adv = _sequences(seed=6)
    chunks, opt, sched = _model(tiny, "llama", True)
    vocab = chunks[0].module.vocab_size
    seen = []
    real = K.token_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("validate_targets", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "token_logprobs", spy)
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    got = compute_logprobs(chunks, batch, 9, pack_groups=True, only_loss_positions=True)
    assert seen and not any(seen)
    seen.clear()
    monkeypatch.setattr(K, "token_logprobs", lambda *a, **kw: real(*a, **{**kw, "validate_targets": True}))
    want = compute_logprobs(chunks, batch, 9, pack_groups=True, only_loss_positions=True)
    assert torch.equal(got, want)
    for bad_id in (vocab, -1):
        seqs_bad = [list(s) for s in seqs]
        seqs_bad[4][3] = bad_id
        bad = build_batch(seqs_bad, masks, advantages=adv, group_ids=gids)
        with pytest.raises(ValueError, match=rf"token id {bad_id} at row 4, position 3 lies outside .*\[0, {vocab}\)"):
            compute_logprobs(chunks, bad, 9)
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            step_mod.grpo_train_step(chunks, opt, sched, bad.replace(old_logprobs=torch.zeros(bad.tokens.shape[0],
                                     bad.seq_length - 1)), 9, step_mod.GRPOLossConfig())


def test_a_packed_forward_builds_no_plan_and_reads_nothing_back(world1, tiny, monkeypatch):
    """A packed micro-batch arrives with its attention plan, built where the micro-batch was moved
    to its device, and with its largest RoPE position known on the host: its forward builds no
    plan and reads no value back from the device (on a GPU a pageable host-to-device copy and a
    .max() read each wait for the device, in the middle of the pipeline schedule)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_recycle.model import attention
    from megatron_recycle.train.step import _forward_step, _micro_batches

    seqs, masks, gids, adv = _sequences(seed=7)
    batch = build_batch(seqs, masks, advantages=adv, group_ids=gids)
    chunks, _, _ = _model(tiny, "llama", True)
    builds = []
    build = attention.GroupAttentionPlan.build
    monkeypatch.setattr(attention.GroupAttentionPlan, "build",
                        staticmethod(lambda *a, **kw: builds.append(1) or build(*a, **kw)))
    (mb,) = _micro_batches(batch, 9, True, chunks, select=True)
    p = mb.packed
    assert len(builds) == 1 and p.plan is not None and p.plan.mask is p.attention_mask
    assert p.max_position == int(p.position_ids.max()) > 0
    builds.clear()

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Reads() as reads:
        output, _ = _forward_step(lambda *a: None, iter([mb]), chunks[0])
    assert builds == [] and output.shape[-1] == chunks[0].module.vocab_size
    assert "aten._local_scalar_dense.default" not in reads.ops and "aten.max.default" not in reads.ops
    # the same logits as a forward that builds its plan and reads the positions itself
    rebuilt = dataclasses.replace(p, plan=None, max_position=None)
    again, _ = _forward_step(lambda *a: None, iter([dataclasses.replace(mb, packed=rebuilt)]), chunks[0])
    assert len(builds) == 1 and torch.equal(again, output)


def test_sdpa_core_attention_equals_megatrons_own(world1, tiny):
    """The local spec's core attention is SDPADotProductAttention, and its fast path gives
    Megatron's DotProductAttention result (causal and with a tree mask), on the model's device
    (Megatron's path takes its buffers from the current CUDA device when there is one)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_recycle.model.attention import SDPADotProductAttention

    chunks = build_model_chunks(tiny.tiny_config("llama", True), layer_spec="local")
    core = chunks[0].decoder.layers[0].self_attention.core_attention
    assert type(core) is SDPADotProductAttention
    g = torch.Generator().manual_seed(0)
    s, b, heads, groups, hn = 7, 2, 4, 2, 16
    q = torch.randn(s, b, heads, hn, generator=g)
    k = torch.randn(s, b, groups, hn, generator=g)
    v = torch.randn(s, b, groups, hn, generator=g)
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2]] * b)  # a prefix and two suffixes
    allowed = torch.ones(s, s, dtype=torch.bool).tril() & ((seq[:, :, None] == seq[:, None, :]) | (seq[:, None, :] == 0))
    q, k, v, allowed = (t.to(world1.device) for t in (q, k, v, allowed))
    for mask in (None, ~allowed[:, None]):
        fast = core(q, k, v, mask)
        slow = DotProductAttention.forward(core, q, k, v, mask)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_varlen_plan_segments_cover_every_position_once(monkeypatch):
    """The variable-length form of _plan_case's plan: its query segments tile the flattened rows in
    order (prefixes, members, padding stretches), each member's keys are its group's prefix then
    itself, padding attends to itself only and is marked, and the plan-only route refuses a plan
    built without it (the route is read when the plan is built, outside the forward)."""
    from megatron_recycle.model import attention
    from megatron_recycle.model.attention import GroupAttentionPlan, VarlenPlan, group_attention

    p, plan, real, (q, k, v), _ = _plan_case()
    rows, width = p.tokens.shape
    vp = VarlenPlan.build(p.spans, rows, width, torch.device("cpu"))
    cu_q, cu_k = vp.cu_q.tolist(), vp.cu_k.tolist()
    assert vp.cu_q.dtype == vp.cu_k.dtype == torch.int32 and cu_q[-1] == rows * width and cu_k[-1] == len(vp.k_idx)
    want = []  # (query positions, key positions) per segment, in order
    for r in range(rows):
        segs = []
        for _, start, sp, ms in (span for span in p.spans if span[0] == r):
            pre = list(range(r * width + start, r * width + start + sp))
            if sp:
                segs.append((pre, pre))
            for off, ln in ms:
                own = list(range(r * width + off, r * width + off + ln))
                segs.append((own, pre + own))
        at = r * width
        for qs, ks in sorted(segs) + [([(r + 1) * width], None)]:
            if qs[0] > at:  # padding: its own keys
                want.append((list(range(at, qs[0])), list(range(at, qs[0]))))
            if ks is not None:
                want.append((qs, ks))
                at = qs[-1] + 1
    assert [ks for _, ks in want] == [vp.k_idx[cu_k[i]:cu_k[i + 1]].tolist() for i in range(len(cu_k) - 1)]
    assert [q for qs, _ in want for q in qs] == list(range(rows * width))  # the segments tile the rows in order
    assert cu_q == [0, *torch.tensor([len(qs) for qs, _ in want]).cumsum(0).tolist()]
    assert vp.max_q == max(len(qs) for qs, _ in want) and vp.max_k == max(len(ks) for _, ks in want)
    assert torch.equal(vp.pad, ~real.reshape(-1))
    with pytest.raises(RuntimeError, match="without its variable-length form"):
        group_attention(plan, q, k, v, 0.3, route="varlen")
    monkeypatch.setenv(attention.ROUTE_ENV, "flash")
    with pytest.raises(ValueError, match="'flash' is not a group attention route"):
        GroupAttentionPlan.build(p.spans, rows, width, p.attention_mask)
    one = [(0, 0, 3, [(3, 2), (5, 4)])]  # one group filling its row exactly: no padding segment
    vp = VarlenPlan.build(one, 1, 9, torch.device("cpu"))
    assert vp.pad is None and vp.cu_q.tolist() == [0, 3, 5, 9] and vp.cu_k.tolist() == [0, 3, 8, 15]
    assert vp.k_idx.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="overlap in row 0"):
        VarlenPlan.build([(0, 0, 3, [(2, 2)])], 1, 9, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch's variable-length flash kernel")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_route_on_cuda(kv_heads, monkeypatch):
    """The route ``varlen`` with torch's own varlen_attn (bf16 on CUDA) against the emulation of it
    (float64 on the CPU, the same arguments): outputs and gradients, so the kernel's causal
    alignment (last query on last key) and segment handling are what the plan assumes."""
    from megatron_recycle.model import attention
    from megatron_recycle.model.attention import GroupAttentionPlan, group_attention

    monkeypatch.setenv(attention.ROUTE_ENV, "varlen")
    p, plan, real, (q, k, v), g = _plan_case()
    k, v = (t[:, :kv_heads].detach().clone().requires_grad_() for t in (k, v))
    rows, width = p.tokens.shape
    weights = torch.randn(rows, 4, width, 8, generator=g, dtype=torch.float64) * real[:, None, :, None]
    want = group_attention(plan, q, k, v, 0.3)
    gw = torch.autograd.grad((want * weights).sum(), (q, k, v))
    gplan = GroupAttentionPlan.build(p.spans, rows, width, p.attention_mask.cuda())
    qc, kc, vc = (t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v))
    got = group_attention(gplan, qc, kc, vc, 0.3)
    tol = 3e-2 * float(want.abs().max())
    torch.testing.assert_close(got.double().cpu(), want.detach(), atol=tol, rtol=0)
    gg = torch.autograd.grad((got * weights.cuda().bfloat16()).sum(), (qc, kc, vc))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a.double().cpu(), b, atol=3e-2 * float(b.abs().max()), rtol=0)


def test_group_attention_refuses_an_unknown_route():
    from megatron_recycle.model.attention import group_attention

    _, plan, _, (q, k, v), _ = _plan_case()
    with pytest.raises(ValueError, match="unknown group attention route 'flash'"):
        group_attention(plan, q, k, v, 0.3, route="flash")


def test_packed_route_by_device_and_environment(monkeypatch):
    """The device's default route (causal-bias on CUDA, split on a CPU with torch's CPU flash ops),
    any device overridden by the environment ('auto' and empty mean the default), an unknown name
    refused."""
    from megatron_recycle.model import attention

    monkeypatch.delenv(attention.ROUTE_ENV, raising=False)
    assert attention.packed_route("cuda") == attention.packed_route(torch.device("cuda", 0)) == "causal-bias"
    cpu = "split" if attention._cpu_flash_ops() is not None else "bool-mask"
    assert attention.packed_route("cpu") == attention.packed_route(torch.device("cpu")) == cpu
    for value, cuda, host in (("auto", "causal-bias", cpu), ("", "causal-bias", cpu), ("varlen", "varlen", "varlen"),
                              ("bool-mask", "bool-mask", "bool-mask")):
        monkeypatch.setenv(attention.ROUTE_ENV, value)
        assert (attention.packed_route("cuda"), attention.packed_route("cpu")) == (cuda, host), value
    monkeypatch.setenv(attention.ROUTE_ENV, "flash")
    with pytest.raises(ValueError, match="'flash' is not a group attention route"):
        attention.packed_route("cpu")
    # split is torch's CPU flash kernels: refused where they cannot run, when the plan is built
    monkeypatch.setenv(attention.ROUTE_ENV, "split")
    with pytest.raises(ValueError, match="split runs torch's CPU flash-attention kernels, which do not exist on CUDA"):
        attention.packed_route("cuda")
    monkeypatch.setattr(attention, "_cpu_flash_ops", lambda: None)
    with pytest.raises(ValueError, match=re.escape(f"which do not exist with torch {torch.__version__}")):
        attention.packed_route("cpu")


def test_varlen_is_asked_for_causal_attention_in_either_torch_spelling():
    """torch 2.11 (the GPU image's) spells causal as window_size=(-1, 0), torch 2.10 as
    is_causal=True: the route passes whichever its varlen_attn takes, and refuses one with neither."""
    from megatron_recycle.model.attention import _causal_kwargs, varlen_attn_emulated

    def torch_2_11(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        pass

    def torch_2_10(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False, scale=None):
        pass

    def neither(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        pass

    assert _causal_kwargs(torch_2_11) == _causal_kwargs(varlen_attn_emulated) == {"window_size": (-1, 0)}
    assert _causal_kwargs(torch_2_10) == {"is_causal": True}
    with pytest.raises(RuntimeError, match="takes neither window_size nor is_causal"):
        _causal_kwargs(neither)
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    assert _causal_kwargs(varlen.varlen_attn) == {"window_size": (-1, 0)}  # this torch's (2.13 in CI)


def test_rows_for_groups_finds_tight_packings():
    """Balanced placement misses 1024+1024 | 682x3 in two rows of 2048 (it made three, 25% padding)."""
    from megatron_recycle.train.packing import _rows_for_groups

    rows = _rows_for_groups([1024, 1024, 682, 682, 682], 2048)
    assert len(rows) == 2 and sorted(g for r in rows for g in r) == [0, 1, 2, 3, 4]
    assert all(sum([1024, 1024, 682, 682, 682][g] for g in r) <= 2048 for r in rows)
    assert len(_rows_for_groups([600, 600, 600, 600], 2048)) == 2  # balanced rows where they fit


def test_a_member_without_loss_keeps_its_groups_shared_prompt(world1, tiny):
    """Cut to its loss extent, a loss-free member shrank the group's shared prefix to one token;
    it is packed alone now and the others keep sharing the prompt. Results are unchanged."""
    from megatron_recycle.train.step import _micro_batches

    chunks, _, _ = _model(tiny, "llama", True)
    prompt = list(range(10, 60))
    seqs = [prompt + [20 + k] * 10 for k in range(4)]
    shapes, logprobs = {}, {}
    for zero in (False, True):
        masks = [[0] * 50 + ([0] * 10 if zero and k == 3 else [1] * 10) for k in range(4)]
        b = build_batch(seqs, masks, advantages=[1.0, -1.0, 0.5, 0.0], group_ids=[0] * 4)
        (mb,) = _micro_batches(b, 4, True, chunks, select=True)
        shapes[zero] = mb.packed.tokens.numel()
        assert max(span[2] for span in mb.packed.spans) == 49, mb.packed.spans  # the prompt is shared
        lp = compute_logprobs(chunks, b, 4, pack_groups=True, only_loss_positions=True)
        logprobs[zero] = lp[:3, 49:]  # the loss positions of the members that have loss in both
    assert shapes[True] <= shapes[False] + 4  # not the whole prompt again
    torch.testing.assert_close(logprobs[True], logprobs[False], rtol=0, atol=1e-6)

