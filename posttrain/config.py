"""Typed job configs: YAML files validated into one small config per component.

A job file names a `recipe` and an `output_dir`, then one section per component (`model`,
`tokenizer`, `data`, `optim`, `schedule`, `training`, `metrics`, `parallelism`). Each component receives only its
own section. Validation happens in full before anything starts:

* an unknown key fails with its dotted path and the closest valid key;
* a wrong type fails with the path and the expected type;
* cross-field arithmetic (batch sizes that must divide) fails with the numbers.

`load_job(path, overrides)` applies dotted CLI overrides (`training.max_steps=20`) to the raw YAML
before validation, so an override that names a wrong key fails exactly like a wrong key in the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError, model_validator

from posttrain.errors import ConfigError


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated strictly."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchConfig(Section):
    """Architecture of a model trained from scratch (when `model.path` is not set).

    The vocabulary size is not set here: it is the tokenizer's size padded to a multiple of 64.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float | None = None  # None = the family's default (qwen3 1e6, llama3 5e5)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    # MoE families (qwen3_moe) only; None leaves the family default.
    num_experts: int | None = None  # experts per sparse layer
    num_experts_per_tok: int | None = None  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # SwiGLU inner width of one expert
    norm_topk_prob: bool | None = None  # renormalise the top-k routing weights to sum to 1


class LoRAConfig(Section):
    """Low-rank adapters on the named linears; everything else is frozen (see posttrain/models/lora.py)."""

    rank: int  # adapter rank r
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    # unified module names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or the groups
    # attention, mlp, experts
    targets: list[str] = ["attention"]


class ModelConfig(Section):
    """Which model to train: an HF checkpoint directory (`path`) or a fresh one (`arch`)."""

    family: Literal["qwen3", "qwen3_moe", "llama3", "gemma3", "gpt_oss"] = (
        "qwen3"  # for model.arch; model.path reads config.json
    )
    path: str | None = None  # local HF directory (config.json + safetensors)
    arch: ArchConfig | None = None  # from-scratch architecture; exactly one of path / arch
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype; CPU runs use float32
    init_std: float = 0.02  # std of the normal init for from-scratch weights
    # native: our definitions (packing masks, chunked loss, LoRA, verifier); hf: any local
    # AutoModelForCausalLM through transformers (model.arch is built with our init, then handed to
    # transformers; see models/hf_backend.py)
    backend: Literal["native", "hf"] = "native"
    # attention kernel of the native backend: flex (FlexAttention BlockMasks, no dense [T, T] mask; CUDA
    # only for training, torch has no CPU backward), sdpa (a dense block-diagonal mask), auto = flex on
    # CUDA, sdpa on CPU
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    lora: LoRAConfig | None = None  # train low-rank adapters instead of all weights
    # train only the embedding/output rows of tokens added to the tokenizer (semantic IDs, new special
    # tokens); other weights stay frozen (LoRA adapters, when configured, still train)
    train_new_token_rows_only: bool = False
    # check on first load that our definition computes what transformers computes on model.path (short
    # fp64 + fp32 logit check, cached per checkpoint; see models/verify_on_load.py); false skips it
    verify: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.arch is None):
            raise ValueError("set exactly one of model.path (an HF checkpoint) or model.arch (from scratch)")
        if self.backend == "hf" and (self.lora is not None or self.train_new_token_rows_only):
            raise ValueError("model.lora and model.train_new_token_rows_only need model.backend=native")
        return self


class TokenizerConfig(Section):
    """The HF tokenizer directory; `builtin` is the small tokenizer shipped with posttrain."""

    path: str = "builtin"
    extra_special_tokens: list[str] = []  # added as special tokens (never split), e.g. "<|tool|>"
    semantic_id_tokens: int = 0  # add <sid_0> ... <sid_{n-1}> as special tokens (item semantic IDs)


