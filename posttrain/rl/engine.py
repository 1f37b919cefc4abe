"""Rollout engines: token ids in, sampled token ids and their log-probs out, behind one protocol.

`LocalEngine` generates on our own model definitions (all five families) with a KV cache
(posttrain/models/kv_cache.py): prompts are prefilled once, in groups of similar length (a prompt's n
samples share its prefill), into one left-padded batch that then decodes one token per step (through the
lean decode step of fast_decode.py where the model allows it; sampling in sampling.py); rows that emit a
stop id stop changing at once and leave the batch in bulk, so they stop costing compute.
`VLLMEngine` (vllm_engine.py) implements the same protocol on vLLM.

The log-prob of a sampled token is taken under softmax(logits / temperature) over the real vocabulary,
BEFORE top-k / top-p truncation (temperature 0 = greedy, plain softmax): exactly what the trainer
recomputes from the same tokens, so the two agree to ~1e-5 in fp32 and the importance-sampling
correction only sees numerical (or engine) mismatch, never a different distribution.

A `TokenConstraint` (optional, `LocalEngine(..., constraint=...)`) says which tokens a sample may emit
next given what it has generated so far (e.g. an event model's semantic-ID trie, posttrain/events/rl.py).
It is applied to the logits FIRST, before temperature, top-k and top-p: the policy then IS the constrained
distribution, softmax(masked logits / temperature) over the allowed tokens, and the log-probs above are
taken under it. The trainer applies the same mask (`rl.constraint`, posttrain/rl/grpo.py), so the two
still agree to ~1e-5 and the loss optimises the distribution that was sampled.

Weights carry a version: `load_weights(state_dict, version)` after every policy update, and `generate(...,
expected_version=v)` refuses stale weights with a `StaleWeightsError` that names both versions.

Shape legend: U unique prompts in a batch, R rows (prompts x samples), B rows still in the batch, L longest
prompt, N max new tokens, D hidden size, V real vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from posttrain.errors import ModelError
from posttrain.models.kv_cache import KVCache
from posttrain.rl.fast_decode import LeanDecodeState, ModelDecodeState, lean_decode_supported
from posttrain.rl.sampling import sample_next
from posttrain.rl.types import Rollout, SamplingParams, TokenConstraint


class StaleWeightsError(RuntimeError):
    """generate() was asked for a weights version the engine does not hold."""


class RolloutEngine(Protocol):
    """What the RL controller needs from a rollout engine (LocalEngine, VLLMEngine)."""

    version: int  # version of the weights held; 0 until the first load_weights

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None: ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        expected_version: int | None = None,
    ) -> list[Rollout]:
        """len(prompts) * n rollouts, prompt-major (prompt 0's n samples, then prompt 1's ...); raises
        StaleWeightsError when expected_version is given and differs from `version`."""
        ...


def check_version(engine: RolloutEngine, expected_version: int | None) -> None:
    if expected_version is not None and expected_version != engine.version:
        raise StaleWeightsError(
            f"{type(engine).__name__} holds weights version {engine.version} but version "
            f"{expected_version} was expected: sync the policy weights (load_weights) before generating"
        )


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Every prompt non-empty with ids in [0, vocab_size); the error names the prompt index."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty (a rollout needs at least one prompt token)")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} has token id {lo if lo < 0 else hi} outside [0, {vocab_size})")


# ------------------------------------------------------------------------------ our engine


def prefill_groups(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of ascending prompt lengths prefilled together: a group grows while its
    longest prompt exceeds its shortest by at most max(8, shortest / 4) tokens (the padding it costs)."""
    groups, start = [], 0
    for i, n in enumerate(lengths):
        if n - lengths[start] > max(8, lengths[start] // 4):
            groups.append((start, i))
            start = i
    return groups + [(start, len(lengths))]


class LocalEngine:
    """KV-cache generation on one of our DecoderLM models (fp32 on CPU; bf16/fp32 on CUDA).

    pad_id fills the left padding (never attended to); num_real_vocab excludes vocabulary padding rows
    from sampling; at most max_batch_size rows (prompts x samples) decode together; `constraint` masks
    the logits of every step before sampling (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        num_real_vocab: int,
        max_batch_size: int = 64,
        constraint: TokenConstraint | None = None,
    ) -> None:
        vocab_rows = model.output_weight().shape[0]
        if not 0 < num_real_vocab <= vocab_rows:
            raise ValueError(f"num_real_vocab={num_real_vocab} must be in 1..{vocab_rows} (the model's rows)")
        if not 0 <= pad_id < vocab_rows:
            raise ValueError(f"pad_id={pad_id} is not a row of the model's vocabulary (0..{vocab_rows - 1})")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.pad_id = pad_id
        self.num_real_vocab = num_real_vocab
        self.max_batch_size = max_batch_size
        self.constraint = constraint
        self.version = 0

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy a state dict of our parameter names into the model in place, then set `version`.

        Accepts what model.state_dict() gives: DTensors (gathered), LoRA adapters when this model has the
        same adapters, or a LoRA-merged state dict (lora.merged_state_dict) into a model with adapters, whose
        adapters are then zeroed (the merged weights already hold them). Everything is checked before any
        tensor is copied, so a bad state dict leaves the engine unchanged.
        """
        own = self.model.state_dict()
        is_lora = lambda name: ".lora_a." in name or ".lora_b." in name  # noqa: E731
        incoming_lora = any(is_lora(k) for k in state_dict)
        if incoming_lora and not any(is_lora(k) for k in own):
            raise ModelError(
                "load_weights: the state dict has LoRA adapter weights but the engine's model has no adapters; "
                "pass lora.merged_state_dict(policy) or build the engine on a model with the same LoRA config"
            )
        zero_adapters = not incoming_lora and any(is_lora(k) for k in own)
        unexpected = sorted(set(state_dict) - set(own))
        missing = sorted(k for k in set(own) - set(state_dict) if not (zero_adapters and is_lora(k)))
        if unexpected or missing:
            raise ModelError(f"load_weights: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        tensors = {}
        for name, tensor in state_dict.items():
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2 DTensor
            if tensor.shape != own[name].shape:
                raise ModelError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, "
                    f"the engine's model expects {tuple(own[name].shape)}"
                )
            tensors[name] = tensor
        for name, tensor in tensors.items():
            if tensor.data_ptr() != own[name].data_ptr():  # an engine sharing the policy's tensors: no-op
                own[name].copy_(tensor)
        if zero_adapters:
            for name in own:
                if ".lora_b." in name:
                    own[name].zero_()
        self.version = version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        expected_version: int | None = None,
    ) -> list[Rollout]:
        """len(prompts) * n rollouts, prompt-major; see RolloutEngine.generate."""
        check_version(self, expected_version)
        check_prompts(prompts, self.num_real_vocab)
        rows = [i for i in range(len(prompts)) for _ in range(params.n)]  # prompt index of each row
        device = self.model.output_weight().device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        rollouts: list[Rollout] = []
        try:
            with torch.inference_mode():
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = rows[start : start + self.max_batch_size]
                    rollouts += self._generate_rows(prompts, chunk, params, generator)
        finally:
            self.model.train(was_training)
        return rollouts

    def _constrain(
        self, logits_BV: torch.Tensor, generated_BS: torch.Tensor, alive_B: torch.Tensor
    ) -> torch.Tensor:
        """Disallowed tokens to -inf for the rows still generating (a stopped row's later tokens are cut
        off anyway, and its prefix, ending in a stop id, need not be one the constraint knows)."""
        live = alive_B.nonzero().squeeze(1)
        allowed = self.constraint.allowed(generated_BS[live].tolist(), logits_BV.shape[-1])
        if tuple(allowed.shape) != (len(live), logits_BV.shape[-1]) or not bool(allowed.any(-1).all()):
            raise ValueError(
                f"{type(self.constraint).__name__}.allowed must return a bool mask [{len(live)}, "
                f"{logits_BV.shape[-1]}] allowing at least one token per row, got shape {tuple(allowed.shape)}"
            )
        mask_BV = torch.ones_like(logits_BV, dtype=torch.bool)
        mask_BV[live] = allowed.to(logits_BV.device)
        return logits_BV.masked_fill(~mask_BV, float("-inf"))

    def _prefill(
        self, prompts: list[Sequence[int]], cache_len: int
    ) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Run prompts sorted by length once. Returns (cache, last hidden state [U, D], prompt lengths [U]).

        Prompts are prefilled in groups of similar length (prefill_groups), each left-padded to its longest
        and right-aligned at the batch's last prompt slot, so decoding continues at one slot for all rows.
        As generate.greedy_generate: padding is doc 0, the prompt doc 1, and positions start at 0 at each
        prompt's first real token, so every prompt is computed as if it were alone."""
        device = self.model.output_weight().device
        lens = [len(p) for p in prompts]
        L = lens[-1]
        cache = KVCache.for_model(self.model, len(prompts), cache_len)
        last_h = []
        for start, end in prefill_groups(lens):
            Lg = lens[end - 1]
            pad_G1 = torch.tensor([Lg - n for n in lens[start:end]], device=device)[:, None]
            ids_GL = torch.tensor(
                [[self.pad_id] * (Lg - len(p)) + list(p) for p in prompts[start:end]], device=device
            )
            cols_GL = torch.arange(Lg, device=device).expand(end - start, Lg)
            pos_GL = (cols_GL - pad_G1).clamp(min=0)
            doc_GL = (cols_GL >= pad_G1).long()
            view = cache.rows_view(slice(start, end), first_slot=L - Lg)
            last_h.append(self.model(ids_GL, pos_GL, doc_GL, kv_cache=view)[:, -1])
        cache.set_length(L)
        return cache, torch.cat(last_h), torch.tensor(lens, device=device)

    def _generate_rows(
        self,
        prompts: Sequence[Sequence[int]],
        rows: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> list[Rollout]:
        """Generate one batch: rows[r] is the prompt index of row r; a prompt's rows are consecutive."""
        uniq = [p for p, _ in itertools.groupby(rows)]
        counts = [len(list(group)) for _, group in itertools.groupby(rows)]
        N = params.max_new_tokens
        by_len = sorted(range(len(uniq)), key=lambda u: len(prompts[uniq[u]]))  # prefill order
        # The last sampled token is never fed back, so a row needs L + N - 1 slots. The lean stepper copies
        # the prefilled slots into its own cache, so the prefill's cache then only holds the prompts.
        L = len(prompts[uniq[by_len[-1]]])
        lean = lean_decode_supported(self.model)
        cache_len = L if lean else L + N - 1
        cache, h_BD, next_pos_B = self._prefill([prompts[uniq[u]] for u in by_len], cache_len)
        device = h_BD.device
        # Back to row order, each prompt fanned out to its n samples after one shared prefill.
        slot_of = {u: i for i, u in enumerate(by_len)}
        order_R = [slot_of[u] for u, count in enumerate(counts) for _ in range(count)]
        if order_R != list(range(len(uniq))):
            index_R = torch.tensor(order_R, device=device)
            cache.select_rows(index_R)
            h_BD, next_pos_B = h_BD[index_R], next_pos_B[index_R]
        decoder = (
            LeanDecodeState(self.model, cache, L + N - 1, max_position=L + N - 1)
            if lean
            else ModelDecodeState(self.model, cache)
        )

        R = len(rows)
        tokens_RN = torch.full((R, N), self.pad_id, dtype=torch.long, device=device)
        logprobs_RN = torch.zeros((R, N), dtype=torch.float32, device=device)
        lengths_R = torch.full((R,), N, dtype=torch.long, device=device)
        stopped_R = torch.zeros(R, dtype=torch.bool, device=device)
        stops = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long, device=device)
        row_B = torch.arange(R, device=device)  # output row of each row in the batch (and the cache)
        alive_B = torch.ones(R, dtype=torch.bool, device=device)  # not stopped yet
        for step in range(N):
            logits_BV = self.model.logits(h_BD)[:, : self.num_real_vocab].float()
            if self.constraint is not None:
                logits_BV = self._constrain(logits_BV, tokens_RN[row_B, :step], alive_B)
            tok_B, lp_B = sample_next(logits_BV, params, generator)
            tokens_RN[row_B, step] = tok_B  # a stopped row's later tokens are cut off by its length
            logprobs_RN[row_B, step] = lp_B
            if stops.numel():
                hit_B = torch.isin(tok_B, stops) & alive_B
                lengths_R[row_B[hit_B]] = step + 1
                stopped_R[row_B[hit_B]] = True
                alive_B &= ~hit_B
                num_alive = int(alive_B.sum())  # the one host sync per step, and only with stop ids
                if num_alive == 0:
                    break
                # Dropping rows copies the cache, so stopped rows leave in bulk, once an eighth of the batch
                # has stopped: at most ~1/8 of the compute goes to stopped rows, and the cache is copied
                # O(log rows) times rather than once per stopped row.
                if len(alive_B) - num_alive >= max(1, len(alive_B) // 8):
                    keep_B = alive_B.nonzero().squeeze(1)
                    decoder.select_rows(keep_B)
                    row_B, alive_B, tok_B, next_pos_B = (
                        row_B[keep_B],
                        alive_B[keep_B],
                        tok_B[keep_B],
                        next_pos_B[keep_B],
                    )
            if step == N - 1:
                break
            h_BD = decoder.step(tok_B, next_pos_B)
            next_pos_B = next_pos_B + 1

        tokens, logprobs = tokens_RN.tolist(), logprobs_RN.tolist()
        lengths, stopped = lengths_R.tolist(), stopped_R.tolist()
        return [
            Rollout(
                prompt_ids=list(prompts[p]),
                token_ids=tokens[r][: lengths[r]],
                logprobs=logprobs[r][: lengths[r]],
                finish_reason="stop" if stopped[r] else "length",
            )
            for r, p in enumerate(rows)
        ]
