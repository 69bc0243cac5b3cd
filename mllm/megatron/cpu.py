"""megatron-core on CPU (gloo): the CUDA assumptions of its local layer spec, bypassed for the tests and for CPU runs.

megatron-core 0.16 builds and trains a GPTModel on CPU with `use_cpu_initialization=True` once these hold:
  - RotaryEmbedding.get_emb moves `inv_freq` to torch.cuda.current_device() at the first forward: on CPU it stays;
  - GlobalMemoryBuffer (the attention scores' preallocated buffer) allocates on torch.cuda.current_device(): on CPU
    it allocates on the CPU;
  - tensor_parallel.get_cuda_rng_tracker().fork() needs CUDA RNG states: a no-op tracker (megatron's own inference
    tracker), which is exact only with dropout 0 (the backend's configs use 0);
  - get_default_causal_mask allocates on "cuda" when no mask is passed: the backend always passes one (mllm/megatron/model.py);
  - activation recomputation (tensor_parallel.checkpoint) saves and restores the CUDA RNG state around each recomputed
    block: on CPU there is none to keep (the CPU generator's state is still saved and restored);
  - at PP > 1 with a tied head, a GPTModel's first and last stages sync their copies of the table when built, moving
    it to CUDA first: on CPU the sync is skipped (`_is_in_embd_group` is False), since from_semhitok / load_full_state
    copy the same table into both.
`enable()` applies them once per process and only when CUDA is absent: the GPU path never runs this code.
"""

from __future__ import annotations

import torch

_ENABLED = False


def enable() -> bool:
    """Patch megatron-core for CPU tensors when this process has no CUDA; True when (already) patched."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return _ENABLED
    from megatron.core import utils
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import random

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:  # RotaryEmbedding.get_emb, device kept
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):  # GlobalMemoryBuffer.get_tensor on CPU
        need = 1
        for n in tensor_shape:
            need *= n
        if self.buffer.get((name, dtype)) is None or self.buffer[(name, dtype)].numel() < need:
            self.buffer[(name, dtype)] = torch.empty(need, dtype=dtype, requires_grad=False)
        return self.buffer[(name, dtype)][:need].view(*tensor_shape)

    RotaryEmbedding.get_emb = get_emb
    LanguageModule._is_in_embd_group = lambda self: False
    utils.GlobalMemoryBuffer.get_tensor = get_tensor
    random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    random._get_cuda_rng_state = lambda *args, **kwargs: None
    random._set_cuda_rng_state = lambda *args, **kwargs: None
    _ENABLED = True
    return True
