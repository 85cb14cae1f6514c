"""Generation engine over a Hugging Face causal LM, for CPU (the embedded default) and one GPU.

A hand-written decoding loop rather than ``model.generate``: per-request sampling parameters,
per-request seeds, stop strings checked on the decoded new text, per-token log-probs, and rows
that finish early dropped from the batch (their KV cache rows are released), which is what
makes batched rollouts affordable on two CPU cores. Token ids in, token ids out.
"""

from __future__ import annotations

import inspect
import logging
import operator
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from megatron_recycle.engines.base import Generation, SamplingParams
from megatron_recycle.model.compat import device_mode_suspended

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """Decoding state of one request inside a batch."""

    index: int  # position in the caller's request list
    params: SamplingParams
    generator: torch.Generator | None
    max_stop_tokens: int
    context: list[int] = field(default_factory=list)  # the prompt's last token (stop-string decoding)
    context_text: str = ""  # its decoded text
    new_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_str: str | None = None


class DecodingBase:
    """What the token-in/token-out engines here share: request validation, per-request seeds,
    the sampling rule (argmax, or top-p with one uniform per row from the row's own generator)
    and stop-string detection. Subclasses set ``tokenizer``, ``device``, ``vocab_size``,
    ``eos_token_ids`` and ``_seed_source`` and implement ``_generate_batch``. Two engines given
    the same logits choose the same tokens.
    """

    name = "engine"

    def _validate_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        for i, p in enumerate(prompts):
            if isinstance(p, (str, bytes)):
                raise ValueError(f"{self.name}.generate: prompt {i} is text ({p[:40]!r}); give token ids")
            if len(p) == 0:
                raise ValueError(f"{self.name}.generate: prompt {i} is empty; give at least one token id")
            try:  # integers only: int("12") or int(5.9) would turn text or floats into other token ids
                ints = [operator.index(t) for t in p if not isinstance(t, bool)]
            except TypeError:
                ints = None
            if ints is None or len(ints) != len(p):
                kinds = sorted({type(t).__name__ for t in p})
                raise ValueError(f"{self.name}.generate: prompt {i} holds {kinds}, not integer token ids")
            bad = [t for t in ints if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{self.name}.generate: prompt {i} has token ids {bad[:5]} outside the vocabulary "
                    f"[0, {self.vocab_size}); tokenize with this engine's tokenizer"
                )

    def _new_rows(self, params: list[SamplingParams], prompts: Sequence[Sequence[int]]) -> list[_Row]:
        rows = []
        for i, (p, prompt) in enumerate(zip(params, prompts, strict=True)):
            stop_bytes = max((len(s.encode("utf-8")) for s in p.stop), default=0)
            gen = self._new_generator(p.seed) if p.temperature > 0 else None
            # A stop string of n bytes spans at most n tokens; one more token of left context.
            context = [int(prompt[-1])] if p.stop else []
            text = self.tokenizer.decode(context, skip_special_tokens=False) if context else ""
            rows.append(_Row(i, p, gen, stop_bytes + 1, context=context, context_text=text))
        return rows

    def _advance(self, row: _Row, tok: int, lp: float) -> bool:
        """Append one chosen token to a row; True while the row goes on generating."""
        row.new_ids.append(tok)
        row.logprobs.append(lp)
        if tok in self.eos_token_ids:
            row.finish_reason = "eos"
        elif row.params.stop and self._check_stop(row):
            row.finish_reason = "stop"
        elif len(row.new_ids) >= row.params.max_new_tokens:
            row.finish_reason = "length"
        else:
            return True
        return False

    def _expand_params(self, prompts, params) -> list[SamplingParams]:
        if isinstance(params, SamplingParams):
            out = []
            for i in range(len(prompts)):
                seed = None if params.seed is None else (params.seed + i) % 2**63
                out.append(
                    SamplingParams(params.temperature, params.top_p, params.max_new_tokens, tuple(params.stop), seed)
                )
            return out
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(
                f"{self.name}.generate got {len(prompts)} prompts but {len(params)} SamplingParams; "
                "pass one SamplingParams for all or exactly one per prompt"
            )
        return params

    def _new_generator(self, seed: int | None) -> torch.Generator:
        # Always a CPU generator: a seed then draws the same uniforms on every device (a CUDA
        # generator's stream differs from the CPU's), so a seeded request samples the same tokens
        # on a CPU and on a GPU wherever their logits agree.
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else self._seed_source.getrandbits(63))
        return gen

    def _choose(
        self, logits: torch.Tensor, rows: list[_Row], temperature: torch.Tensor, top_p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row (argmax at temperature 0, else top-p sampling) and its log-prob.

        The log-prob is under the temperature-scaled distribution before top-p truncation
        (temperature 1 for greedy rows): the quantity a trainer recomputes as the old policy's.
        """
        greedy = temperature <= 0
        scale = torch.where(greedy, torch.ones_like(temperature), temperature)
        logp = torch.log_softmax(logits / scale[:, None], dim=-1)
        sample_rows = (~greedy).nonzero().flatten().tolist()
        if len(sample_rows) < logits.shape[0]:
            tokens = logits.argmax(dim=-1)
        else:  # every row samples: no argmax pass over the vocabulary
            tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        if sample_rows:
            probs = logp[sample_rows].exp()
            sub_top_p = top_p[sample_rows]
            if bool((sub_top_p < 1).any()):
                probs = nucleus(probs, sub_top_p)
            # Inverse-CDF sampling, one uniform per row from that row's own generator (so a
            # row's sample never depends on its batch companions); faster than per-row multinomial.
            # The uniforms are drawn on the CPU and moved in one copy (device-independent samples).
            cdf = probs.double().cumsum(-1)
            u = torch.cat([torch.rand(1, generator=rows[r].generator, dtype=torch.float64) for r in sample_rows])
            u = u.to(probs.device)
            picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
            picked = picked.clamp(max=probs.shape[-1] - 1)
            # rounding can land past the last token with mass: take the likeliest token then
            zero = probs.gather(-1, picked[:, None]).squeeze(-1) <= 0
            if bool(zero.any()):
                picked = torch.where(zero, probs.argmax(-1), picked)
            tokens[sample_rows] = picked
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, chosen

    def _check_stop(self, row: _Row) -> bool:
        """True when a stop string has just been completed; the decode window covers any split."""
        window = row.new_ids[-row.max_stop_tokens :]
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        if len(row.new_ids) < row.max_stop_tokens and row.context:
            # The window starts at the first new token, which some decoders (SentencePiece's, as in
            # Llama-2 tokenizers) strip of its leading space when it comes first: " Answer:" would
            # never match. Decoded after the prompt's last token, the text keeps it.
            joined = self.tokenizer.decode(row.context + window, skip_special_tokens=False)
            if joined.startswith(row.context_text):
                text = joined[len(row.context_text):]
        best_end, best = None, None
        for s in row.params.stop:
            pos = text.find(s)
            if pos >= 0 and (best_end is None or pos + len(s) < best_end):
                best_end, best = pos + len(s), s
        if best is None:
            return False
        row.stop_str = best
        return True


class HFEngine(DecodingBase):
    """The Engine protocol (engines/base.py) over a ``transformers`` causal LM with a KV cache.

    ``generate`` takes token ids and returns only the new token ids; a sequence ends after its
    first stop string (the token completing it is kept, later ones are never generated), on an
    end-of-sequence token (kept in the output) or at ``max_new_tokens``.
    """

    name = "HFEngine"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"HFEngine max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        if not 0 <= self.pad_token_id < self.vocab_size:  # an added <pad> the embedding never got:
            self.pad_token_id = 0  # any real id does in the masked left padding
        self.weights_version = 0
        self._seed_source = random.Random()
        # transformers 5.2x renamed the forward's ``past_key_values`` argument to ``cache``.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    # ----------------------------------------------------------------------------- generate
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]:
        """Continue each prompt; one Generation (new tokens only) per prompt, in input order.

        One SamplingParams for all prompts uses seed ``seed + i`` for prompt i (so repeated
        prompts give different samples); a list gives each request its own params and seed.
        """
        params_list = self._expand_params(prompts, params)
        self._validate_prompts(prompts)
        results: list[Generation | None] = [None] * len(prompts)
        # Similar lengths share a batch, so left padding wastes little prefill compute.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            with device_mode_suspended():  # plain tensors only: skip the CPU-compat hook on each op
                gens = self._generate_batch([prompts[i] for i in chunk], [params_list[i] for i in chunk])
            for i, gen in zip(chunk, gens):
                results[i] = gen
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[Sequence[int]], params: list[SamplingParams]) -> list[Generation]:
        rows = self._new_rows(params, prompts)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attention_mask[r, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        next_pos = position_ids[:, -1] + 1
        active = list(range(len(rows)))  # indices into rows, aligned with the batch dimension
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=self.device)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=self.device)

        while True:
            logits = out.logits[:, -1, :].float()
            act = torch.as_tensor(active, device=self.device)
            tokens, logprobs = self._choose(logits, [rows[a] for a in active], temperature[act], top_p[act])
            still = []
            for b, (a, tok, lp) in enumerate(zip(active, tokens.tolist(), logprobs.tolist())):
                if self._advance(rows[a], tok, lp):
                    still.append(b)
            if not still:
                break
            if len(still) < len(active):
                keep = torch.as_tensor(still, device=self.device)
                cache.batch_select_indices(keep)
                attention_mask = attention_mask[keep]
                next_pos = next_pos[keep]
                tokens = tokens[keep]
                active = [active[b] for b in still]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            out = self.model(
                input_ids=tokens.view(-1, 1),
                attention_mask=attention_mask,
                position_ids=next_pos.view(-1, 1),
                use_cache=True,
                **{self._cache_arg: cache},
            )
            next_pos = next_pos + 1

        return [Generation(r.new_ids, r.finish_reason or "length", r.stop_str, r.logprobs) for r in rows]

    # ------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the model in place (dtype cast, shape checked).

        Raises KeyError on an unknown name and ValueError on a shape mismatch; tensors copied
        before the bad one stay copied, so reload a full set after an error.
        """
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        count = 0
        for name, tensor in named_tensors:
            if name not in targets:
                close = [n for n in targets if n.endswith(name.split(".")[-1])][:3]
                raise KeyError(
                    f"HFEngine.load_weights: unknown tensor name {name!r}; the model has "
                    f"{len(targets)} tensors in Hugging Face naming (for example {close})"
                )
            dst = targets[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"HFEngine.load_weights: tensor {name!r} has shape {tuple(tensor.shape)} but the "
                    f"model expects {tuple(dst.shape)}; gather tensor-parallel shards before loading"
                )
            dst.copy_(tensor.to(device=dst.device, dtype=dst.dtype))
            count += 1
        if count == 0:
            raise ValueError("HFEngine.load_weights got no tensors; pass (name, tensor) pairs")
        self.weights_version += 1
        log.debug("HFEngine.load_weights: copied %d tensors (version %d)", count, self.weights_version)

    def sleep(self) -> None:
        """No-op: the KV cache lives only inside one generate() call."""

    def wake(self) -> None:
        """No-op, see sleep()."""


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p truncation of each row of ``probs`` [rows, V] (not renormalized): the smallest prefix,
    by descending probability, whose mass reaches the row's ``top_p`` (the first token always).
    A row at top_p 1 keeps every token: its float32 running sum can pass 1 before the tail."""
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[:, None]
    drop &= (top_p < 1)[:, None]
    return torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs.masked_fill(drop, 0.0))


def _eos_token_ids(model: torch.nn.Module | None, tokenizer, generation_config: Any = None,
                   hf_config: Any = None) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the generation config: ``generation_config`` (a
    folder's generation_config.json), else the model's own (a transformers model has one, a Megatron
    model does not), else the one ``hf_config`` implies (its eos_token_id, as transformers derives a
    model's generation config from config.json when the folder has no generation_config.json)."""
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_cfg = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if gen_cfg is not None:
        candidates.append(getattr(gen_cfg, "eos_token_id", None))
    elif hf_config is not None:
        candidates.append(getattr(hf_config, "eos_token_id", None))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return frozenset(ids)
