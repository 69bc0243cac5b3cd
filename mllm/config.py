"""Configuration of the unified LLM (architecture, saved with the model) and of its training job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class MLLMConfig:
    # Qwen2.5 by HF name or local path, or "random": a Qwen2ForCausalLM built from qwen2_config (tiny preset).
    base_model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    qwen2_config: dict | None = None
    # Text tokenizer by HF name or local path; empty: base_model's; "tiny": a BPE trained on data/sample.
    text_tokenizer: str = ""
    # Attention kernel: auto = flash_attention_2 (varlen over the packed documents) when flash-attn and CUDA
    # are present, else sdpa; or any transformers attn_implementation (sdpa, flex_attention, eager).
    attn_implementation: str = "auto"
    adapter_hidden: int = 0  # width of the dual-MLP adapter's hidden layer; 0: the LLM's hidden size


@dataclass
class MLLMTrainConfig:
    # Start from this directory (a previous stage's export); empty: build from base_model + the tokenizer.
    init_from: str = ""
    tokenizer: str = ""  # SemHiTok directory; empty: <run_dir>/tokenizer/stage2/final
    # adapter: only the dual-MLP adapter and the visual rows of the head train (alignment pretraining; the
    # transformer and every text row stay fixed); full: everything.
    trainable: Literal["adapter", "full"] = "full"
    deepspeed_config: str = "configs/deepspeed/zero3.json"  # "none": plain PyTorch (single process)
    max_steps: int = 10_000
    lr: float = 2e-5
    adapter_lr: float = 1e-4  # the adapter and the visual head rows
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_accumulation: int = 1
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
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    log_backends: list[str] | None = None  # default: jsonl + tensorboard