class SourceConfig(Section):
    """One data source: a file, a directory, a glob or an object-store URL, streamed record by record.

    `path` may be a JSONL file (`.jsonl`, `.jsonl.gz`), a Parquet file, a `datasets.save_to_disk`
    directory, a directory or glob of such files, or the same on `s3://` (through fsspec/s3fs).
    """

    path: str
    # chat: {"messages": [...]}; prompt_completion: {"prompt", "completion"}; text: {"text"};
    # tokens: {"input_ids", "labels"?}; preference / rl_prompt / distill: see posttrain/data/schemas.py;
    # events / items: interaction logs and item catalogues, see posttrain/events/data.py
    format: Literal[
        "chat", "prompt_completion", "text", "tokens", "preference", "rl_prompt", "distill", "events", "items"
    ]
    on_error: Literal["raise", "skip"] = "raise"  # skip = drop bad samples, counted in summary.json
    max_samples: int | None = None  # read at most this many records per epoch (None = all)
    name: str | None = None  # label in metrics and the weight schedule; default: the file or folder name
    weight: float = 1.0  # relative sampling weight among data.train sources (ignored for one source)
    epochs: int | None = None  # passes over this source; None = as many as training needs
    # fsspec options for remote paths, e.g. {endpoint_url: ..., key: ..., secret: ...} for s3://
    storage_options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _positive(self) -> SourceConfig:
        if self.weight < 0 or (self.epochs is not None and self.epochs < 1):
            raise ValueError(
                f"weight must be >= 0 and epochs >= 1 (got weight={self.weight}, epochs={self.epochs})"
            )
        return self


class WeightPoint(Section):
    """Source weights from `step` on; between two points the weights move linearly."""

    step: int  # optimizer step
    weights: dict[str, float]  # source name -> weight (sources not named keep their `weight`)


def _one_or_many(value: Any) -> str:
    return "source_list" if isinstance(value, list) else "one_source"


# data.train is one source (a mapping) or several (a list); the tag keeps validation errors readable.
Sources = Annotated[
    Annotated[SourceConfig, Tag("one_source")] | Annotated[list[SourceConfig], Tag("source_list")],
    Discriminator(_one_or_many),
]
UNION_TAGS = ("one_source", "source_list")


class DataConfig(Section):
    """How samples become training rows."""

    train: Sources  # one source, or a list of sources mixed by `weight`
    eval: SourceConfig | None = None
    max_tokens_per_pack: int  # row length in tokens (with packing) and the per-sample cap
    packing: bool = True  # False = one sample per row, padded to the longest in the micro-batch
    pack_open_rows: int = 16  # best-fit packing keeps this many partially filled rows open
    overlong: Literal["truncate", "drop", "split"] = "truncate"  # samples longer than a row
    mask: Literal["all_assistant", "last_assistant"] = "all_assistant"  # chat turns that bear loss
    shuffle: bool = True  # shuffle file order per epoch and records within a window (seeded)
    shuffle_window_samples: int = 1024  # records shuffled together; memory grows with it
    prefetch_rows: int = 64  # rows packed ahead in a background thread (0 = pack in the loop's thread)
    weight_schedule: list[WeightPoint] = []  # weights over steps (empty = each source's `weight`)
    # How data-parallel ranks split the stream. rows: every rank runs the same pipeline and keeps its
    # slice of each step's rows, so batches (and the data state) do not depend on the world size: a run
    # resumes on any number of ranks and matches a single-process run. samples: each rank reads a
    # disjoint share of the records (no duplicated reading/tokenising: for large data), at the cost of
    # batches that depend on the world size and a data state that resumes only on the same world size.
    shard_by: Literal["rows", "samples"] = "rows"

    @property
    def train_sources(self) -> list[SourceConfig]:
        return list(self.train) if isinstance(self.train, list) else [self.train]

    @model_validator(mode="after")
    def _mix(self) -> DataConfig:
        names = [source_name(s) for s in self.train_sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"train: source names must be unique, {dupes} repeat (set `name:`)")
        if not self.train_sources:
            raise ValueError("train: give at least one source")
        if all(s.weight == 0 for s in self.train_sources):
            raise ValueError("train: every source has weight 0")
        for i, point in enumerate(self.weight_schedule):
            unknown = sorted(set(point.weights) - set(names))
            if unknown:
                raise ValueError(f"weight_schedule[{i}]: unknown source {unknown} (sources: {names})")
            if i and point.step <= self.weight_schedule[i - 1].step:
                raise ValueError(f"weight_schedule[{i}]: steps must increase")
        return self


def source_name(source: SourceConfig) -> str:
    """The name a source goes by in metrics: `name`, else its last path component without suffixes."""
    if source.name:
        return source.name
    last = source.path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".arrow"):
        last = last.removesuffix(suffix)
    return last or source.path


class OptimConfig(Section):
    """AdamW. Weight decay applies to matrices only (not norms or biases)."""

    lr: float
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


