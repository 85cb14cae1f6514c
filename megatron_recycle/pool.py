"""The recycling pool: which queries a GRPO step rolls out and trains on (METHOD.md section 2).

Each query q has a weight w_q in [0, 1], all 1 at the start. A step draws C = k * B distinct
candidates without replacement with P(q) proportional to w_q, the trainer rolls out K
trajectories per candidate, and `update` chooses the effective batch: the first min(B, #signal)
signal-bearing groups in draw order. What happens to the weights is the strategy:

* ``recycle``       effective-batch queries get ``consumed_weight`` (0); every other drawn query
                    (zero-variance, or signal-bearing but past B) keeps its weight: recycled.
* ``soft_recycle``  the same with ``consumed_weight`` 0.1.
* ``grpo``          k = 1; every drawn query is consumed whatever its outcome.
* ``bounded_dapo``  k * B drawn once, every drawn query consumed, at most B signal groups trained.
* ``dapo``          batches of B drawn repeatedly (``needs_more``) until B signal groups are
                    collected or ``max_gen_batches`` is reached; every drawn query consumed;
                    surplus signal groups dropped.

When fewer than C queries have positive weight, the pool starts a new epoch (all weights back to
1) or raises PoolExhausted, as configured. A ``dapo`` step never crosses an epoch boundary: with
``new_epoch``, a step whose next generation batch the live queries cannot fill ends there (as if
``max_gen_batches`` were reached) and the next step starts the new epoch, so no query is drawn
twice in one step. The whole state (weights, histories, generator,
counters) is in ``state_dict``. Rank 0 owns the pool in distributed runs; `PoolClient` broadcasts
its decisions to every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

STRATEGIES = ("recycle", "soft_recycle", "grpo", "bounded_dapo", "dapo")
ON_EXHAUSTED = ("new_epoch", "stop")
# A rollout succeeds when its reward is at least this: a zero-variance group is all-correct (easy)
# when its common reward is a success, else all-wrong (hard). Rollout metrics use the same rule.
SUCCESS_THRESHOLD = 0.5
STATES = ("hard", "signal", "easy")  # index 0, 1, 2 in histories and transition matrices
HARD, SIGNAL, EASY = 0, 1, 2
_NEVER = -1


def binary_state(successes: int, k: int) -> int:
    """A draw's state from its success count alone: right for binary rewards only (0 hard, K easy,
    signal between); the pool itself decides from the rewards' spread."""
    return HARD if successes == 0 else (EASY if successes >= k else SIGNAL)


_EXHAUSTED = -1  # what PoolClient.sample broadcasts instead of ids when the owner's pool is exhausted


class PoolExhausted(RuntimeError):
    """The live weight mass cannot fill a draw and the pool was configured to stop."""


@dataclass
class _StepAccumulator:
    """Counts for the step in progress (several generation batches under dapo)."""

    gen_batches: int = 0
    candidates: int = 0
    rollouts: int = 0
    signal: int = 0
    zv_all_correct: int = 0
    zv_all_wrong: int = 0
    effective: int = 0
    recycled: int = 0
    recovery: int = 0
    drift: int = 0
    epoch_reset: bool = False


