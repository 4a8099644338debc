"""The recipe of one training round (CodeLutra's DPO + NLL on a LoRA adapter), in TRL's style.

Every field carries its help text; ``__post_init__`` refuses values that cannot work and says what
to change. The whole config is written into the adapter's manifest, so it describes the recipe,
not where a round runs (``train_adapter`` takes the output directory).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`trainer.train.train_adapter`; defaults: the pilot's recipe."""

    # Method
    method: str = field(
        default="dpo",
        metadata={
            "help": "'dpo': DPO+NLL on the round's execution-verified pairs (trainer.train). "
            "'grpo': outcome-gated GRPO on tasks the sandbox can run (trainer.grpo); the fields "
            "grpo_* below and the shared ones (learning rate, steps, LoRA, precision) apply."
        },
    )

    # Objective
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO temperature: higher keeps the policy closer to the reference."},
    )
    nll_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the NLL term on the chosen completions (CodeLutra's dual loss); "
            "0 gives plain DPO, which on code tends to lower the chosen log-probs too."
        },
    )

    # Optimisation
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: int = field(
        default=10, metadata={"help": "Linear warm-up steps, then linear decay to 0."}
    )
    epochs: float = field(default=2.0, metadata={"help": "Passes over the pairs."})
    max_steps: int = field(
        default=-1,
        metadata={"help": "Stop after this many optimiser steps; -1 runs all `epochs`."},
    )
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Pairs per optimiser step (across all gradient-accumulation micro-batches)."
        },
    )
    gradient_accumulation: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimiser step; each holds batch_size / "
            "gradient_accumulation pairs. Raise it when a step does not fit in memory."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."}
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the LoRA initialisation and the data order (same seed, same adapter)."
        },
    )

    # Data
    max_length: int = field(
        default=2048,
        metadata={
            "help": "Tokens of prompt plus completion: the one budget of a round, the serving "
            "context (KAIZEN_MAX_MODEL_LEN, the server's default). A round fits pairs to it "
            "before selection (trainer.budget: FIM prompts trimmed on both sides, completions "
            "whole); TRL would cut a sequence still longer at the end."
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Pack the sequences of a batch into rows without padding (position ids "
            "restart per sequence). False uses TRL's padded batches."
        },
    )
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "With packing, compute each pair's prompt once and branch both completions "
            "off it (an explicit attention mask; sdpa or eager attention, turned off with a "
            "warning under flash-attention). Same log-probs, fewer tokens."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch pairs of similar length (less padding, fuller packed rows). False "
            "keeps TRL's shuffled order."
        },
    )

    # LoRA
    lora_r: int = field(
        default=16,
        metadata={"help": "LoRA rank; the engine's `max_lora_rank` must be at least this."},
    )
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator (scale alpha / r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get a LoRA: 'all-linear' (every linear layer except the LM "
            "head) or a list of module names such as ['q_proj', 'v_proj']."
        },
    )

    # Precision and memory
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 mixed precision. None: on with a CUDA GPU that supports it, off on "
            "the CPU (fp32 there keeps runs bit-reproducible)."
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass: less memory, ~20% slower."},
    )

    # Logging and checkpoints
    logging_steps: int = field(
        default=1, metadata={"help": "Optimiser steps between two logged metric lines."}
    )
    save_steps: int = field(
        default=25,
        metadata={
            "help": "Optimiser steps between two checkpoints (kept until the round succeeds)."
        },
    )

    # GRPO (method="grpo"): R = format + sealed outcome + 1[outcome] * judge's process score
    grpo_num_generations: int = field(
        default=4,
        metadata={"help": "Completions sampled per task: the group whose rewards are compared."},
    )
    grpo_tasks_per_step: int = field(
        default=2, metadata={"help": "Tasks per optimiser step (each with its group)."}
    )
    grpo_max_completion_length: int = field(
        default=256, metadata={"help": "Tokens per sampled completion; a longer one is cut."}
    )
    grpo_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    grpo_beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient towards the reference (the parent adapter when continuing, "
            "else the base); 0 loads no reference, as TRL's default."
        },
    )
    grpo_gated: bool = field(
        default=True,
        metadata={
            "help": "Gate the judge's process reward on the sealed outcome (Posterior-GRPO). "
            "False gives format + outcome + process, which exists only to show the difference: "
            "a process reward paid without a pass gets hacked."
        },
    )
    grpo_format_weight: float = field(default=1.0, metadata={"help": "Weight of the format term."})
    grpo_outcome_weight: float = field(
        default=1.0, metadata={"help": "Weight of the sealed outcome (the sandbox's pass)."}
    )
    grpo_process_weight: float = field(
        default=1.0, metadata={"help": "Weight of the judge's score (0: outcome-only GRPO)."}
    )
    grpo_judge_model: str = field(
        default="",
        metadata={
            "help": "The judge's model directory (trainer.judge.TransformersJudge); empty: the "
            "round's judge (KAIZEN_JUDGE_MODEL), else the base model, as on a CPU host. On a "
            "GPU host a larger coder judges better."
        },
    )
    grpo_suite: str = field(
        default="mbpp_train",
        metadata={
            "help": "The self-contained tasks trained on (trainer.evaluate.SUITES); the gate's "
            "suites (mbpp_dev, humaneval) must stay held out."
        },
    )
    grpo_max_tasks: int = field(
        default=0, metadata={"help": "Tasks of the suite used, in its order (0: all)."}
    )

    def __post_init__(self) -> None:
        if self.method not in ("dpo", "grpo"):
            raise ValueError(f"method must be 'dpo' or 'grpo', got {self.method!r}.")
        if self.grpo_num_generations < 2:
            raise ValueError(
                f"grpo_num_generations must be at least 2 (a group of one has no advantage), "
                f"got {self.grpo_num_generations}."
            )
        for name in ("grpo_tasks_per_step", "grpo_max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.grpo_max_tasks < 0 or self.grpo_beta < 0 or not self.grpo_temperature > 0:
            raise ValueError("grpo_max_tasks and grpo_beta must be >= 0, grpo_temperature > 0.")
        positive = {
            "beta": self.beta,
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "gradient_accumulation": self.gradient_accumulation,
            "max_length": self.max_length,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}; set {name} > 0.")
        non_negative = {
            "nll_weight": self.nll_weight,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}.")
        if self.batch_size % self.gradient_accumulation:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of gradient_accumulation "
                f"({self.gradient_accumulation}); change one of them."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; use 'all-linear' or list module names.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}.")

    @property
    def micro_batch_size(self) -> int:
        """Pairs per forward/backward pass."""
        return self.batch_size // self.gradient_accumulation