class ScheduleConfig(Section):
    """Learning-rate schedule over optimizer steps: linear warmup then cosine / WSD / constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr as a fraction of optim.lr (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end


class TrainingConfig(Section):
    """The shared training loop. Batch sizes count rows (packed sequences of max_tokens_per_pack)."""

    global_batch_size: int  # rows per optimizer step, over all devices
    micro_batch_size_per_device: int  # rows per forward/backward on one device
    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / num_epochs
    num_epochs: int | None = None
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None = no clipping)
    max_nonfinite_steps: int = 5  # skip steps with a NaN/inf loss or gradient; abort after this many
    # cross-entropy chunk: logits never exceed [chunk, vocab]; null = auto (~80 MiB of fp32 logits)
    loss_chunk_size_tokens: int | None = None
    eval_every_steps: int = 0  # 0 = evaluate only at the end (when data.eval is set)
    save_every_steps: int = 0  # 0 = no periodic checkpoints
    keep_last_checkpoints: int = 2
    log_every_steps: int = 1
    resume: bool = False  # continue from the latest checkpoint in output_dir
    export_hf: bool = True  # write output_dir/hf at the end
    # dtype of the exported weights (and config.json's `dtype`); auto = the parameters' dtype
    # (model.dtype: fp32 master weights export as fp32, a pure-bf16 run as bf16)
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # where a one-process job computes: auto = the first CUDA device when there is one, else the CPU.
    # Launched workers (--nproc, Ray) take their local rank's GPU under auto/cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if (self.max_steps is None) == (self.num_epochs is None):
            raise ValueError("set exactly one of training.max_steps or training.num_epochs")
        return self


class TensorBoardConfig(Section):
    """TensorBoard event files (written through torch.utils.tensorboard; needs the `tensorboard` package)."""

    log_dir: str | None = None  # None = OUTPUT/tensorboard


class MLflowConfig(Section):
    """An MLflow run per job (needs `mlflow-skinny` + `sqlalchemy` + `alembic`, see the `trackers` extra)."""

    tracking_uri: str | None = None  # None = sqlite:///OUTPUT/mlflow.db (a local database file)
    experiment_name: str = "posttrain"  # created on first use
    run_name: str | None = None  # None = the output directory's name
    # where a newly created experiment stores artifacts; None = OUTPUT/mlflow-artifacts
    artifact_location: str | None = None


class WandbConfig(Section):
    """A Weights & Biases run (needs `wandb`). offline: written under OUTPUT/wandb, `wandb sync` uploads."""

    mode: Literal["offline", "online"] = "offline"
    project: str = "posttrain"
    entity: str | None = None  # team or user; None = the logged-in default (online only)
    run_name: str | None = None  # None = the output directory's name


class MetricsConfig(Section):
    """Where metrics go and how MFU is computed."""

    # peak FLOP/s of one device for MFU; None = measure once with a large matmul (CPU) or use
    # the nominal bf16 dense peak of a known GPU.
    peak_flops_per_s: float | None = None
    progress: Literal["auto", "bar", "plain", "quiet"] = "auto"  # auto = bar on a TTY, lines otherwise
    progress_every_s: float = 10.0  # plain progress: seconds between lines (each task also prints its end)
    # experiment trackers (rank 0 only): OUTPUT/metrics.jsonl is always written; each name listed adds
    # one, configured in its section below and imported only when listed
    trackers: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = ["jsonl"]
    tensorboard: TensorBoardConfig = TensorBoardConfig()
    mlflow: MLflowConfig = MLflowConfig()
    wandb: WandbConfig = WandbConfig()


class ParallelismConfig(Section):
    """How the job spreads over devices: a mesh of (dp_replicate, dp_shard, tp) whose product is the
    world size. FSDP2 shards parameters, gradients and optimizer state over dp_shard (HSDP when
    dp_replicate > 1); tp splits attention heads and MLP columns inside each layer."""

    dp_replicate: int = 1  # data-parallel replicas (each holding a full FSDP group)
    dp_shard: int = -1  # FSDP shard degree; -1 = whatever the world size leaves
    tp: int = 1  # tensor-parallel degree (divides attention and key/value heads)
    # recompute block activations in backward: none, full (every block), selective (every n-th block)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    ac_every_n_layers: int = 2  # selective: checkpoint blocks 0, n, 2n, ...
    compile: bool = False  # torch.compile each block (needs a C++ compiler on CPU)
    # compute dtype of FSDP-gathered parameters; gradients are reduced and kept in fp32
    mixed_precision: Literal["float32", "bfloat16"] = "float32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on CPU


class DPOConfig(Section):
    """Direct preference optimisation (recipe `dpo`), TRL's definitions."""

    beta: float = 0.1  # strength of the implicit KL to the reference (larger = stay closer)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # ipo uses length-averaged log-probabilities
    label_smoothing: float = 0.0  # cDPO: assumed probability that a pair's preference label is flipped
    # reference model: copy = a frozen copy of the starting weights; lora_disabled = the policy itself
    # with its LoRA adapters switched off (no second model in memory; needs model.lora); precomputed =
    # log-probabilities read from reference_logps (no reference model at all)
    reference: Literal["copy", "lora_disabled", "precomputed"] = "copy"
    # reference=precomputed: the JSONL file (or the folder holding reference_logps.jsonl) that
    # `posttrain precompute-reference` wrote for this job's data.train and data.eval
    reference_logps: str | None = None
    # + weight * the chosen answer's per-token negative log-likelihood (RPO / TRL's "sft" term): keeps
    # the chosen answers likely, which plain DPO can push down along with the rejected ones
    sft_weight: float = 0.0

    @model_validator(mode="after")
    def _reference_file(self) -> DPOConfig:
        if self.reference == "precomputed" and self.reference_logps is None:
            raise ValueError(
                "reference=precomputed needs dpo.reference_logps (the file `posttrain precompute-reference` "
                "writes)"
            )
        return self