class RecyclingPool:
    """A weighted, mutable pool of training-query ids with per-query history and metrics."""

    def __init__(
        self,
        num_queries: int,
        batch_size: int,
        oversample: int = 1,
        strategy: str = "recycle",
        consumed_weight: float | None = None,
        seed: int = 0,
        on_exhausted: str = "new_epoch",
        max_gen_batches: int = 3,
        signal_eps: float = 1e-6,
        success_threshold: float = SUCCESS_THRESHOLD,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"pool strategy must be one of {STRATEGIES}, got {strategy!r}")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size (B, groups per step) must be >= 1, got {batch_size}")
        if oversample < 1:
            raise ValueError(f"oversample (k) must be >= 1, got {oversample}")
        if strategy in ("grpo", "dapo") and oversample != 1:
            raise ValueError(
                f"strategy {strategy!r} draws B candidates per generation batch: oversample must be 1, "
                f"got {oversample} (use bounded_dapo or recycle for k > 1)"
            )
        if max_gen_batches < 1:
            raise ValueError(f"max_gen_batches must be >= 1, got {max_gen_batches}")
        if consumed_weight is None:
            consumed_weight = 0.1 if strategy == "soft_recycle" else 0.0
        if not 0.0 <= consumed_weight < 1.0:
            raise ValueError(f"consumed_weight must be in [0, 1), got {consumed_weight}")
        draw = batch_size * oversample
        if draw > num_queries:
            raise ValueError(
                f"a step draws k*B = {oversample}*{batch_size} = {draw} candidates but the pool has only "
                f"{num_queries} queries; lower the batch size or oversampling, or add queries"
            )
        self.num_queries = num_queries
        self.batch_size = batch_size
        self.oversample = oversample
        self.strategy = strategy
        self.consumed_weight = float(consumed_weight)
        self.on_exhausted = on_exhausted
        self.max_gen_batches = max_gen_batches if strategy == "dapo" else 1
        self.signal_eps = signal_eps
        self.success_threshold = success_threshold
        self.seed = seed

        self.generator = torch.Generator().manual_seed(seed)
        self.weights = torch.ones(num_queries, dtype=torch.float64)
        self.step = 0  # completed steps
        self.epoch = 0
        self.draw_count = torch.zeros(num_queries, dtype=torch.long)
        self.last_state = torch.full((num_queries,), _NEVER, dtype=torch.long)
        self.last_zero_variance = torch.full((num_queries,), _NEVER, dtype=torch.long)
        self.state_changes = torch.zeros(num_queries, dtype=torch.long)
        self.transitions_total = torch.zeros(3, 3, dtype=torch.long)
        # Flat history, one row per draw: (query, step, successes, K, state). Lists for cheap appends.
        # The state is the pool's own (HARD/SIGNAL/EASY): with continuous rewards it cannot be told
        # from the success count alone.
        self._hist_query: list[int] = []
        self._hist_step: list[int] = []
        self._hist_successes: list[int] = []
        self._hist_k: list[int] = []
        self._hist_state: list[int] = []
        self._acc = _StepAccumulator()
        self._step_transitions = torch.zeros(3, 3, dtype=torch.long)
        self._pending: torch.Tensor | None = None  # ids sampled but not yet updated
        self._last_stats: dict[str, Any] = {}
        self.totals = {"candidates": 0, "rollouts": 0, "effective": 0, "recycled": 0, "recovery": 0, "drift": 0}

    # ----------------------------------------------------------------------------- sampling
    @property
    def draw_size(self) -> int:
        """Candidates per generation batch: k*B (B for grpo and dapo)."""
        return self.batch_size * self.oversample

    @property
    def needs_more(self) -> bool:
        """True while the current step wants another generation batch (dapo only)."""
        acc = self._acc
        return (
            self.strategy == "dapo"
            and acc.gen_batches > 0
            and acc.effective < self.batch_size
            and acc.gen_batches < self.max_gen_batches
            # new_epoch: a reset inside the step would make its consumed queries drawable again
            # (one query twice in one batch), so the step ends here and the next one resets;
            # stop: the next sample() raises PoolExhausted and the trainer closes the step.
            and (self.on_exhausted == "stop" or int((self.weights > 0).sum()) >= self.draw_size)
        )

    def sample(self) -> torch.Tensor:
        """Draw the next generation batch: distinct ids, P(q) proportional to w_q, in draw order."""
        if self._pending is not None:
            raise RuntimeError("sample() called twice without update(): pass the rewards of the last draw first")
        n = self.draw_size
        live = int((self.weights > 0).sum())
        if live < n:
            if self.on_exhausted == "stop":
                raise PoolExhausted(
                    f"only {live} queries have positive weight, fewer than the {n} a draw needs "
                    f"(step {self.step}, epoch {self.epoch})"
                )
            self.weights.fill_(1.0)
            self.epoch += 1
            self._acc.epoch_reset = True
        # Efraimidis-Spirakis: key = Exp(1) / w; the n smallest keys, ascending, are a weighted
        # draw without replacement in successive-sampling (draw) order. w = 0 gives key inf.
        u = torch.rand(self.num_queries, generator=self.generator, dtype=torch.float64)
        keys = -torch.log1p(-u) / self.weights
        ids = torch.argsort(keys, stable=True)[:n]
        self._pending = ids.clone()
        return ids

    # ------------------------------------------------------------------------------- update
    def is_signal(self, rewards: torch.Tensor) -> torch.Tensor:
        """Signal-bearing flag per group: rewards not all equal (std > eps), [C, K] -> [C]."""
        if rewards.shape[1] < 2:
            return torch.zeros(rewards.shape[0], dtype=torch.bool)
        return rewards.to(torch.float64).std(dim=1, unbiased=False) > self.signal_eps

    def update(
        self, ids: torch.Tensor, rewards: torch.Tensor, signal: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Record the outcomes of the last draw and return its effective-batch ids (draw order).

        rewards: [len(ids), K] (binary or continuous). ``signal`` may pass the flags computed by
        kernels.grpo_advantages; otherwise they are computed here with the same rule.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        rewards = torch.as_tensor(rewards).detach().cpu()
        if self._pending is None:
            raise RuntimeError("update() called without a pending sample(): draw first")
        if ids.shape != self._pending.shape or not torch.equal(ids, self._pending):
            raise ValueError(
                "update() ids differ from the ids the last sample() returned "
                f"({ids.tolist()[:8]}... vs {self._pending.tolist()[:8]}...): pass them back unchanged, in order"
            )
        if rewards.dim() != 2 or rewards.shape[0] != ids.numel():
            raise ValueError(f"rewards must have shape [len(ids)={ids.numel()}, K], got {tuple(rewards.shape)}")
        if not torch.isfinite(rewards).all():
            bad = (~torch.isfinite(rewards)).nonzero()[0].tolist()
            raise ValueError(f"rewards contain NaN/inf (first at row {bad[0]}, column {bad[1]}, query {int(ids[bad[0]])})")
        flags = self.is_signal(rewards)
        if signal is not None:
            signal = torch.as_tensor(signal, dtype=torch.bool).cpu()
            if signal.shape != flags.shape:
                raise ValueError(f"signal must have shape [{ids.numel()}], got {tuple(signal.shape)}")
            flags = signal
        self._pending = None
        k = rewards.shape[1]
        successes = (rewards.to(torch.float64) >= self.success_threshold).sum(dim=1)
        states = torch.where(flags, SIGNAL, torch.where(successes >= k, EASY, HARD))
        # Zero-variance groups of continuous rewards: easy when their common value is a success.
        zero_var = ~flags

        acc = self._acc
        acc.gen_batches += 1
        acc.candidates += ids.numel()
        acc.rollouts += ids.numel() * k
        acc.signal += int(flags.sum())
        acc.zv_all_correct += int((zero_var & (states == EASY)).sum())
        acc.zv_all_wrong += int((zero_var & (states == HARD)).sum())

        # Effective batch: the first signal-bearing groups in draw order, up to what is left of B.
        room = self.batch_size - acc.effective
        signal_pos = flags.nonzero().flatten()
        chosen_pos = signal_pos[: max(room, 0)]
        chosen = ids[chosen_pos]
        prev_zv = self.last_zero_variance[chosen]
        acc.effective += chosen.numel()
        acc.recycled += int((prev_zv != _NEVER).sum())
        acc.recovery += int((prev_zv == HARD).sum())
        acc.drift += int((prev_zv == EASY).sum())

        # Weights.
        if self.strategy in ("recycle", "soft_recycle"):
            self.weights[chosen] = self.consumed_weight
        else:  # grpo, bounded_dapo, dapo: everything drawn is consumed
            self.weights[ids] = self.consumed_weight

        # Histories and transitions.
        prev = self.last_state[ids]
        seen = prev != _NEVER
        for a, b in zip(prev[seen].tolist(), states[seen].tolist()):
            self._step_transitions[a, b] += 1
        self.state_changes[ids] += (seen & (prev != states)).long()
        self.last_state[ids] = states
        self.last_zero_variance[ids] = torch.where(zero_var, states, self.last_zero_variance[ids])
        self.draw_count[ids] += 1
        self._hist_query.extend(ids.tolist())
        self._hist_step.extend([self.step] * ids.numel())
        self._hist_successes.extend(successes.tolist())
        self._hist_k.extend([k] * ids.numel())
        self._hist_state.extend(states.tolist())

        if not self.needs_more:
            self._finish_step()
        return chosen

    def close_step(self) -> bool:
        """End a step that stopped drawing early (``dapo`` when the pool ran out mid-step): its
        generation batches so far make the step, as if the draw cap had been reached. False
        when no step is open (nothing drawn since the last completed step)."""
        if self._pending is not None:
            raise RuntimeError("close_step() with a pending sample(): pass its rewards to update() first")
        if not self._acc.gen_batches:
            return False
        self._finish_step()
        return True

    def _finish_step(self) -> None:
        acc = self._acc
        zv = acc.zv_all_correct + acc.zv_all_wrong
        eff = acc.effective
        self.transitions_total += self._step_transitions
        for key in self.totals:
            self.totals[key] += getattr(acc, key)
        self._last_stats = {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_reset": acc.epoch_reset,
            "gen_batches": acc.gen_batches,
            "candidates": acc.candidates,
            "rollouts": acc.rollouts,
            "signal_groups": acc.signal,
            "zero_variance": zv,
            "zv_all_correct": acc.zv_all_correct,
            "zv_all_wrong": acc.zv_all_wrong,
            "effective_batch": eff,
            "batch_fill": eff / self.batch_size,
            "recycled": acc.recycled,
            # Shares of an empty effective batch are undefined: NaN, which the analysis and the
            # simulator skip (a 0 there dragged the recycled-share curves down in small runs).
            "recycled_share": acc.recycled / eff if eff else float("nan"),
            "recovery": acc.recovery,
            "drift": acc.drift,
            "recovery_share": acc.recovery / eff if eff else float("nan"),
            "drift_share": acc.drift / eff if eff else float("nan"),
            "rollouts_per_effective_group": acc.rollouts / eff if eff else float("inf"),
            "transitions": self._step_transitions.tolist(),
        }
        self.step += 1
        self._acc = _StepAccumulator()
        self._step_transitions = torch.zeros(3, 3, dtype=torch.long)

    # ------------------------------------------------------------------------------ metrics
    def stats(self) -> dict[str, Any]:
        """Metrics of the last completed step plus the pool's current state (METHOD.md section 2)."""
        live = self.weights > 0
        out = dict(self._last_stats)
        out.update(
            {
                "pool_step": self.step,
                "pool_epoch": self.epoch,
                "pool_queries": self.num_queries,
                "live_weight_mass": float(self.weights.sum()),
                "live_queries": int(live.sum()),
                "never_drawn": int((self.draw_count == 0).sum()),
                "flipped_queries": int((self.state_changes > 0).sum()),
                "transitions_total": self.transitions_total.tolist(),
                "total_rollouts": self.totals["rollouts"],
                "total_effective": self.totals["effective"],
                "total_recycled_share": self.totals["recycled"] / self.totals["effective"]
                if self.totals["effective"]
                else 0.0,
            }
        )
        return out

    def history(self, query_id: int) -> list[tuple[int, int, int]]:
        """All draws of one query as (step, successes, K), oldest first."""
        return [
            (s, n, k)
            for q, s, n, k in zip(self._hist_query, self._hist_step, self._hist_successes, self._hist_k)
            if q == query_id
        ]

    def history_table(self) -> dict[str, torch.Tensor]:
        """The whole per-draw history as columns: query, step, successes, k, state (0 hard, 1 signal, 2 easy)."""
        return {
            "query": torch.tensor(self._hist_query, dtype=torch.long),
            "step": torch.tensor(self._hist_step, dtype=torch.long),
            "successes": torch.tensor(self._hist_successes, dtype=torch.long),
            "k": torch.tensor(self._hist_k, dtype=torch.long),
            "state": torch.tensor(self._hist_state, dtype=torch.long),
        }

    # -------------------------------------------------------------------------- checkpoints
    def config(self) -> dict[str, Any]:
        return {
            "num_queries": self.num_queries,
            "batch_size": self.batch_size,
            "oversample": self.oversample,
            "strategy": self.strategy,
            "consumed_weight": self.consumed_weight,
            "on_exhausted": self.on_exhausted,
            "max_gen_batches": self.max_gen_batches,
            "signal_eps": self.signal_eps,
            "success_threshold": self.success_threshold,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None or self._acc.gen_batches:
            raise RuntimeError("state_dict() in the middle of a step: checkpoint between steps")
        return {
            "version": 1,
            "config": self.config(),
            "generator": self.generator.get_state(),
            "weights": self.weights.clone(),
            "step": self.step,
            "epoch": self.epoch,
            "draw_count": self.draw_count.clone(),
            "last_state": self.last_state.clone(),
            "last_zero_variance": self.last_zero_variance.clone(),
            "state_changes": self.state_changes.clone(),
            "transitions_total": self.transitions_total.clone(),
            "history": self.history_table(),
            "last_stats": dict(self._last_stats),
            "totals": dict(self.totals),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != 1:
            raise ValueError(f"unknown pool state version {sd.get('version')!r}")
        mine, theirs = self.config(), sd["config"]
        if mine["num_queries"] != theirs["num_queries"]:
            raise ValueError(
                f"checkpointed pool has {theirs['num_queries']} queries but this run has {mine['num_queries']}: "
                "the training data changed; resume with the same data"
            )
        diff = {k: (theirs[k], mine[k]) for k in mine if k != "seed" and theirs.get(k) != mine[k]}
        if diff:
            raise ValueError(f"checkpointed pool settings differ from this run's (checkpoint, run): {diff}")
        self.generator.set_state(sd["generator"])
        self.weights = sd["weights"].clone().to(torch.float64)
        self.step, self.epoch = int(sd["step"]), int(sd["epoch"])
        self.draw_count = sd["draw_count"].clone()
        self.last_state = sd["last_state"].clone()
        self.last_zero_variance = sd["last_zero_variance"].clone()
        self.state_changes = sd["state_changes"].clone()
        self.transitions_total = sd["transitions_total"].clone()
        hist = sd["history"]
        self._hist_query = hist["query"].tolist()
        self._hist_step = hist["step"].tolist()
        self._hist_successes = hist["successes"].tolist()
        self._hist_k = hist["k"].tolist()
        if "state" in hist:
            self._hist_state = hist["state"].tolist()
        else:  # a checkpoint from before the history kept states: the binary-reward rule
            self._hist_state = [binary_state(n, k) for n, k in zip(self._hist_successes, self._hist_k)]
        self._last_stats = dict(sd["last_stats"])
        self.totals = dict(sd["totals"])
        self._acc = _StepAccumulator()
        self._pending = None


# ------------------------------------------------------------------------- rank-0 ownership
def _comm_device(group=None) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_ids(ids: torch.Tensor | None, src: int = 0, group=None) -> torch.Tensor:
    """Broadcast a 1-D LongTensor of any length from ``src`` (others pass None); returns it on CPU."""
    import torch.distributed as dist

    device = _comm_device(group)
    is_src = dist.get_rank() == src
    length = torch.tensor([ids.numel() if is_src else 0], dtype=torch.long, device=device)
    dist.broadcast(length, src=src, group=group)
    buf = ids.to(device=device, dtype=torch.long) if is_src else torch.empty(int(length), dtype=torch.long, device=device)
    dist.broadcast(buf, src=src, group=group)
    return buf.cpu()


def gather_rows(local: torch.Tensor, dst: int = 0, group=None) -> torch.Tensor | None:
    """Concatenate every rank's [n_r, ...] rows on ``dst`` in rank order (n_r may differ); None elsewhere."""
    import torch.distributed as dist

    device = _comm_device(group)
    world = dist.get_world_size(group)
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    width = max(counts)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)  # all_gather: gloo has no gather for every dtype
    if dist.get_rank() != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def shard(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of ``ids`` for rollouts (sizes differ by at most one)."""
    base, extra = divmod(ids.numel(), world)
    start = rank * base + min(rank, extra)
    return ids[start : start + base + (1 if rank < extra else 0)]


class PoolClient:
    """The pool as every rank sees it: rank ``src`` owns it, the others receive its decisions.

    sample() and update() are collective calls: every rank of ``group`` must make them in the
    same order. On non-owner ranks the rewards argument of update() is ignored.
    """

    def __init__(self, pool: RecyclingPool | None, group=None, src: int = 0) -> None:
        import torch.distributed as dist

        self.group, self.src = group, src
        self.is_owner = not dist.is_initialized() or dist.get_rank() == src
        if self.is_owner and pool is None:
            raise ValueError(f"rank {src} owns the pool: pass the RecyclingPool there")
        self.pool = pool if self.is_owner else None

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return dist.is_initialized() and dist.get_world_size(self.group) > 1

    def sample(self) -> torch.Tensor:
        """The owner's next draw on every rank; PoolExhausted (``on_exhausted="stop"``) on every rank."""
        exhausted: PoolExhausted | None = None
        ids = None
        if self.is_owner:
            try:
                ids = self.pool.sample()
            except PoolExhausted as e:
                if not self._distributed():
                    raise
                exhausted, ids = e, torch.tensor([_EXHAUSTED], dtype=torch.long)
        if not self._distributed():
            return ids
        ids = broadcast_ids(ids, self.src, self.group)
        if exhausted is not None:
            raise exhausted
        if ids.numel() == 1 and int(ids[0]) == _EXHAUSTED:
            raise PoolExhausted(f"the pool (owned by rank {self.src}) is exhausted: see rank {self.src}'s message")
        return ids

    def close_step(self) -> bool:
        """RecyclingPool.close_step on the owner (every rank calls it; it sends nothing)."""
        return self.pool.close_step() if self.is_owner else False

    def update(self, ids: torch.Tensor, rewards: torch.Tensor | None, signal: torch.Tensor | None = None) -> torch.Tensor:
        chosen = self.pool.update(ids, rewards, signal) if self.is_owner else None
        return broadcast_ids(chosen, self.src, self.group) if self._distributed() else chosen

    @property
    def needs_more(self) -> bool:
        flag = torch.tensor([int(self.pool.needs_more) if self.is_owner else 0], dtype=torch.long)
        if self._distributed():
            flag = broadcast_ids(flag, self.src, self.group)
        return bool(flag[0])
