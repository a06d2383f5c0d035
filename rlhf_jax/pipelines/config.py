"""The configuration blocks every stage composes: each fact stated once, one name per concept.

A stage config is a frozen, keyword-only dataclass nested by concern:

==============  ==================  =========================================================
field           block               holds
==============  ==================  =========================================================
``model`` ...   ``ModelSpec``       where a model comes from (checkpoint directory or preset)
``data``        ``DataConfig``      files, batch size, lengths, overflow and invalid-row policy
``sampling``    ``GenerationConfig`` completion length, temperature, top-k / top-p
``kl``          ``KLConfig``        the KL leash to the reference (on-policy stages)
``rewards``     ``RewardConfig``    reward model, reward functions, weights, EOS penalty
``algorithm``   per stage           the algorithm's own hyperparameters
``optimizer``   ``OptimizerConfig`` AdamW and its learning-rate schedule
``loop``        ``LoopConfig``      run length (the schedule's too), log / eval / save cadence
``logging``     ``LoggingConfig``   progress bar, console, TensorBoard, W&B, trackio, MLflow
``mesh``        ``MeshConfig``      devices per data / fsdp / tensor axis
==============  ==================  =========================================================

``SupervisedConfig`` (SFT, reward model, DPO, distillation) and ``OnPolicyConfig`` (PPO, the
GRPO family) are the two bases; each stage adds its models and its ``algorithm`` block. Every
check runs in ``__post_init__``, before anything is written or compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rlhf_jax.data import ON_OVERFLOW
from rlhf_jax.models import LoraConfig
from rlhf_jax.ops import KL_CONTROLLERS, KL_ESTIMATORS
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.rewards import NON_FINITE
from rlhf_jax.train import LoggingConfig, LoopConfig, OptimizerConfig, check_schedule

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a model comes from: a Hugging Face directory, or a preset initialised fresh."""

    path: str | None = None
    """A checkpoint directory (``config.json`` + safetensors), e.g. an earlier stage's
    ``runs/<name>/model``. Takes precedence over ``preset``."""
    preset: str = "toy-1m"
    """A ``models.PRESETS`` name, used when ``path`` is None (``vocab_size`` follows the
    tokenizer)."""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``ModelConfig`` fields replacing the preset's (e.g. ``{"num_layers": 2}``)."""
    dtype: str | None = None
    """Parameter and compute dtype override (``float32``, ``bfloat16``). A frozen reference in
    ``bfloat16`` halves its memory; its log-probs are still float32."""
    remat: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less
    memory, about a third more compute); for a model the stage trains."""
    lora: LoraConfig | None = None
    """Train a LoRA adapter (plus any new head) on the frozen base instead of every weight;
    the base with the adapter off is then the reference (``models.lora``). None: full weights.
    Only for a model the stage trains (or, in best-of-N, samples from)."""
    adapter: str | None = None
    """A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) to
    start from; its rank, alpha, targets and scaling replace ``lora``'s."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The stage's data: files in TRL's formats, examples per step, lengths and the bad-row
    policy. Defaults suit a real chat checkpoint; rows are padded only to the data's own
    longest (``pipelines.datasets.padded_length``), so short data stays cheap."""

    train: str
    """Training data: a JSONL or Parquet file or a ``save_to_disk`` directory in a TRL format
    (text, messages, prompt, prompt/completion, preference, unpaired preference; strings or
    conversations)."""
    eval: str | None = None
    """Held-out data in the same format (None: no evaluation)."""
    batch_size: int = 8
    """Examples per optimizer step: rows, pairs or prompts (RL samples ``group_size`` each)."""
    max_prompt_length: int = 512
    """Longest prompt in tokens, chat template included (preference and prompt data)."""
    max_length: int = 1024
    """Longest training row, prompt + response (SFT, reward model, DPO, distillation)."""
    packing: bool = False
    """Pack whole examples first-fit into rows of ``max_length`` (SFT, distillation)."""
    on_overflow: str = "error"
    """A row over its limit: ``error`` (names file and line), ``truncate`` (supervised stages;
    counted and reported) or ``skip`` (counted and reported)."""
    skip_invalid: bool = False
    """Skip (and count) malformed rows instead of stopping at the first."""
    chat_template: str | None = None
    """A Jinja chat-template file replacing the tokenizer's (None: the tokenizer's own)."""

    def __post_init__(self):
        if self.on_overflow not in ON_OVERFLOW:
            raise ValueError(f"data.on_overflow must be one of {ON_OVERFLOW}, got "
                             f"{self.on_overflow!r}")
        for name in ("batch_size", "max_prompt_length", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How completions are sampled (training rollouts; evaluation samples greedily or not as
    each stage says)."""

    max_new_tokens: int = 256
    """Completion length budget; a completion without EOS by then is truncated (counted)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = None
    """Sample from the k most likely tokens only (None: no limit)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set reaching probability top_p (None: off)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLConfig:
    """The KL leash to the frozen reference policy."""

    coef: float = 0.0
    """Initial coefficient beta (0: no reference model is loaded or scored)."""
    mode: str = "loss"
    """``reward``: ``-beta * k1`` in the per-token reward (PPO); ``loss``: ``beta * estimator``
    added to the loss per token."""
    estimator: str = "k3"
    """KL estimator in the loss: a key of ``ops.KL_ESTIMATORS`` (k1, k2, k3)."""
    controller: str = "fixed"
    """``fixed`` or ``adaptive`` (Ziegler et al. 2019: beta follows ``target``)."""
    target: float = 6.0
    """Adaptive controller: the per-sequence KL it steers towards."""
    horizon: float = 10000.0
    """Adaptive controller: samples over which beta adapts."""

    def __post_init__(self):
        if self.mode not in ("reward", "loss"):
            raise ValueError(f"kl.mode must be 'reward' or 'loss', got {self.mode!r}")
        if self.estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl.estimator must be one of {sorted(KL_ESTIMATORS)}, got "
                             f"{self.estimator!r}")
        if self.controller not in KL_CONTROLLERS:
            raise ValueError(f"kl.controller must be one of {sorted(KL_CONTROLLERS)}, got "
                             f"{self.controller!r}")
        if self.coef < 0:
            raise ValueError(f"kl.coef must be >= 0, got {self.coef}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """What a completion's scalar reward is: ``sum_f w_f f(...) + model_weight * RM(...)
    - missing_eos_penalty * [no EOS]``."""

    model: ModelSpec | None = None
    """Reward model (a scalar-head checkpoint, e.g. the reward-model stage's ``model/``)."""
    model_weight: float = 1.0
    """Weight of the reward model's score in the sum."""
    functions: tuple[str, ...] = ()
    """Reward functions by name: a key of ``rewards.REWARD_FUNCTIONS`` or ``module:function``
    (TRL signature ``fn(prompts, completions, **columns)``); ``run`` also takes callables."""
    weights: tuple[float, ...] = ()
    """Weights of ``functions``, in order (empty: 1 each)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of completions that end without an EOS."""
    non_finite: str = "error"
    """A reward function's NaN / inf, or a completion no function applies to (all None):
    ``error`` (stop, naming the function) or ``drop`` (leave the completion and its group out
    of the loss; counted as ``rewards_dropped_frac``)."""
    time_limit: float | None = 10.0
    """Seconds per reward-function call; a call over it scores its batch 0 (counted as
    ``reward_timeouts``). None: no limit."""

    def __post_init__(self):
        if self.non_finite not in NON_FINITE:
            raise ValueError(f"rewards.non_finite must be one of {NON_FINITE}, got "
                             f"{self.non_finite!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"rewards.time_limit must be > 0 seconds or None, got "
                             f"{self.time_limit}")
        if self.weights and len(self.weights) != len(self.functions):
            raise ValueError(f"rewards.weights has {len(self.weights)} entries for "
                             f"{len(self.functions)} rewards.functions")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverlapConfig:
    """Overlap of generation and training (``train.overlap``): where the rollout runs and how
    stale its params may be."""

    max_staleness: int = 0
    """0: on-policy (sample, then update). 1: one-step-off: step t+1's batch is sampled with
    step t's params while update t runs, corrected by truncated importance weights."""
    is_cap: float = 2.0
    """With max_staleness=1: C in the per-token weight min(pi_theta_t / pi_behaviour, C)."""
    rollout_devices: int = 0
    """Devices (the last ones) that only sample, on a mesh of their own; training uses the
    others. 0: the rollout runs on the training mesh."""

    def __post_init__(self):
        if self.max_staleness not in (0, 1):
            raise ValueError(f"overlap.max_staleness must be 0 (on-policy) or 1 (one-step-off), "
                             f"got {self.max_staleness}")
        if not self.is_cap >= 1.0:
            raise ValueError(f"overlap.is_cap must be >= 1 (a cap below 1 shrinks every "
                             f"token's weight), got {self.is_cap}")
        if self.rollout_devices < 0:
            raise ValueError(f"overlap.rollout_devices must be >= 0, got "
                             f"{self.rollout_devices}")


def refuse_packing(data: DataConfig) -> None:
    """Preference pairs are never packed (each side is its own row)."""
    if data.packing:
        raise ValueError("data.packing is for SFT and distillation; preference pairs are never "
                         "packed")


def _check_batch(cfg, divisor: int, what: str) -> None:
    if cfg.data.batch_size % divisor:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by {what} "
                         f"{divisor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupervisedConfig:
    """What the supervised stages (SFT, reward model, DPO, distillation) share."""

    data: DataConfig
    """Training and evaluation data."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model checkpoint's own, e.g. the policy's path)."""
    output_dir: str
    """Run directory: config, metrics, checkpoints, the exported model."""
    micro_batches: int = 1
    """Gradient accumulation: each step's batch runs in this many slices (same update)."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""
    loop: LoopConfig = LoopConfig(total_steps=200, log_every=10, save_every=100)
    """Run length and the log / eval / save cadence."""
    logging: LoggingConfig = LoggingConfig()
    """Metric sinks: progress bar, console, TensorBoard, W&B, trackio, MLflow."""
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (default: every device data-parallel);
    None runs on one device. Not part of the run's identity: a run resumes on another mesh."""
    seed: int = 0
    """Seed of the initialisation, the data order and every sample."""

    def __post_init__(self):
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        _check_batch(self, self.micro_batches, "micro_batches")
        check_schedule(self.optimizer, self.loop.total_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnPolicyConfig:
    """What the on-policy stages (PPO, the GRPO family) share."""

    data: DataConfig
    """Prompt JSONL (``prompt`` plus extra columns for reward functions); ``batch_size`` is
    prompts per step."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model checkpoint's own, e.g. the policy's path)."""
    policy: ModelSpec
    """The policy to train (usually the SFT model's directory)."""
    output_dir: str
    """Run directory: config, metrics, checkpoints, the exported policy."""
    reference: ModelSpec | None = None
    """Frozen reference policy for the KL (default: the initial policy)."""
    rewards: RewardConfig = RewardConfig()
    """Reward model, reward functions and their weights."""
    sampling: GenerationConfig = GenerationConfig()
    """Rollout sampling."""
    kl: KLConfig = KLConfig()
    """The KL leash to the reference."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6, schedule="constant")
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""
    loop: LoopConfig = LoopConfig(total_steps=100, log_every=5, eval_every=25, save_every=50)
    """Run length (iterations) and the log / eval / save cadence."""
    logging: LoggingConfig = LoggingConfig()
    """Metric sinks: progress bar, console, TensorBoard, W&B, trackio, MLflow."""
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (default: every device data-parallel);
    None runs on one device. Not part of the run's identity: a run resumes on another mesh."""
    overlap: OverlapConfig = OverlapConfig()
    """One-step-off rollouts and a rollout sub-mesh (default: neither)."""
    seed: int = 0
    """Seed of the initialisation, the prompt order and every sample."""

    def __post_init__(self):
        if self.overlap.rollout_devices and self.mesh is None:
            raise ValueError("overlap.rollout_devices needs a mesh (mesh=None runs on one "
                             "device)")
        if self.data.on_overflow == "truncate":
            raise ValueError("data.on_overflow='truncate' would cut prompts; use 'error' or "
                             "'skip' for prompt data")
        check_schedule(self.optimizer, self.loop.total_steps)
