"""The training step's input: a right-padded batch of trajectories for one DP rank.

Alignment: ``loss_mask[:, t]`` refers to token ``t`` as the token being PREDICTED, so the logits
at position ``t - 1`` are scored against ``tokens[:, t]``; log-probs have shape ``[N, L - 1]`` and
column ``j`` is the log-prob of ``tokens[:, j + 1]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron_recycle.train.packing import PackedRows
    from megatron_recycle.train.step import LogitSelection


@dataclass
class TrajectoryBatch:
    """A right-padded batch of trajectories for one DP rank.

    tokens [N, L] int64; loss_mask [N, L] float (1 where tokens[:, t] is a policy token to
    predict; column 0 must be 0); advantages [N]; old/ref log-probs [N, L-1] or None.
    group_ids [N] (optional): rows with the same id are one GRPO group (what group packing
    shares a prefix over); lengths [N] (optional): real lengths before right padding.
    ``packed`` and ``select`` are filled per micro-batch by the step itself (group_packed_layout,
    LogitSelection).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    packed: PackedRows | None = None
    select: LogitSelection | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [N, L], got shape {tuple(self.tokens.shape)}")
        n, seq = self.tokens.shape
        if seq < 2:
            raise ValueError(f"sequences need at least 2 tokens to predict anything, got L={seq}")
        if self.tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64/int32 ids, got {self.tokens.dtype}")
        self.tokens = self.tokens.long()
        if tuple(self.loss_mask.shape) != (n, seq):
            raise ValueError(
                f"loss_mask shape {tuple(self.loss_mask.shape)} != tokens shape {(n, seq)}"
            )
        self.loss_mask = self.loss_mask.to(torch.float32)
        if not bool(((self.loss_mask == 0) | (self.loss_mask == 1)).all()):
            bad = self.loss_mask[(self.loss_mask != 0) & (self.loss_mask != 1)]
            raise ValueError(
                f"loss_mask must hold only 0 and 1 (the GRPO loss counts every non-zero entry as one token), "
                f"got values such as {sorted(set(bad.flatten()[:5].tolist()))}"
            )
        if bool((self.loss_mask[:, 0] != 0).any()):
            raise ValueError(
                "loss_mask[:, 0] must be 0: the first token has no logits that predict it "
                "(mark prompt tokens 0; the mask refers to the token being predicted)"
            )
        if self.advantages is not None:
            if tuple(self.advantages.shape) != (n,):
                raise ValueError(f"advantages must be [N]={n}, got {tuple(self.advantages.shape)}")
            self.advantages = self.advantages.to(torch.float32)
        for name in ("group_ids", "lengths"):
            v = getattr(self, name)
            if v is not None:
                if tuple(v.shape) != (n,):
                    raise ValueError(f"{name} must be [N]={n}, got {tuple(v.shape)}")
                setattr(self, name, v.long())
        if self.lengths is not None and bool(((self.lengths < 2) | (self.lengths > seq)).any()):
            raise ValueError(f"lengths must be in [2, L={seq}], got {self.lengths.tolist()}")
        if self.lengths is not None:
            past = self.loss_mask * (torch.arange(seq) >= self.lengths[:, None])
            if bool(past.any()):
                row = int(past.any(dim=1).nonzero()[0])
                raise ValueError(
                    f"row {row} has loss tokens at or past its length {int(self.lengths[row])} "
                    "(lengths is each row's real token count; its padding must have loss_mask 0)"
                )
        for name in ("old_logprobs", "ref_logprobs"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (n, seq - 1):
                raise ValueError(
                    f"{name} must be [N, L-1]={(n, seq - 1)} (column j scores tokens[:, j+1]), "
                    f"got {tuple(v.shape)}"
                )

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def target_mask(self) -> torch.Tensor:
        """Loss mask aligned with the log-probs: [N, L-1]."""
        return self.loss_mask[:, 1:]

    def rows(self, start: int, stop: int) -> TrajectoryBatch:
        """Rows ``start:stop`` of every field (a micro-batch or a DP shard; views, no copies)."""
        return self.take(slice(start, stop))

    def replace(self, **fields: Any) -> TrajectoryBatch:
        """A copy with some fields replaced (e.g. old_logprobs from compute_logprobs)."""
        return dataclasses.replace(self, **fields)

    def to(self, device: torch.device | str, non_blocking: bool = False, **fields: Any) -> TrajectoryBatch:
        """This batch's tensors on ``device``, with ``fields`` set as given (``packed``, ``select``: already
        on it). The checks are not run again: this batch passed them, and on a GPU two of them would
        each wait for the copies (a host sync per micro-batch)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = set(fields) - set(names)
        if unknown:
            raise TypeError(f"TrajectoryBatch has no field(s) {sorted(unknown)}")
        out = object.__new__(TrajectoryBatch)  # no __init__: no __post_init__ checks
        for name in names:
            v = fields[name] if name in fields else getattr(self, name)
            if name not in fields and isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            setattr(out, name, v)
        return out

    def take(self, index: torch.Tensor | slice) -> TrajectoryBatch:
        """The rows ``index`` (a LongTensor, in that order, or a slice) of every field."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return TrajectoryBatch(
            tokens=self.tokens[index], loss_mask=self.loss_mask[index], advantages=pick(self.advantages),
            old_logprobs=pick(self.old_logprobs), ref_logprobs=pick(self.ref_logprobs),
            group_ids=pick(self.group_ids), lengths=pick(self.lengths),
        )

    def truncate(self, width: int) -> TrajectoryBatch:
        """The first ``width`` columns (log-probs: ``width - 1``); lengths are clipped to it."""
        if not 2 <= width <= self.seq_length:
            raise ValueError(f"width={width} must be in [2, L={self.seq_length}]")
        if width == self.seq_length:
            return self
        cut = lambda t: None if t is None else t[:, : width - 1]  # noqa: E731
        return TrajectoryBatch(
            tokens=self.tokens[:, :width], loss_mask=self.loss_mask[:, :width], advantages=self.advantages,
            old_logprobs=cut(self.old_logprobs), ref_logprobs=cut(self.ref_logprobs), group_ids=self.group_ids,
            lengths=None if self.lengths is None else self.lengths.clamp(max=width),
        )

    def pad_rows(self, multiple: int) -> TrajectoryBatch:
        """This batch with all-masked rows appended up to a multiple of ``multiple`` rows (self when
        it already is one). The new rows repeat row 0's tokens (real ids) with loss mask 0,
        advantage 0, log-probs 0, length 2 and group ids of their own: they add nothing to a loss,
        a gradient or a normalizer."""
        n = self.num_sequences
        extra = -n % multiple
        if extra == 0:
            return self

        def grow(t: torch.Tensor | None, fill: torch.Tensor | None = None) -> torch.Tensor | None:
            if t is None:
                return None
            rows = fill if fill is not None else t.new_zeros((extra, *t.shape[1:]))
            return torch.cat([t, rows])

        gids = None
        if self.group_ids is not None:
            top = int(self.group_ids.max()) + 1
            gids = grow(self.group_ids, torch.arange(top, top + extra, dtype=self.group_ids.dtype))
        lengths = grow(self.lengths, torch.full((extra,), 2, dtype=torch.long))
        return TrajectoryBatch(
            tokens=grow(self.tokens, self.tokens[:1].expand(extra, -1)), loss_mask=grow(self.loss_mask),
            advantages=grow(self.advantages), old_logprobs=grow(self.old_logprobs),
            ref_logprobs=grow(self.ref_logprobs), group_ids=gids, lengths=lengths,
        )

    def loss_extent(self) -> torch.Tensor:
        """[N]: the tokens each row needs for its loss: up to its last target (loss_mask 1), at least 2.
        Causal attention makes the later columns irrelevant to every log-prob that carries loss."""
        seq = self.seq_length
        has = self.loss_mask > 0
        last = seq - 1 - has.flip(dims=[1]).int().argmax(dim=1)  # the last target's column
        last = torch.where(has.any(dim=1), last, torch.ones_like(last))
        return (last + 1).clamp(min=2)


