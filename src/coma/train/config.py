"""Training settings shared by both stages (YAML sections ``train:`` and ``lora:``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from coma.train.parallel import STRATEGIES


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 64
    dropout: float = 0.1
    dora: bool = True
    init: str = "gaussian"
    full_finetune: bool = field(
        default=False, metadata={"help": "train the whole language model instead of LoRA"}
    )
    # Only for turning a random model into a small VLM (the demo's stage 0); the paper keeps the ViT frozen.
    train_vision: bool = field(
        default=False, metadata={"help": "with full_finetune, also train the vision tower"}
    )


@dataclass
class TrainSettings:
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    global_batch_size: int = 256
    micro_batch_size: int = 8
    max_steps: int | None = None
    num_epochs: float = 1.0
    seed: int = 42
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    gradient_checkpointing: bool = False
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes per rank that decode images and run the processor ahead of the "
            "model (default: the CPUs shared among this machine's ranks, one left each, at most 8); 0 prepares "
            "each batch in the training process"
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"}
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "language model: auto (flash_attention_2 when installed on GPU, else sdpa; stage 1's "
            "bottleneck: flex_attention on GPU, else sdpa), sdpa, eager, flash_attention_2, flex_attention"
        },
    )
    vision_attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "vision tower: auto (flash_attention_2 when installed on GPU, else packed_sdpa: one SDPA call per "
            "layer for all windows and images), packed_sdpa, sdpa (transformers' per-window loop), eager"
        },
    )
    strategy: str = field(
        default="auto",
        metadata={
            "help": "ddp, fsdp (FSDP2: shard every decoder layer and vision block) or auto (fsdp under an "
            "FSDP accelerate config, else ddp)"
        },
    )
    fsdp_defer_gradient_sync: bool = field(
        default=True,
        metadata={
            "help": "FSDP: keep unsharded gradients over a step's GradCache chunks / micro-batches and "
            "reduce-scatter once, after the last (fastest); false reduce-scatters after every backward, holding "
            "only sharded gradients (less memory under --full, more communication)"
        },
    )
    device: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be positive")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose cosine, linear or constant")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.dtype == "float16":
            raise ValueError(
                "dtype float16 would need loss scaling (a GradScaler through GradCache and FSDP), which coma's "
                "training does not do: small gradients would underflow. Train in bfloat16 or float32 (float16 "
                "is fine for eval and encode)"
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto, float32 or bfloat16")
