"""Generation straight from the trainer's Megatron weights: no second copy of the model, no sync.

The embedded default trains with TP = PP = 1, where every weight of the policy sits in this
process as an ordinary tensor of the megatron-core GPTModel. This engine decodes with those
very tensors (looked up again at every ``generate`` call, so it always sees the latest
optimizer step): the Hugging Face engine's second copy of the model and the export into it
after every step disappear, which is both memory and time (issue #8).

It is a lean decode loop written for small batches on a CPU (it also runs on one GPU):
- Megatron's fused layouts are used as they are: one matmul for q/k/v (rows grouped per query
  group), one for gate/up;
- a preallocated KV cache per call; each row writes its new key/value at its own position and
  attends through a length mask, so rows of different prompt lengths decode together;
- identical prompts in one call (the K rollouts of a GRPO group) are prefilled once and their
  KV cache rows copied, so a group pays for its prompt once, not K times;
- a prefix store: the keys/values of every context the previous call generated are kept, and a
  prompt that extends one of them (the next turn of a multi-turn rollout: the same context plus
  an information block) prefills only its new tokens. The store is dropped by sleep() (before
  the trainer runs), by clear_prefix_cache(), after every step of the optimizers given to
  watch_optimizers() (the trainer's: Megatron writes the new weights through ``.data``, which
  no version counter sees), and when the parameters' version counters moved (other in-place
  writes through autograd-visible ops). A caller that changes the weights any other way must
  call clear_prefix_cache();
- on a CPU (fp32), decode steps of 5-64 rows run through small C kernels built on first use
  (engines/cpu_gemm.py; ``fast_gemm=False`` or MEGATRON_RECYCLE_CPU_GEMM=0 turn them off): a
  skinny AVX2/FMA GEMM that streams the weights 1.4-2x faster than MKL does on AMD CPUs, with
  the RMSNorm / SwiGLU before it and the residual add after it fused in, and one call per layer
  for QK-norm, RoPE, the cache write and the attention (instead of ~15 small torch ops);
- logits only where a token is chosen (the last prompt position, then each new token);
- rows that finish are dropped from the batch once enough of them have finished.
Sampling, seeds and stop strings are DecodingBase's (engines/hf.py), shared with HFEngine, so
the two engines choose the same tokens from the same logits. Tests check this engine's logits
and greedy generations against transformers for Llama (SmolLM2), Qwen2 and Qwen3.

Limits (checked, with clear errors): tensor and pipeline parallel size 1 (use the ``hf`` or
``vllm`` engine otherwise), plain RoPE, SwiGLU, RMSNorm (the families model/build.py builds).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_recycle.engines import cpu_gemm
from megatron_recycle.engines.base import Generation, SamplingParams
from megatron_recycle.engines.hf import DecodingBase, _eos_token_ids
from megatron_recycle.model.compat import device_mode_suspended

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    ln_attn: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    proj_w: torch.Tensor
    ln_mlp: torch.Tensor
    fc1_w: torch.Tensor
    fc2_w: torch.Tensor


def _first(params: dict[str, torch.Tensor], *names: str) -> torch.Tensor | None:
    for n in names:
        if n in params:
            return params[n]
    return None


class NativeEngine(DecodingBase):
    """The Engine protocol (engines/base.py) over a megatron-core GPTModel held by the trainer.

    ``model``: the GPTModel (bare, or wrapped in DDP / Float16Module); ``hf_config``: the
    Hugging Face config it was built from (head counts, RoPE base, norm epsilon);
    ``generation_config``: the model folder's (hf_loading.load_generation_config), whose
    end-of-sequence ids are stopped on besides the tokenizer's.
    """

    name = "NativeEngine"
    FAST_GEMM_MIN_ROWS = 5  # 1-4 rows: MKL's own small-row path is as fast (measured, 2-core Zen 3)
    shares_trainer_weights = True  # the trainer must not export weights into this engine

    def __init__(self, model: torch.nn.Module, hf_config: Any, tokenizer, max_batch_size: int = 64,
                 compact_fraction: float = 0.125, prefix_cache: bool = True, fast_gemm: bool = True,
                 generation_config: Any = None) -> None:
        from megatron_recycle.model.build import _check_supported, head_dim, rope_inv_freq, unwrap_model

        if max_batch_size < 1:
            raise ValueError(f"NativeEngine max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= compact_fraction <= 1:
            raise ValueError(f"NativeEngine compact_fraction must be in [0, 1], got {compact_fraction}")
        _check_supported(hf_config)
        self.model = unwrap_model(model)
        cfg = getattr(self.model, "config", None)
        tp = getattr(cfg, "tensor_model_parallel_size", 1)
        pp = getattr(cfg, "pipeline_model_parallel_size", 1)
        if tp != 1 or pp != 1:
            raise ValueError(
                f"NativeEngine needs the whole model in this process (tensor and pipeline parallel size 1), "
                f"but the model is split tp={tp} pp={pp}; use rollout.engine=hf or rollout.engine=vllm"
            )
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.compact_fraction = compact_fraction
        self.n_heads = int(hf_config.num_attention_heads)
        self.n_groups = int(getattr(hf_config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = head_dim(hf_config)
        self.eps = float(hf_config.rms_norm_eps)
        self.rope_inv_freq = rope_inv_freq(hf_config, self.head_dim)  # float64, the config's scaling applied
        self.eos_token_ids = _eos_token_ids(self.model, tokenizer, generation_config, hf_config=hf_config)
        self._seed_source = random.Random()
        w = self._weights()
        self.vocab_size = int(w["embedding"].shape[0])
        self.device = w["embedding"].device
        self._rope_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.prefix_cache = prefix_cache
        self.fast_gemm = fast_gemm
        self._store: dict[tuple[int, ...], torch.Tensor] = {}
        self._store_fingerprint: tuple[int, int] | None = None
        self._optimizer_steps = 0  # steps of the watched optimizers (watch_optimizers)
        self._watch_handles: list[Any] = []
        self.reused_tokens = 0  # prompt tokens whose keys/values came from the prefix store

    def watch_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Count every step of these torch optimizers (those inside the trainer's Megatron
        optimizer) as a weight change: the prefix store is not reused across one."""
        def bump(*_: Any) -> None:
            self._optimizer_steps += 1

        for opt in optimizers:
            self._watch_handles.append(opt.register_step_post_hook(bump))

    # ---------------------------------------------------------------------------- weights
    def _weights(self) -> dict[str, Any]:
        """References to the model's current tensors (looked up per call; nothing is copied)."""
        p = dict(self.model.named_parameters(remove_duplicate=False))
        layers = []
        i = 0
        while f"decoder.layers.{i}.self_attention.linear_qkv.weight" in p:
            pre = f"decoder.layers.{i}."
            ln_attn = _first(p, pre + "input_layernorm.weight", pre + "self_attention.linear_qkv.layer_norm_weight")
            ln_mlp = _first(p, pre + "pre_mlp_layernorm.weight", pre + "mlp.linear_fc1.layer_norm_weight")
            if ln_attn is None or ln_mlp is None:
                raise ValueError(f"NativeEngine: layer {i} has no RMSNorm weights under the names it knows")
            layers.append(_Layer(
                ln_attn=ln_attn,
                qkv_w=p[pre + "self_attention.linear_qkv.weight"],
                qkv_b=p.get(pre + "self_attention.linear_qkv.bias"),
                q_norm=p.get(pre + "self_attention.q_layernorm.weight"),
                k_norm=p.get(pre + "self_attention.k_layernorm.weight"),
                proj_w=p[pre + "self_attention.linear_proj.weight"],
                ln_mlp=ln_mlp,
                fc1_w=p[pre + "mlp.linear_fc1.weight"],
                fc2_w=p[pre + "mlp.linear_fc2.weight"],
            ))
            i += 1
        if not layers or "embedding.word_embeddings.weight" not in p or "decoder.final_layernorm.weight" not in p:
            raise ValueError("NativeEngine: the model is not a complete megatron-core GPTModel (layers, embedding, "
                             "final norm); pipeline stages cannot generate on their own")
        emb = p["embedding.word_embeddings.weight"]
        out = p.get("output_layer.weight", emb)
        return {"embedding": emb, "layers": layers, "final_norm": p["decoder.final_layernorm.weight"], "output": out}

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Not needed: this engine reads the trainer's tensors. Refused so a caller notices."""
        raise RuntimeError(
            "NativeEngine shares the trainer's weights and has nothing to load; skip the weight export "
            "for engines with shares_trainer_weights=True"
        )

    def sleep(self) -> None:
        """Release the prefix store (the only memory this engine keeps between calls)."""
        self.clear_prefix_cache()

    def wake(self) -> None:
        """No-op, see sleep()."""

    # --------------------------------------------------------------------------- pieces
    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *,
                norm: torch.Tensor | None = None, swiglu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + f(x) @ w.T + b``, f = identity, RMSNorm(norm) or silu(gate) * up (``swiglu``:
        x holds [gate, up] on its last dimension, Megatron's fc1 layout).

        Decode steps (a few rows) on CPU go to the skinny AVX2 GEMM of ``cpu_gemm`` when it is
        available, with f and the residual fused into it (1.4-2x MKL's rate on Zen 3 for 8-16 rows,
        and no separate norm / activation / add ops; measured there). Otherwise the same
        arithmetic runs as separate torch ops, the product as ``w @ x.T`` for up to 64 rows (the
        faster BLAS shape for few rows: 1.5-1.7x ``F.linear`` on 2 cores for [16 x 576] inputs)."""
        rows = x.numel() // x.shape[-1]
        n = w.shape[0]
        if (self.fast_gemm and x.device.type == "cpu" and self.FAST_GEMM_MIN_ROWS <= rows <= cpu_gemm.MAX_ROWS
                and cpu_gemm.available()):
            x2 = x.reshape(rows, x.shape[-1])
            res2 = residual.reshape(rows, n) if residual is not None else None
            if cpu_gemm.supports(x2, w, norm, swiglu, res2):
                out = cpu_gemm.skinny_mm(x2, w, norm_weight=norm, eps=self.eps, swiglu=swiglu, residual=res2,
                                          check=False)
                if b is not None:
                    out = out + b
                return out.reshape(*x.shape[:-1], n)
        if norm is not None:
            x = self._rms(x, norm)
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        if rows > cpu_gemm.MAX_ROWS or x.device.type != "cpu":
            out = F.linear(x, w, b)
        else:
            out = torch.mm(w, x.reshape(rows, x.shape[-1]).t()).t()
            if b is not None:
                out = out + b
            out = out.reshape(*x.shape[:-1], n)
        return out if residual is None else residual + out

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # torch's fused RMSNorm: the op Megatron's local spec runs (torch.nn.RMSNorm), one kernel
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_cache is None or self._rope_cache[0] < length or self._rope_cache[1].dtype != dtype:
            n = max(length, 256)
            inv = self.rope_inv_freq
            freqs = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
            emb = torch.cat([freqs, freqs], dim=-1)
            self._rope_cache = (n, emb.cos().to(self.device, dtype), emb.sin().to(self.device, dtype))
        return self._rope_cache[1], self._rope_cache[2]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> q [B, heads, T, hd], k and v [B, groups, T, hd] (RoPE and QK-norm applied)."""
        return self._split_qkv(layer, self._linear(x, layer.qkv_w, layer.qkv_b, norm=layer.ln_attn), cos, sin)

    def _split_qkv(self, layer: _Layer, fused: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The fused q/k/v projection [B, T, G * (per + 2) * hd] -> q, k, v as in _qkv."""
        b, t, _ = fused.shape
        per = self.n_heads // self.n_groups
        qkv = fused.view(b, t, self.n_groups, per + 2, self.head_dim)
        v = qkv[:, :, :, per + 1]
        if layer.q_norm is None and layer.k_norm is None:
            # q and k side by side in each group's block: one RoPE pass for both
            qk = self._rotate(qkv[:, :, :, : per + 1], cos.unsqueeze(-2), sin.unsqueeze(-2))
            q = qk[:, :, :, :per].reshape(b, t, self.n_heads, self.head_dim)
            k = qk[:, :, :, per]
        else:
            q = qkv[:, :, :, :per].reshape(b, t, self.n_heads, self.head_dim)
            k = qkv[:, :, :, per]
            if layer.q_norm is not None:
                q = self._rms(q, layer.q_norm)
            if layer.k_norm is not None:
                k = self._rms(k, layer.k_norm)
            q = self._rotate(q, cos, sin)
            k = self._rotate(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _finish_layer(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn.shape
        x = self._linear(attn.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), layer.proj_w,
                         residual=x)
        h = self._linear(x, layer.fc1_w, norm=layer.ln_mlp)
        return self._linear(h, layer.fc2_w, swiglu=True, residual=x)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        if self.n_groups != self.n_heads:
            rep = self.n_heads // self.n_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    # ------------------------------------------------------------------------- generate
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]:
        """Continue each prompt; one Generation (new tokens only) per prompt, in input order.

        Seeds as in HFEngine: one SamplingParams for all prompts uses ``seed + i`` for prompt i.
        """
        params_list = self._expand_params(prompts, params)
        self._validate_prompts(prompts)
        if self._store and self._fingerprint() != self._store_fingerprint:
            self.clear_prefix_cache()  # the weights changed in place: stored keys/values are stale
        results: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        store: dict[tuple[int, ...], torch.Tensor] = {}  # this call's contexts, filled by every batch
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            with device_mode_suspended():  # plain tensors only: skip the CPU-compat hook on each op
                gens = self._generate_batch([prompts[i] for i in chunk], [params_list[i] for i in chunk], store)
            for i, gen in zip(chunk, gens):
                results[i] = gen
        # Only this call's contexts are kept: the next turn of a rollout extends them.
        self._store = store
        self._store_fingerprint = self._fingerprint() if self._store else None
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[Sequence[int]], params: list[SamplingParams],
                        store: dict[tuple[int, ...], torch.Tensor]) -> list[Generation]:
        """Generate one batch; the finished contexts' keys/values go into ``store``."""
        w = self._weights()
        dtype = w["embedding"].dtype
        dev = self.device
        rows = self._new_rows(params, prompts)

        # Identical prompts (a GRPO group's K rollouts) are prefilled once, and a prompt that
        # extends a context generated by this engine's previous call (the next turn of a
        # multi-turn rollout) starts from that context's keys and values (the prefix store).
        unique: dict[tuple[int, ...], int] = {}
        source = [unique.setdefault(tuple(int(t) for t in p), len(unique)) for p in prompts]
        uprompts = list(unique)
        reuse = [self._lookup(p) for p in uprompts]
        cached = torch.tensor([c for c, _ in reuse], dtype=torch.long, device=dev)
        ulens = torch.tensor([len(p) for p in uprompts], dtype=torch.long, device=dev)
        suffix = ulens - cached
        n_u, smax, cmax = len(uprompts), int(suffix.max()), int(cached.max())
        capacity = cmax + smax + max(p.max_new_tokens for p in params)
        cos_t, sin_t = self._rope_tables(capacity, dtype)
        n_layers = len(w["layers"])

        # Zeros, not empty: masked slots are still multiplied by zero weights in attention, and
        # uninitialized memory may hold NaN (0 * NaN = NaN).
        ucache = torch.zeros(n_layers, 2, n_u, self.n_groups, capacity, self.head_dim, dtype=dtype, device=dev)
        ids = torch.zeros(n_u, smax, dtype=torch.long, device=dev)
        for r, (p, (c, kv)) in enumerate(zip(uprompts, reuse)):
            ids[r, : len(p) - c] = torch.as_tensor(p[c:], dtype=torch.long)
            if c:
                ucache[:, :, r, :, :c] = kv
        self.reused_tokens += int(cached.sum())
        # Right padding: a pad position comes after every real one (causal), and the pad keys
        # written to the cache are masked during decoding, then overwritten.
        positions = cached[:, None] + torch.arange(smax, device=dev)[None]  # [n_u, smax]
        row_index = torch.arange(n_u, device=dev)[:, None].expand(n_u, smax)
        span = cmax + smax
        mask = None
        if cmax:  # queries see the cached prefix and, causally, their own suffix
            mask = (torch.arange(span, device=dev)[None, None, :] <= positions[:, :, None])[:, None]
        x = F.embedding(ids, w["embedding"])
        cos, sin = cos_t[positions][:, :, None, :], sin_t[positions][:, :, None, :]
        for li, layer in enumerate(w["layers"]):
            q, k, v = self._qkv(layer, x, cos, sin)
            ucache[li, 0][row_index, :, positions] = k.transpose(1, 2)
            ucache[li, 1][row_index, :, positions] = v.transpose(1, 2)
            if mask is None:
                attn = self._attend(q, k, v, None, causal=True)
            else:
                attn = self._attend(q, ucache[li, 0, :, :, :span], ucache[li, 1, :, :, :span], mask, causal=False)
            x = self._finish_layer(layer, x, attn)
        last = x[torch.arange(n_u, device=dev), suffix - 1]
        logits = self._linear(last, w["output"], norm=w["final_norm"]).float()
        src = torch.tensor(source, device=dev)
        cache = ucache.index_select(2, src) if n_u != len(prompts) or source != sorted(source) else ucache
        del ucache
        logits = logits.index_select(0, src)
        pos = ulens.index_select(0, src)  # where each row's next token goes

        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        active = list(range(len(rows)))  # rows still generating, aligned with the batch dimension
        batch_rows = list(range(len(rows)))  # rows held by the cache (finished ones until compacted)
        live = torch.ones(len(rows), dtype=torch.bool, device=dev)
        while True:
            # logits are aligned with batch_rows; choose only for the live ones
            live_idx = live.nonzero().flatten()
            chosen_rows = [batch_rows[b] for b in live_idx.tolist()]
            if len(chosen_rows) == len(rows):  # nobody finished yet: no gathers
                tokens_live, logprobs = self._choose(logits, rows, temperature, top_p)
            else:
                tokens_live, logprobs = self._choose(logits.index_select(0, live_idx), [rows[a] for a in chosen_rows],
                                                     temperature[chosen_rows], top_p[chosen_rows])
            for b, a, tok, lp in zip(live_idx.tolist(), chosen_rows, tokens_live.tolist(), logprobs.tolist()):
                if not self._advance(rows[a], tok, lp):
                    live[b] = False
            active = [batch_rows[b] for b in live.nonzero().flatten().tolist()]
            if not active:
                break
            tokens = torch.zeros(len(batch_rows), dtype=torch.long, device=dev)
            tokens[live_idx] = tokens_live
            n_dead = len(batch_rows) - len(active)
            if n_dead and n_dead >= max(1, int(self.compact_fraction * len(batch_rows))):
                self._keep_contexts(store, cache, batch_rows, live, prompts, rows)
                keep = live.nonzero().flatten()
                cache = cache.index_select(2, keep)
                pos, tokens = pos[keep], tokens[keep]
                batch_rows = active
                live = torch.ones(len(batch_rows), dtype=torch.bool, device=dev)
            logits = self._decode_step(w, cache, tokens, pos, cos_t, sin_t)
            pos = pos + 1
        self._keep_contexts(store, cache, batch_rows, torch.zeros_like(live), prompts, rows)
        return [Generation(r.new_ids, r.finish_reason or "length", r.stop_str, r.logprobs) for r in rows]

    # ---------------------------------------------------------------------- prefix store
    def _keep_contexts(self, store: dict, cache: torch.Tensor, batch_rows: list[int],
                       live: torch.Tensor, prompts: list[Sequence[int]], rows: list) -> None:
        """Copy the keys/values of the rows that finished (live False) into ``store``, keyed by
        their whole context (prompt + new tokens). Valid entries: every token but the last
        chosen one, which was never fed (a finished row left in the batch until compaction
        writes only past that point)."""
        if not self.prefix_cache:
            return
        for b in (~live).nonzero().flatten().tolist():
            a = batch_rows[b]
            key = tuple(int(t) for t in prompts[a]) + tuple(rows[a].new_ids)
            if key not in store:
                store[key] = cache[:, :, b, :, : len(key) - 1].clone()

    def _fingerprint(self) -> tuple[int, int]:
        return sum(p._version for p in self.model.parameters()), self._optimizer_steps

    def _lookup(self, prompt: tuple[int, ...]) -> tuple[int, torch.Tensor | None]:
        """The longest stored context that ``prompt`` extends: (valid cached length, keys/values)."""
        best, best_len = None, 0
        for key, kv in self._store.items():
            if best_len < len(key) <= len(prompt) and prompt[: len(key)] == key:
                best, best_len = kv, len(key)
        return (0, None) if best is None else (int(best.shape[3]), best)

    def clear_prefix_cache(self) -> None:
        """Forget every stored context (called when the weights change and by sleep())."""
        self._store = {}

    def _decode_step(self, w: dict[str, Any], cache: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
                     cos_t: torch.Tensor, sin_t: torch.Tensor) -> torch.Tensor:
        """One token per row at position ``pos``; returns next-token logits [B, V] (fp32)."""
        b = tokens.shape[0]
        span = int(pos.max()) + 1
        x = F.embedding(tokens, w["embedding"])[:, None, :]
        cos, sin = cos_t[pos][:, None, None, :], sin_t[pos][:, None, None, :]
        mask = (torch.arange(span, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
        rows = torch.arange(b, device=pos.device)
        scale = self.head_dim ** -0.5
        fast = self.fast_gemm and x.device.type == "cpu" and x.dtype == torch.float32 and cpu_gemm.available()
        per = self.n_heads // self.n_groups
        for li, layer in enumerate(w["layers"]):
            fused = self._linear(x, layer.qkv_w, layer.qkv_b, norm=layer.ln_attn)
            if fast:  # QK-norm, RoPE, cache write and attention in one C call per layer
                out = cpu_gemm.decode_attention(fused.view(b, -1), cache[li, 0], cache[li, 1], pos, cos_t, sin_t,
                                                self.n_groups, per, self.head_dim, layer.q_norm, layer.k_norm,
                                                self.eps, scale)
                if out is not None:
                    x = self._finish_layer(layer, x, out.view(b, 1, self.n_heads, self.head_dim).transpose(1, 2))
                    continue
            q, k, v = self._split_qkv(layer, fused, cos, sin)
            cache[li, 0, rows, :, pos] = k[:, :, 0]
            cache[li, 1, rows, :, pos] = v[:, :, 0]
            # One query per head: a group's heads are its queries against the group's keys, so
            # grouped-query attention needs no copy of the cache (q heads are group-major).
            qg = q.reshape(b, self.n_groups, self.n_heads // self.n_groups, self.head_dim)
            # plain matmul-softmax-matmul: for one query per head this beats the flash kernel's set-up
            scores = torch.matmul(qg, cache[li, 0, :, :, :span].transpose(-1, -2)) * scale
            probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1)
            attn = torch.matmul(probs, cache[li, 1, :, :, :span])
            x = self._finish_layer(layer, x, attn.reshape(b, self.n_heads, 1, self.head_dim))
        return self._linear(x[:, 0], w["output"], norm=w["final_norm"]).float()