def build_batch(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    advantages: Sequence[float] | torch.Tensor | None = None,
    pad_token_id: int = 0,
    pad_length_to_multiple_of: int = 1,
    pad_rows_to_multiple_of: int = 1,
    group_ids: Sequence[int] | None = None,
) -> TrajectoryBatch:
    """Right-pad lists of token ids and loss masks into a TrajectoryBatch (real lengths kept).

    ``group_ids`` (one per sequence) mark GRPO groups for group packing; padding rows get ids
    of their own.

    Extra rows added to reach ``pad_rows_to_multiple_of`` (so that N divides into micro-batches)
    are all padding with mask 0 and advantage 0: they contribute nothing to loss or gradient.
    A mask may mark the first token of a sequence; that is an error (nothing predicts it).
    """
    if len(token_ids) == 0:
        raise ValueError("build_batch needs at least one sequence")
    if len(token_ids) != len(loss_masks):
        raise ValueError(f"{len(token_ids)} token sequences but {len(loss_masks)} loss masks")
    for i, (t, m) in enumerate(zip(token_ids, loss_masks)):
        if len(t) != len(m):
            raise ValueError(f"sequence {i}: {len(t)} tokens but {len(m)} mask entries")
    if pad_length_to_multiple_of < 1 or pad_rows_to_multiple_of < 1:
        raise ValueError(
            f"pad multiples must be >= 1, got length {pad_length_to_multiple_of}, rows {pad_rows_to_multiple_of}"
        )
    longest = max(2, max(len(t) for t in token_ids))
    seq = -(-longest // pad_length_to_multiple_of) * pad_length_to_multiple_of
    n = -(-len(token_ids) // pad_rows_to_multiple_of) * pad_rows_to_multiple_of
    tokens = torch.full((n, seq), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, seq), dtype=torch.float32)
    for i, (t, m) in enumerate(zip(token_ids, loss_masks)):
        tokens[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
        mask[i, : len(m)] = torch.as_tensor(list(m), dtype=torch.float32)
    adv = None
    if advantages is not None:
        a = torch.as_tensor(advantages, dtype=torch.float32).flatten()
        if a.numel() != len(token_ids):
            raise ValueError(f"{a.numel()} advantages for {len(token_ids)} sequences")
        adv = torch.zeros(n, dtype=torch.float32)
        adv[: a.numel()] = a
    lengths = torch.full((n,), 2, dtype=torch.long)
    lengths[: len(token_ids)] = torch.tensor([max(2, len(t)) for t in token_ids], dtype=torch.long)
    gids = None
    if group_ids is not None:
        if len(group_ids) != len(token_ids):
            raise ValueError(f"{len(group_ids)} group ids for {len(token_ids)} sequences")
        gids = torch.empty(n, dtype=torch.long)
        gids[: len(token_ids)] = torch.as_tensor(list(group_ids), dtype=torch.long)
        top = int(gids[: len(token_ids)].max()) + 1
        gids[len(token_ids):] = torch.arange(top, top + n - len(token_ids))
    return TrajectoryBatch(tokens=tokens, loss_mask=mask, advantages=adv, group_ids=gids, lengths=lengths)


def shard_for_data_parallel(batch: TrajectoryBatch, dp_rank: int, dp_size: int) -> TrajectoryBatch:
    """The contiguous share of a global batch that DP rank ``dp_rank`` trains on."""
    n = batch.num_sequences
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if n % dp_size != 0:
        raise ValueError(
            f"{n} sequences do not split evenly over {dp_size} DP ranks; "
            f"pad with build_batch(pad_rows_to_multiple_of={dp_size} * micro_batch_size)"
        )
    share = n // dp_size
    return batch.rows(dp_rank * share, (dp_rank + 1) * share)
