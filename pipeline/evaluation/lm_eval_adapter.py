"""An lm-evaluation-harness model that scores with early exit: `EarlyExitLM`, a subclass of lm-eval's `HFLM`.

Loglikelihood requests (multiple choice, LAMBADA-style completion, rolling perplexity) are scored from one full
forward per batch: for every position the logits come from the first enabled head whose confidence passes its
threshold, else from the full model (`ExitPolicy.cascade`, pipeline/exits/policy.py). Because the forward keeps every
hidden state equal to the full model's, this is exactly what an incremental early-exit scorer with exact states
(lazy KV fill) would produce.

Compute: the forward runs the whole model, but the adapter reports what the *exit policy* would cost per scored
position: blocks up to the exit, every enabled head evaluated on the way, and for positions no head takes all L
blocks plus the unembedding (layer-equivalents, docs/design.md §2). KV fill for skipped layers is not included here;
`pipeline.evaluation.token_eval` measures it per fill policy. Statistics are kept per lm-eval task (`exit_stats`).

Generation requests (`generate_until`) go through the decoding engine (`pipeline.engine`): its `early_exit`
strategy (lossy; KV fill policy `fill`) or its `dssd` strategy (identical to the full model's greedy output),
chosen by `generation`. There, the statistics are the engine's own: generated tokens, exits per head (lossy
exits only; DSSD's drafts are verified, not exits) and layer-equivalents including KV fill and verification.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from pipeline.evaluation.token_eval import ExitCounts
from pipeline.exits.cost import FILL_POLICIES, CostModel
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy, head_inputs_of
from pipeline.models.backbone import num_layers_of

log = logging.getLogger(__name__)

GENERATION_STRATEGIES = ("early_exit", "dssd")
_NO_TASK = "_untagged"


class EarlyExitLM(HFLM):
    """lm-eval model scoring with an early-exit policy over `heads` (see the module docstring).

    Built from an already loaded model and tokenizer (no hub access). `policy` is an `ExitPolicy` for the
    heads' layers; None (the default) disables every head: the full model, bit-identical to `HFLM`.
    Change the policy between evaluations with `set_policy` instead of building a new model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        heads: EarlyExitHeads,
        policy: ExitPolicy | None = None,
        cost: CostModel | None = None,
        generation: str = "early_exit",
        fill: str = "lazy",
        max_draft: int = 16,
        progress: bool = True,
        **hflm_kwargs: Any,
    ) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **hflm_kwargs)
        if generation not in GENERATION_STRATEGIES:
            raise ValueError(f"generation={generation!r}; choose one of {GENERATION_STRATEGIES}")
        if fill not in FILL_POLICIES:
            raise ValueError(f"fill={fill!r}; choose one of {FILL_POLICIES}")
        self.heads = heads.to(self.device).eval()
        self.generation = generation
        self.fill = fill
        self.max_draft = max_draft
        self.progress = (
            progress  # False: lm-eval's per-request progress bars stay off (pipeline `progress=false`)
        )
        self._decoder = None  # the decoding engine, built on first generation request
        self.num_layers = num_layers_of(model)
        self.cost = cost or CostModel.for_model(model)
        self.set_policy(policy)
        self.exit_stats: dict[str, ExitCounts] = {}
        self._task = _NO_TASK
        # Exit heads of the rows of the batch `_model_call` scored last, consumed row by row (in batch order)
        # by `_select_cont_toks`, which is where lm-eval says which positions of a row are scored.
        self._batch_exits: torch.Tensor | None = None
        self._batch_row = 0

    # -- policy and statistics --------------------------------------------------------------------------------

    def set_policy(self, policy: ExitPolicy | None) -> None:
        """Switch to another exit policy (None: every head disabled); statistics are reset."""
        layers = list(self.heads.layers)
        policy = ExitPolicy.disabled(layers) if policy is None else policy
        if list(policy.layers) != layers:
            raise ValueError(
                f"the policy's {policy.n_heads} thresholds are for heads at blocks {list(policy.layers)}; "
                f"the heads are at blocks {layers}"
            )
        self.policy = policy
        self._exit_costs = self.cost.exit_costs(policy, self.num_layers)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.exit_stats = {}

    def _counts(self) -> ExitCounts:
        if self._task not in self.exit_stats:
            self.exit_stats[self._task] = ExitCounts(len(self.heads), self.cost.full_token(self.num_layers))
        return self.exit_stats[self._task]

    # -- per-task bookkeeping: lm-eval batches all tasks' requests together; split them by task ------------------

    def _per_task(self, method, requests: list[Instance], disable_tqdm: bool) -> list:
        kwargs = {"disable_tqdm": disable_tqdm or not self.progress}
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.task_name or _NO_TASK].append(i)
        results: list = [None] * len(requests)
        for task, indices in groups.items():
            self._task = task
            try:
                out = method([requests[i] for i in indices], **kwargs)
            finally:
                self._task = _NO_TASK
            for i, value in zip(indices, out, strict=True):
                results[i] = value
        return results

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._per_task(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._per_task(self._generate_until, requests, disable_tqdm)

    # -- scoring ------------------------------------------------------------------------------------------------

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.policy.enabled:
            # The full model, through HFLM's own call: results identical to HFLM's by construction.
            self._batch_exits, self._batch_row = torch.full(inps.shape, -1, dtype=torch.long), 0
            return super()._model_call(inps, attn_mask, labels)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            out = self.model(inps, output_hidden_states=True)
            head_inputs = head_inputs_of(out.hidden_states, self.policy.layers)
            logits, exits = self.policy.cascade(self.heads, head_inputs, out.logits)
        self._batch_exits, self._batch_row = exits.cpu(), 0
        return logits

    def _select_cont_toks(
        self, logits: torch.Tensor, contlen: int | None = None, inplen: int | None = None
    ) -> torch.Tensor:
        # Called once per row of the last `_model_call` batch, in order, with the scored span of that row.
        if self._batch_exits is not None and contlen and inplen:
            row = self._batch_exits[self._batch_row]
            self._counts().add(row[inplen - contlen : inplen], self._exit_costs)
            self._batch_row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    # -- generation --------------------------------------------------------------------------------------------

    def _engine(self):
        if self._decoder is None:
            from pipeline.engine import Engine

            self._decoder = Engine(self.model, self.heads, cost=self.cost)
        return self._decoder

    def _strategy(self):
        from pipeline.engine import DSSD, EarlyExit

        if self.generation == "dssd":
            return DSSD(self.policy, max_draft=self.max_draft)
        return EarlyExit(self.policy, fill=self.fill)

    def _generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation with the engine, one request at a time (the engine decodes batch size 1).

        Prompt truncation, stop sequences and the decoded text follow `HFLM.generate_until`. The engine has no
        stop strings, so it generates up to `max_gen_toks` tokens and the text is cut afterwards; the statistics
        count every generated token.
        """
        engine, strategy = self._engine(), self._strategy()
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="early-exit generation"):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ValueError("early-exit generation is greedy only: set do_sample=False / temperature=0")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
            out = engine.generate(ids, strategy, max_new_tokens=max_gen_toks, eos_token_id=self.eot_token_id)
            self._counts().add_generation(out.stats)
            text = postprocess_generated_text(
                generation=self.tok_decode(out.tokens), stop=until, think_end_token=None
            )
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results
