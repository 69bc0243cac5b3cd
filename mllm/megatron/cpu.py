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
    copy the same table into both;
  - dist_checkpointing's synchronous torch_dist save (the engine's checkpoints): its writers' results come back
    through a plain queue instead of a spawned Manager process (`_dist_checkpointing`); its CUDA calls (a synchronize
    after staging the tensors to the host, a failure flag broadcast as a CUDA tensor) run inside cuda_on_cpu(), below.
    Loading needs nothing (TorchDistLoadShardedStrategy reads into CPU tensors).
`enable()` applies them once per process and only when CUDA is absent: the GPU path never runs this code.

megatron-core's DistributedDataParallel, distributed optimizer and pipeline schedules assume CUDA throughout: buffers
allocated at torch.cuda.current_device() or device="cuda", `.type() == 'torch.cuda.FloatTensor'` checks,
torch.cuda.synchronize() after point-to-point transfers, `.cuda()` copies. `cuda_on_cpu()` runs them on CPU tensors
for the length of a call: a TorchFunctionMode sends every tensor created on "cuda" (or a device index) to the CPU,
answers CUDA's type names for CPU tensors and makes `.cuda()` the identity; torch.cuda.current_device() answers 0 and
torch.cuda.synchronize() does nothing. The engine enters it around those calls only when its device is the CPU.
"""

from __future__ import annotations

import contextlib
import queue

import torch
from torch.overrides import TorchFunctionMode

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
    _dist_checkpointing()
    _ENABLED = True
    return True


def _dist_checkpointing() -> None:
    """dist_checkpointing.save's synchronous torch_dist path (megatron-core 0.16.1) on CPU: its results queue
    in-process. (Its two CUDA calls, a torch.cuda.synchronize() after staging the tensors to the host and the failure
    flag made at torch.cuda.current_device(), are answered by cuda_on_cpu(), inside which the engine saves.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Not a CUDA call, a cost: strategies/filesystem_async.py, _get_write_results_queue hands the writers' results over
    # through the queue of a multiprocessing Manager it starts with "spawn" the first time a process saves: a fresh
    # interpreter that re-imports the main module (~2.5 s per rank here, and a script without a __main__ guard fails).
    # It is there for async saves, whose writer runs in another process; a synchronous save (the only kind the engine
    # makes) puts and takes the results in the calling process, so a queue.Queue serves. Seeded where that function
    # looks first (its module's _results_queue).
    filesystem_async._results_queue = queue.Queue()


class _CudaTensorsOnCpu(TorchFunctionMode):
    """Tensors asked for on CUDA are made on the CPU; CPU tensors answer CUDA's type names; .cuda() is the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and (isinstance(device, int) or torch.device(device).type == "cuda"):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_on_cpu():
    """megatron-core's CUDA-only DDP, distributed optimizer and pipeline schedules on CPU tensors, inside this block
    (module docstring). Only for a process without CUDA."""
    if torch.cuda.is_available():
        raise RuntimeError("cuda_on_cpu() is for CPU-only processes; with CUDA megatron-core runs as it is")
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device, torch.cuda.synchronize = (lambda: 0), (lambda device=None: None)
    try:
        with _CudaTensorsOnCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