class RewardConfig(Section):
    """Reward modelling (recipe `rm`): Bradley-Terry loss on a scalar head over preference pairs."""

    head: str = "reward"  # name of the scalar head (exported as the sequence-classification `score`)
    center_rewards_coef: float = 0.0  # TRL's center_rewards_coefficient: pulls mean rewards to 0


class DistillConfig(Section):
    """Knowledge distillation (recipe `distill`) from an online teacher or from teacher top-k
    log-probabilities stored with the data (`posttrain teacher-topk` writes them)."""

    # an HF checkpoint (path) of any supported family; its tokenizer must match. Optional for
    # source=offline_topk (where `posttrain teacher-topk` reads it to write the data)
    teacher: ModelConfig | None = None
    # online: run the teacher in every step; offline_topk: read each record's teacher_topk (its k ids
    # renormalised over themselves, a forward KL to that truncated teacher). null = online when
    # `teacher` is set, else offline_topk
    source: Literal["online", "offline_topk"] | None = None
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # jsd: mixture weight (TRL GKD's beta)
    temperature: float = 1.0  # both distributions are softened by this temperature
    alpha: float = 1.0  # loss = alpha * distillation + (1 - alpha) * next-token cross-entropy

    @property
    def resolved_source(self) -> str:
        return self.source or ("online" if self.teacher is not None else "offline_topk")

    @model_validator(mode="after")
    def _teacher_source(self) -> DistillConfig:
        if self.resolved_source == "online" and self.teacher is None:
            raise ValueError("source=online needs distill.teacher (a model to run in every step)")
        if self.resolved_source == "offline_topk" and self.kind != "forward_kl":
            raise ValueError(
                f"kind={self.kind} needs the teacher's whole distribution (an online distill.teacher); "
                "stored top-k log-probabilities support forward_kl"
            )
        return self


class RLRewardSpec(Section):
    """One reward of `rl.rewards` (posttrain/rl/rewards.py); an episode's reward is the weighted sum."""

    kind: Literal["exact_answer", "format", "function", "model"]
    name: str | None = None  # metric name (reward/<name>); default: kind
    weight: float = 1.0
    function: str | None = None  # kind function: path/to/file.py:function_name
    path: str | None = None  # kind model: an `rm` recipe's hf export directory
    head: str = "reward"  # kind model: its scalar head
    pattern: str | None = None  # kind format: a regex the completion must match (default: one line)


