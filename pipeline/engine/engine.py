"""The engine: one model, its early-exit heads, one jagged cache, and the step primitive strategies use."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.engine.adapters import BackboneAdapter, adapter_for
from pipeline.engine.cache import JaggedKVCache
from pipeline.engine.sampling import Sampling, sample
from pipeline.engine.stats import GenerationStats, OracleBound
from pipeline.exits.cost import CostModel
from pipeline.exits.policy import FULL, ExitPolicy


@dataclass
class StepResult:
    """What one step produced. `token` is the next token as the exiting head or the full model chose it: its
    argmax (greedy) or a draw from `probs` (sampling)."""

    head: int | None  # the head the token exited at, or None when it reached the final layer
    token: int  # that head's choice, or the full model's choice for this position
    final_tokens: list[int] | None = None  # greedy: full model's argmax for every row verified in this pass
    logits: torch.Tensor | None = None  # [vocab] logits this position's token was taken from
    final_logits: torch.Tensor | None = None  # [rows, vocab] full model's logits of every verified row
    probs: torch.Tensor | None = None  # sampling: the distribution `token` was drawn from (a draft's q)
    value: float = float("nan")  # the exiting head's metric value (DSSD's adaptive draft length reads it)


@dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens only (prompt excluded)
    stats: GenerationStats


@dataclass
class TeacherForced:
    """A strategy run over given tokens: per position, the logits its next token would be taken from."""

    logits: torch.Tensor  # [T, vocab]
    exit_head: torch.Tensor  # [T] long: the head position t exited at, FULL (-1) for the full model
    stats: GenerationStats  # every position counted as a produced token


class DecodeSession:
    """State of one generation: token ids, the engine's jagged cache, statistics, emitted tokens.

    Positions are absolute: the prompt fills [0, prompt_len); running position p consumes token ids[p] and
    predicts token p + 1.
    """

    def __init__(
        self,
        engine: Engine,
        prompt: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        strategy_name: str,
        extra_capacity: int = 0,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
    ):
        self.engine = engine
        self.sampling = sampling  # None: greedy (argmax) decoding
        self.generator = generator
        self.adapter: BackboneAdapter = engine.adapter
        self.prompt_len = int(prompt.numel())
        self.max_new_tokens = max_new_tokens
        # Generation configs hold one stop token or a list of them; generation stops after any of them.
        if eos_token_id is None:
            eos_token_id = []
        ids = eos_token_id if isinstance(eos_token_id, Sequence) else [eos_token_id]
        self.eos_token_ids = frozenset(int(token) for token in ids)
        capacity = self.prompt_len + max_new_tokens + extra_capacity + 2
        self.cache = engine._cache_for(capacity)
        self.ids = torch.empty(capacity, dtype=torch.long, device=self.adapter.device)
        self.ids[: self.prompt_len] = prompt.view(-1)
        self.out: list[int] = []
        self.done = max_new_tokens <= 0
        n_heads = len(engine.head_layers)
        self.stats = GenerationStats(
            strategy=strategy_name,
            num_layers=self.adapter.num_layers,
            cost=engine.cost,
            prompt_tokens=self.prompt_len,
            exits_per_head=[0] * n_heads,
            drafts_per_head=[0] * n_heads,
        )
        self.accepted_per_head = [0] * n_heads

    # -- output ----------------------------------------------------------------------------------------------

    def count(self, kind: str) -> None:
        """Count one produced token of the given accounting kind (see `GenerationStats`)."""
        self.stats.generated += 1
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)

    def emit(self, token: int, kind: str) -> bool:
        """Append a generated token of the given accounting kind; return False once generation must stop."""
        if self.done:
            return False
        self.out.append(token)
        self.count(kind)
        if len(self.out) >= self.max_new_tokens or token in self.eos_token_ids:
            self.done = True
        return not self.done

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.out)

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The token taken from one position's logits [vocab]: the argmax (greedy), or a draw from the
        sampling distribution, returned with it (None when greedy)."""
        if self.sampling is None:
            return int(logits.argmax()), None
        probs = self.sampling.probs(logits)
        return sample(probs, self.generator), probs

    # -- compute primitives ------------------------------------------------------------------------------------

    def prefill(self, probe: list[list[int]] | None = None) -> int:
        """Run the prompt through every block; return the full model's next token. The last prompt row is
        counted as a decoding step (it produces the first token), the others as prefill."""
        adapter, cache, n = self.adapter, self.cache, self.prompt_len
        cache.reset()
        cache.hidden[:, :n] = adapter.embed(self.ids[:n])
        probe_row: list[int] = []
        for i in range(adapter.num_layers):
            out = adapter.block(i, cache.hidden[:, :n], cache, 0)
            cache.hidden[:, :n] = out
            cache.lengths[i] = n
            if probe is not None and i in self.engine.head_index:
                probe_row.append(self._head_token(self.engine.head_index[i], out[:, -1:]))
        if probe is not None:
            probe.append(probe_row)
        self.stats.prefill_block_rows += (n - 1) * adapter.num_layers
        self.stats.block_rows += adapter.num_layers
        self.stats.block_calls += adapter.num_layers
        self.stats.lm_head_rows += 1
        self.stats.lm_head_calls += 1
        logits = adapter.logits(cache.hidden[:, n - 1 : n])
        if self.sampling is None:
            return int(logits.argmax(-1).view(-1)[0])
        return self.choose(logits.view(-1))[0]

    def step(
        self,
        position: int,
        token: int,
        policy: ExitPolicy | None = None,
        verify_from: int | None = None,
        probe: list[list[int]] | None = None,
    ) -> StepResult:
        """Run token `token` at `position` up the stack, lazily filling each block's pending positions first.

        At each block where `policy` evaluates a head, the head runs on this token and the token exits there
        when `policy.exits` says so; its token is that head's choice (`choose`). Otherwise it reaches the final
        layer; the full model's logits are then computed for rows [verify_from, position] (all drafts since
        the last verification, in one batch) or for this row only, and the token is the full model's choice
        for the last row (greedy: `final_tokens` holds the argmax of every row).
        """
        adapter, cache, stats = self.adapter, self.cache, self.stats
        self.ids[position] = token
        cache.hidden[:, position : position + 1] = adapter.embed(self.ids[position : position + 1])
        end = position + 1
        exit_at = policy.evaluated_heads if policy is not None else {}
        view = policy.head_view(self.engine.heads) if policy is not None else None  # pruned signal: K tokens
        # A hidden-state metric (saturation) compares head k's input with head k-1's input.
        keep_prev = policy is not None and policy.metric_fn.needs_hidden
        prev_head_input: torch.Tensor | None = None
        head_index = self.engine.head_index
        probe_row: list[int] = []
        lengths = cache.lengths
        for i in range(adapter.num_layers):
            start = lengths[i]
            if start > position:
                raise RuntimeError(
                    f"position {position} already in layer {i}'s cache ({lengths}): crop first"
                )
            out = adapter.block(i, cache.hidden[:, start:end], cache, start)
            cache.hidden[:, start:end] = out
            lengths[i] = end
            stats.block_rows += end - start
            stats.block_calls += 1
            if probe is not None and i in head_index:
                probe_row.append(self._head_token(head_index[i], out[:, -1:]))
            if i in exit_at:
                head = exit_at[i]
                hidden = out[:, -1:]
                logits = view(head, hidden.to(self.engine.head_dtype))
                stats.head_evals += policy.head_cost  # in full-head units: K/V through a pruned view
                value = policy.exit_value(head, logits, hidden, prev_head_input)
                if value is not None:
                    row = logits.reshape(-1, logits.shape[-1])[-1]
                    token, probs = self.choose(row)
                    return StepResult(head, token, logits=row, probs=probs, value=value)
            if keep_prev and i in head_index:
                prev_head_input = out[:, -1:]
        if probe is not None:
            probe.append(probe_row)
        first = position if verify_from is None else verify_from
        logits = adapter.logits(cache.hidden[:, first:end])
        stats.lm_head_rows += end - first
        stats.lm_head_calls += 1
        if self.sampling is None:
            tokens = logits.argmax(-1).view(-1).tolist()
            return StepResult(None, tokens[-1], tokens, logits[0, -1], final_logits=logits[0])
        token, probs = self.choose(logits[0, -1])
        return StepResult(None, token, None, logits[0, -1], final_logits=logits[0], probs=probs)

    def _head_token(self, head: int, hidden: torch.Tensor) -> int:
        self.stats.head_evals += 1
        return int(self.engine.heads(head, hidden.to(self.engine.head_dtype)).argmax(-1).view(-1)[0])

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    def copy_fill(self, position: int, exit_layer: int) -> None:
        """CALM state copying: K/V of every block above `exit_layer` for `position`, computed from the exit
        hidden state instead of the (skipped) true inputs of those blocks. Approximate by design."""
        cache = self.cache
        hidden = cache.hidden[:, position : position + 1]
        for j in range(exit_layer + 1, self.adapter.num_layers):
            if cache.lengths[j] != position:
                raise RuntimeError(f"copy fill expects no pending positions, lengths={cache.lengths}")
            self.adapter.kv_only(j, hidden, cache, position)
            cache.lengths[j] = position + 1
            self.stats.kv_only_rows += 1
            self.stats.kv_only_calls += 1

    def reset_for_recompute(self, position: int) -> None:
        """Drop every cached K/V so that the next step recomputes the whole prefix [0, position] through the
        blocks it traverses (the paper author's demo: no cache reuse)."""
        cache = self.cache
        cache.reset()
        if position:
            cache.hidden[:, :position] = self.adapter.embed(self.ids[:position])


