"""Configuration of the unified LLM (architecture, saved with the model), of its training job and of its sampling
(mllm/sample.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from semhitok.common.config_io import ConfigError, check_min, check_positive, check_range
from semhitok.common.resources import shipped
from semhitok.data_pipelines.config import TASKS
from semhitok.tokenizer.kinds import PAPER_CFG_SCALE


@dataclass
class MLLMConfig:
    RETIRED: ClassVar[dict[str, str]] = {"qwen2_config": "set base_config (its model_type defaults to qwen2)"}
    # A LLaMA-family (Vicuna) or Qwen2/Qwen2.5 causal LM by HF name or local path (AutoModelForCausalLM), or
    # "random": built from base_config, a config dict naming its model_type (llama, qwen2; default qwen2).
    base_model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    base_config: dict | None = None
    # Text tokenizer by HF name or local path; empty: base_model's; "tiny": a BPE trained on data/sample.
    text_tokenizer: str = ""
    # The folder whose text (captions.jsonl, text.jsonl, llava.json: data/sample's layout) trains `tiny`.
    text_corpus: str = "data/sample"
    # Attention kernel: auto = flash_attention_2 (varlen over the packed documents) when flash-attn and CUDA
    # are present, else sdpa; or any transformers attn_implementation (sdpa, flex_attention, eager).
    attn_implementation: str = "auto"
    adapter_hidden: int = 0  # width of the dual-MLP adapter's hidden layer; 0: the LLM's hidden size
    # Inputs of a visual token: both = concat(semantic MLP, pixel MLP) (SemHiTok's dual adapter, the ICLR
    # version's); semantic = the semantic MLP alone, [d] (the paper's semantic-only comparison, understanding only);
    # concat = one MLP on the concatenated semantic and pixel code vectors (the arXiv text: "quantized semantic and
    # texture features are spliced as input to LLM ... after a simple MLP layer").
    adapter_inputs: Literal["both", "semantic", "concat"] = "both"
    # Depth heads (mllm/depth_head.py), built when the tokenizer has L > 1 codes per position (DualToken): layers
    # per code group's depth transformer (the paper's 3), its width (0: the LLM's hidden size), attention heads
    # (0: width // 64).
    depth_layers: int = 3
    depth_width: int = 0
    depth_heads: int = 0

    def __post_init__(self) -> None:
        check_min(self, 0, "adapter_hidden", "depth_width", "depth_heads")
        check_min(self, 1, "depth_layers")


@dataclass
class MLLMTrainConfig:
    # Start from this directory (a previous stage's export); empty: build from base_model + the tokenizer.
    init_from: str = ""
    tokenizer: str = ""  # visual tokenizer directory (any kind); empty: the run's (SemHiTok: <run_dir>/tokenizer/stage2/final)
    # adapter: only the dual-MLP adapter and the visual rows of the head train (alignment pretraining; the
    # transformer and every text row stay fixed); full: everything.
    trainable: Literal["adapter", "full"] = "full"
    deepspeed_config: str = "configs/deepspeed/zero3.json"  # "none": plain PyTorch (single process)
    # deepspeed: ZeRO (deepspeed_config); megatron: the base as megatron-core's GPTModel with tensor and pipeline
    # parallelism, megatron's DDP and distributed optimizer (mllm/megatron/, docs/megatron.md; needs the `megatron`
    # extra). TP x PP must divide the ranks; DP is the rest.
    backend: Literal["deepspeed", "megatron"] = "deepspeed"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1  # megatron backend: stages of the base's layers, megatron's 1F1B schedule over a window
    max_steps: int = 10_000
    lr: float = 2e-5
    adapter_lr: float = 1e-4  # the adapter, the visual head rows and the depth heads (L > 1: visual_head)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_accumulation: int = 1
    # Loss weight per task ({"understanding": 10}; a task not named: 1). The loss is the weighted mean over
    # supervised tokens, so by default a task counts by its tokens: a one-word answer is 2 tokens beside an
    # image's 64+, and where answers are that short understanding gets a few percent of the gradient.
    task_loss_weights: dict[str, float] = field(default_factory=dict)
    # Recompute activations of every n-th decoder layer in backward (1: all layers, 0: off); larger n buys
    # speed with the memory the chunked loss frees.
    activation_checkpointing: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    fused_kernels: bool = True  # Liger-Kernel RMSNorm/RoPE/SwiGLU when installed and on CUDA
    # Tokens per chunk of the chunked cross-entropy; 0: the most that fit loss_memory_gb of chunk transients,
    # 6 bytes per logit in bf16 (6.43 measured, mllm/loss.py): 2 GiB -> 1,026 tokens at 348,544 rows.
    loss_chunk: int = 0
    loss_memory_gb: float = 2.0
    log_every: int = 10
    # Every eval_every steps (0: never; also at the last step) the conditioning gaps (mllm/gaps.py) on
    # eval_data's held-out {"image", "caption"} pairs (its first eval_limit, 0: all) go to metrics.jsonl.
    eval_every: int = 500
    eval_data: str = field(default_factory=lambda: shipped("data/sample/holdout.jsonl"))
    eval_limit: int = 64
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    log_backends: list[str] | None = None  # default: jsonl + tensorboard

    def __post_init__(self) -> None:
        check_min(self, 1, "tensor_parallel", "pipeline_parallel")
        check_min(self, 1, "max_steps", "gradient_accumulation", "log_every", "ckpt_every", "keep_checkpoints")
        check_min(self, 0, "loss_chunk")  # 0: from loss_memory_gb
        check_positive(self, "lr", "adapter_lr", "loss_memory_gb")
        check_range(self, 0, 1, "min_lr_ratio")
        check_min(self, 0, "warmup_steps", "weight_decay", "grad_clip", "activation_checkpointing", "seed")  # grad_clip 0: off
        check_min(self, 0, "eval_every", "eval_limit")
        for task, weight in self.task_loss_weights.items():
            if task not in TASKS:
                raise ConfigError(f"task_loss_weights: unknown task {task!r} (one of {list(TASKS)})")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < float("inf"):
                raise ConfigError(f"task_loss_weights.{task}: must be a number >= 0, got {weight!r}")


MAX_CFG_SCALE = 100.0
MAX_SAMPLES_PER_PROMPT = 10_000  # sample_images' per_prompt (and `semhitok sample --samples-per-prompt`)


@dataclass
class SamplingConfig:
    # 1: no guidance; 0 to MAX_CFG_SCALE (0: unconditional). Default: SemHiTok's paper's (2); for a model or config
    # of another tokenizer kind, its paper's (kind_sampling, PAPER_CFG_SCALE: DualToken 3, TokLIP 2.5).
    cfg_scale: float = PAPER_CFG_SCALE["semhitok"]
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self) -> None:  # at config load, at the CLI and at every API call that builds one
        check_range(self, 0, MAX_CFG_SCALE, "cfg_scale")  # beyond it the mixed logits overflow into a degenerate image
        check_min(self, 0, "temperature", "top_k")
        check_range(self, 0, 1, "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"top_k and seed must be integers, got {self.top_k!r} and {self.seed!r}")