class RLConfig(Section):
    """On-policy RL (recipe `grpo`). `training.max_steps` counts GRPO steps (generate -> score -> update ->
    sync); each makes iterations_per_batch x mini_batches optimizer steps."""

    local: bool = True  # every role in this process; false = Ray worker groups (resource pools below)
    prompts_per_step: int = 8  # prompts per rollout batch
    group_size: int = 4  # completions per prompt (GRPO's group)
    max_new_tokens: int = 32  # per policy turn
    temperature: float = 1.0  # sampling AND the trainer's logprobs (they must match)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_turns: int = 1  # policy turns per episode (multi-turn needs an environment)
    environment: str | None = None  # null (single turn), retry, or path/to/file.py:make_env
    # which tokens may be sampled next, applied before temperature/top-p/top-k AND in the trainer's
    # log-probs: null, semantic_ids (an event model's item-code trie: every sample is a real item;
    # docs/events.md) or path/to/file.py:make_constraint (make(tokenizer) -> TokenConstraint)
    constraint: str | None = None
    rewards: list[RLRewardSpec] = [RLRewardSpec(kind="exact_answer")]
    advantage_scale: Literal["group", "batch", "none"] = "group"  # divide by the group's std (or not)
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"  # DAPO / GRPO / Dr. GRPO
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.28
    kl_coef: float = 0.0  # > 0 runs a reference model; KL(policy || reference) in the loss
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_bias_correction: bool = True  # KL term times the ratio (unbiased off-policy; TRL's default)
    iterations_per_batch: int = 1  # optimisation passes over each rollout batch (PPO epochs)
    mini_batches: int = 1  # optimizer steps per pass
    drop_equal_reward_groups: bool = True  # a group whose rewards are all equal has no signal
    is_cap: float | None = 2.0  # truncated importance sampling of engine vs trainer logprobs (null = off)
    # setup check: abort when max |trainer - engine| logprob on the same sampled tokens exceeds this
    logprob_check_max_abs_diff: float = 0.05
    engine: Literal["local", "vllm"] = "local"  # vllm needs the `vllm` package (GPU machines)
    eval_max_new_tokens: int = 24  # greedy held-out exact match on data.eval (rl_prompt rows)
    # Ray worker groups (rl.local false): processes per role; colocated = rollout/reference/reward
    # share the policy's resource pool (same bundles), separate = each role gets its own bundles
    policy_workers: int = 1
    rollout_workers: int = 1
    placement: Literal["colocated", "separate"] = "separate"
    ray_address: str | None = None  # an existing cluster (ray://... or auto); None = start a local Ray

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs at least 2 completions per prompt")
        if self.constraint is not None and self.environment is not None:
            raise ValueError("constraint with an environment is not supported (the constraint sees one turn)")
        if self.max_turns > 1 and self.environment is None:
            raise ValueError(f"max_turns={self.max_turns} needs an environment (rl.environment)")
        if min(self.prompts_per_step, self.max_new_tokens, self.iterations_per_batch, self.mini_batches) < 1:
            raise ValueError(
                "prompts_per_step, max_new_tokens, iterations_per_batch, mini_batches must be >= 1"
            )
        return self


class EventsConfig(Section):
    """Transformers over interaction events (recipe `events`; docs/events.md): data.train holds event logs
    (format events), items become tokens, heads predict each user's next item and event type. A model
    loaded from model.path brings its own item/event vocabulary (event_vocab.json); the item-token
    fields below then do not apply."""

    catalogue: SourceConfig | None = None  # item features (format items); needed for semantic_ids
    item_tokens: Literal["semantic_ids", "one_per_item"] = "semantic_ids"  # one_per_item: small catalogues
    semantic_id_levels: int = 3  # codes per item (levels of residual k-means)
    semantic_id_codes: int = 32  # clusters per level; adds levels x codes tokens
    kmeans_iters: int = 25  # Lloyd iterations per level
    # next-item predictor: a head over every item (catalogue), semantic-ID codes through the LM head
    # (constrained beam search at evaluation), or both trained together
    objective: Literal["catalogue", "semantic_ids", "both"] = "both"
    event_type_head: bool = True  # an extra head predicting the next event's type
    # mix the catalogue head with a pointer over the user's own history (repeat consumption)
    repeat_head: bool = True
    event_type_loss_weight: float = 0.5  # its cross-entropy's weight in the loss
    # time since the user's previous event, bucketed at these edges (seconds) into gap tokens
    gap_bucket_edges_s: list[float] = [60.0, 600.0, 3600.0, 21600.0, 86400.0, 604800.0]
    heldout_events_per_user: int = 1  # each user's last events are the evaluation targets
    max_history_events: int = 48  # events per training window and per evaluation history
    loss_event_types: list[str] = []  # only events of these types bear loss (empty = all), e.g. [purchase]
    eval_ks: list[int] = [1, 5, 10, 20]  # recall@k and NDCG@k at these k
    beam_size: int = 20  # semantic-ID beam width at evaluation (>= the largest eval k)
    # recipe grpo on event data: each user's last rl_prompts_per_user training events become prompts
    # (the history before each, ending in its gap token); a recommended item is a hit when it is among
    # the items of that event and the next rl_next_events - 1 training events (metadata next_items)
    rl_prompts_per_user: int = 4
    rl_next_events: int = 1

    @model_validator(mode="after")
    def _check(self) -> EventsConfig:
        if min(self.semantic_id_levels, self.max_history_events) < 1 or self.semantic_id_codes < 2:
            raise ValueError("semantic_id_levels and max_history_events must be >= 1, semantic_id_codes >= 2")
        if self.heldout_events_per_user < 0 or not self.eval_ks or min(self.eval_ks) < 1:
            raise ValueError("heldout_events_per_user must be >= 0 and eval_ks positive")
        if self.beam_size < max(self.eval_ks):
            raise ValueError(
                f"beam_size={self.beam_size} must be >= the largest eval k ({max(self.eval_ks)})"
            )
        if min(self.rl_prompts_per_user, self.rl_next_events) < 1:
            raise ValueError("rl_prompts_per_user and rl_next_events must be >= 1")
        return self