class Engine:
    """Layer-wise decoding of one causal LM with optional early-exit heads.

    `Engine(model, heads, cost=None)`;
    `generate(input_ids, strategy, max_new_tokens, eos_token_id, sampling=None, generator=None)`.
    The cache buffers are allocated once and reused, so an engine is meant for one thread at a time.
    """

    def __init__(self, model: nn.Module, heads: nn.Module | None = None, cost: CostModel | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.heads = heads
        self.head_layers: list[int] = list(heads.layers) if heads is not None else []
        if any(not 0 <= layer < self.adapter.num_layers for layer in self.head_layers):
            raise ValueError(
                f"head layers {self.head_layers} outside the model's {self.adapter.num_layers} blocks"
            )
        self.head_index = {layer: k for k, layer in enumerate(self.head_layers)}
        self.head_dtype = next(heads.parameters()).dtype if heads is not None else self.adapter.dtype
        self.cost = cost or CostModel.default(self.adapter.d_model, self.adapter.vocab_size)
        self._cache: JaggedKVCache | None = None

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def _cache_for(self, capacity: int) -> JaggedKVCache:
        a = self.adapter
        if self._cache is None:
            self._cache = JaggedKVCache(
                a.num_layers, a.n_kv_heads, a.head_dim, a.d_model, capacity, a.dtype, a.device
            )
        self._cache.reserve(capacity)
        a.rope_table(self._cache.capacity)
        return self._cache

    def _prompt(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.adapter.device)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(
                    f"the engine decodes one sequence at a time (batch size 1), got {ids.shape[0]}"
                )
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(
                f"input_ids must be a non-empty [seq] or [1, seq] tensor, got shape {tuple(ids.shape)}"
            )
        return ids

    def session(
        self,
        input_ids,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        strategy_name: str = "",
        extra_capacity: int = 0,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
    ) -> DecodeSession:
        """A fresh decoding state on this engine's cache (invalidates any earlier session)."""
        prompt = self._prompt(input_ids)
        return DecodeSession(
            self, prompt, max_new_tokens, eos_token_id, strategy_name, extra_capacity, sampling, generator
        )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int],
        strategy,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
    ) -> GenerationResult:
        """Decode up to `max_new_tokens` tokens after `input_ids` with `strategy` (see `strategies`).

        `sampling=None` decodes greedily; a `Sampling` draws every token instead (the speculative strategies
        with the speculative-sampling rule, so that they stay exact in distribution), with random numbers
        from `generator` (torch's global generator when None): the same generator state gives the same
        tokens for the same strategy, prompt and machine."""
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(
                f"sampling must be a Sampling(temperature, top_k, top_p) or None (greedy), got {sampling!r}"
            )
        strategy.validate(self)
        t0 = time.perf_counter()
        sess = self.session(
            input_ids,
            max_new_tokens,
            eos_token_id,
            strategy.name,
            strategy.extra_capacity,
            sampling,
            generator,
        )
        if not sess.done:
            first = sess.prefill()
            if sess.emit(first, "prefill_tokens"):
                strategy.run(sess, first)
        sess.stats.wall_time_s = time.perf_counter() - t0
        return GenerationResult(sess.out, sess.stats)

    @torch.inference_mode()
    def teacher_force(self, input_ids: torch.Tensor | Sequence[int], strategy) -> TeacherForced:
        """Run an `EarlyExit` strategy over the given tokens instead of its own predictions: position p
        consumes token p whatever was predicted at p - 1 (token-level evaluation). There is no prefill:
        every position, the first included, goes through the strategy's exit policy and KV fill."""
        strategy.validate(self)
        ids = self._prompt(input_ids)
        sess = self.session(ids, max_new_tokens=0, strategy_name=strategy.name)
        sess.cache.reset()
        logits, exits = [], []
        for position, token in enumerate(ids.tolist()):
            result = strategy.advance(sess, position, token)
            sess.count("full_tokens" if result.head is None else "exited")
            logits.append(result.logits)
            exits.append(FULL if result.head is None else result.head)
        return TeacherForced(torch.stack(logits), torch.tensor(exits, dtype=torch.long), sess.stats)

    @torch.inference_mode()
    def oracle_bound(
        self,
        input_ids: torch.Tensor | Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> OracleBound:
        """Greedy generation with every head probed: per token, the earliest head that agrees with the full
        model, and what exiting there would have cost."""
        if self.heads is None:
            raise ValueError("the oracle bound needs early-exit heads")
        sess = self.session(input_ids, max_new_tokens, eos_token_id, "oracle")
        probes: list[list[int]] = []
        if not sess.done:
            token = sess.prefill(probe=probes)
            position = sess.prompt_len
            while sess.emit(token, "full_tokens"):
                token = sess.step(position, token, probe=probes).token
                position += 1
        probes = probes[: len(sess.out)]
        earliest: list[int | None] = []
        for token, row in zip(sess.out, probes, strict=True):
            earliest.append(next((k for k, t in enumerate(row) if t == token), None))
        oracle, cascade = self.cost.oracle_costs(earliest, self.head_layers, self.num_layers)
        return OracleBound(
            tokens=list(sess.out),
            earliest_head=earliest,
            head_layers=list(self.head_layers),
            oracle_cost=oracle,
            cascade_cost=cascade,
            full_cost=self.cost.full_token(self.num_layers),
        )