class JobConfig(Section):
    """A whole job: which recipe, where it writes, and each component's section."""

    recipe: Literal["pretrain", "sft", "dpo", "rm", "distill", "grpo", "events"]
    output_dir: str
    seed: int = 0
    model: ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig = ScheduleConfig()
    training: TrainingConfig
    metrics: MetricsConfig = MetricsConfig()
    parallelism: ParallelismConfig = ParallelismConfig()
    dpo: DPOConfig = DPOConfig()  # recipe dpo only
    reward: RewardConfig = RewardConfig()  # recipe rm only
    distill: DistillConfig | None = None  # recipe distill only (required there)
    rl: RLConfig = RLConfig()  # recipe grpo only
    events: EventsConfig = EventsConfig()  # recipe events; and grpo when data.train holds events


def gradient_accumulation_steps(training: TrainingConfig, world_size: int = 1) -> int:
    """Micro-batches per optimizer step on each device; the one place this is derived."""
    per_step = training.micro_batch_size_per_device * world_size
    if training.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size={training.global_batch_size} is not divisible by "
            f"micro_batch_size_per_device ({training.micro_batch_size_per_device}) x world size "
            f"({world_size}) = {per_step}"
        )
    return training.global_batch_size // per_step


# ----------------------------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `1e-4`, `true`, `[a, b]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _model_in(ann: Any) -> type[BaseModel] | None:
    """The config section inside an annotation (`X`, `X | None`, `list[X]`, `X | list[X]`)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(loc: tuple, model: type[BaseModel]) -> list[str]:
    """Valid keys of the section an error location points into (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (data.train[1])
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _model_in(field.annotation) or field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in UNION_TAGS))
        )
        path = ".".join(str(p) for p in loc) or "<top level>"
        kind = e["type"]
        if kind == "extra_forbidden":
            valid = _fields_at(loc, JobConfig)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            parent = ".".join(str(p) for p in loc[:-1])
            hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
            lines.append(f"unknown key '{path}'{hint} (valid keys here: {', '.join(valid)})")
        elif kind == "missing":
            lines.append(f"missing required key '{path}'")
        elif kind == "value_error":
            lines.append(f"{path}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"'{path}': {e['msg'].lower()} (got {e.get('input')!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def validate_job(raw: dict[str, Any], source: str = "<dict>") -> JobConfig:
    """Validate a raw dict into a JobConfig, with readable errors that name the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    gradient_accumulation_steps(cfg.training)  # cross-field arithmetic, before anything starts
    if cfg.data.max_tokens_per_pack < 8:
        raise ConfigError(f"data.max_tokens_per_pack={cfg.data.max_tokens_per_pack} is too small (min 8)")
    return cfg


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply dotted overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = apply_overrides(raw, overrides or [])
    return validate_job(raw, source=str(path))


def dump_job(cfg: JobConfig) -> str:
    """The resolved config as YAML (written next to checkpoints and given to trackers)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
