"""The Megatron-Core backend (mllm/megatron/) against transformers on CPU (gloo): weight conversion both ways, and
the converted model's logits, losses and adapter gradients equal to SemHiTokLM's (fp32)."""

import pytest
import torch

from semhitok.mllm.megatron.convert import head_dim, hf_to_megatron, megatron_to_hf, padded_vocab
from semhitok.mllm.megatron.model import MegatronLM, document_mask, from_semhitok
from tests.conftest import Payload
from tests.mllm.megatron_common import QWEN25_05B, TINY_LLAMA, TINY_QWEN2, TINYLLAMA_11B, init_megatron, packed_batch, tiny_semhitok


@pytest.fixture(scope="module")
def one_rank():
    from megatron.core import parallel_state

    created = init_megatron(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        torch.distributed.destroy_process_group()


def test_padded_vocabulary_is_a_multiple_of_128_per_tensor_rank():
    assert [padded_vocab(300, tp) for tp in (1, 2, 8)] == [384, 512, 1024]
    assert padded_vocab(151_936 + 196_608, 8) == 349_184 and padded_vocab(256, 2) == 256


def test_document_mask_is_causal_within_each_packed_document():
    mask = document_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0, 0]  # True = masked
    sees = (~mask).int().tolist()
    assert sees == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("base", [TINY_QWEN2, TINY_LLAMA, TINYLLAMA_11B], ids=["qwen2_tied", "llama_untied", "tinyllama_1layer"])
def test_conversion_round_trips_exactly(base):
    model = tiny_semhitok(base)
    state = dict(model.lm.state_dict())
    tied = base["tie_word_embeddings"]
    if tied:
        state.pop("lm_head.weight")
    rows = padded_vocab(model.layout.vocab_size, 2)
    mg = hf_to_megatron(state, model.lm.config, rows)
    assert mg["embedding.word_embeddings.weight"].shape[0] == rows and ("output_layer.weight" in mg) != tied
    layer = mg["decoder.layers.0.self_attention.linear_qkv.weight"]
    heads, groups, c = base["num_attention_heads"], base["num_key_value_heads"], head_dim(model.lm.config)
    assert layer.shape == ((heads + 2 * groups) * c, base["hidden_size"])
    # group 0's rows: its query heads, then k head 0, then v head 0
    q = state["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(layer[: heads // groups * c], q[: heads // groups * c], rtol=0, atol=0)
    torch.testing.assert_close(layer[heads // groups * c : (heads // groups + 1) * c], state["model.layers.0.self_attn.k_proj.weight"][:c], rtol=0, atol=0)
    back = megatron_to_hf(mg, model.lm.config, model.layout.vocab_size, state["model.embed_tokens.weight"].shape[0])
    assert (back["lm_head.weight"] is back["model.embed_tokens.weight"]) == tied
    if tied:
        back.pop("lm_head.weight")
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("base", [TINY_QWEN2, TINY_LLAMA, QWEN25_05B], ids=["qwen2_tied", "llama_untied", "qwen2.5_0.5b_1layer"])
def test_converted_model_gives_transformers_logits_losses_and_adapter_gradients(one_rank, base):
    model = tiny_semhitok(base)
    batch = packed_batch(model.layout)
    assert (batch["input_ids"] >= model.layout.visual_offset).sum() >= 8  # visual ids reach the adapter
    with torch.no_grad():
        ref = model.logits(model.hidden_states(batch["input_ids"], batch["position_ids"]).last_hidden_state)  # [B, T, V]
    mg = from_semhitok(model)
    assert isinstance(mg, MegatronLM) and mg.adapter is model.adapter
    with torch.no_grad():
        logits = mg(batch["input_ids"], batch["position_ids"])  # [B, T, V_pad]
    assert logits.shape[-1] == padded_vocab(model.layout.vocab_size, 1)
    torch.testing.assert_close(logits[..., : model.layout.vocab_size], ref, rtol=0, atol=1e-4)
    assert logits[..., model.layout.vocab_size :].abs().max() == 0  # padded rows: zero weights

    model.zero_grad()
    ref_loss = model(**batch)["loss"]
    ref_loss.backward()
    ref_grad = model.adapter.sem_mlp[0].weight.grad.clone()
    model.zero_grad()
    losses = mg(**batch)  # [B, T], 0 where the next token has no label
    supervised = (batch["labels"][:, 1:] != -100).sum()
    loss = losses.sum() / supervised
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    loss.backward()
    torch.testing.assert_close(model.adapter.sem_mlp[0].weight.grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_backend_and_parallel_sizes_are_checked():
    from semhitok.common.config_io import ConfigError
    from semhitok.config import load_project_config

    cfg = load_project_config("tiny", ["mllm_train.backend=megatron", "mllm_train.tensor_parallel=2"])
    assert (cfg.mllm_train.backend, cfg.mllm_train.tensor_parallel, cfg.mllm_train.pipeline_parallel) == ("megatron", 2, 1)
    assert load_project_config("tiny", []).mllm_train.backend == "deepspeed"
    with pytest.raises(ConfigError, match="tensor_parallel"):
        load_project_config("tiny", ["mllm_train.tensor_parallel=0"])
    with pytest.raises(ConfigError, match="backend"):
        load_project_config("tiny", ["mllm_train.backend=fsdp"])


def test_tensor_parallel_must_divide_the_key_value_heads():
    from transformers import AutoConfig

    from semhitok.mllm.megatron.convert import transformer_config

    qwen15 = AutoConfig.for_model("qwen2", hidden_size=96, num_attention_heads=12, num_key_value_heads=2, intermediate_size=96)
    assert transformer_config(qwen15, tp=2).tensor_model_parallel_size == 2
    with pytest.raises(ValueError, match="tensor_parallel 4 must divide the base's 2 key/value heads"):
        transformer_config(qwen15, tp=4)


def test_semhitok_train_hands_the_megatron_backend_to_its_loop(monkeypatch, tmp_path):
    """train_mllm (semhitok train, the pipeline) runs mllm/megatron/train.py's loop when backend=megatron."""
    from semhitok.config import load_project_config
    from semhitok.mllm import train
    from semhitok.mllm.megatron import train as megatron_train

    seen = []
    monkeypatch.setattr(megatron_train, "train_megatron", lambda cfg: seen.append(cfg) or tmp_path / "final")
    cfg = load_project_config("tiny", [f"run_dir={tmp_path}", "mllm_train.backend=megatron"])
    assert train.train_mllm(cfg) == tmp_path / "final" and seen == [cfg]


def test_recomputed_layers_give_the_same_loss_and_gradients(one_rank, monkeypatch):
    """mllm_train.activation_checkpointing as megatron's recompute (convert.recompute): every layer and every 2nd
    layer recompute their blocks in backward (counted at tensor_parallel.checkpoint) and change no loss or gradient."""
    from megatron.core import tensor_parallel

    from semhitok.mllm.megatron.convert import recompute

    calls = []
    checkpoint = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda *args: calls.append(1) or checkpoint(*args))
    model = tiny_semhitok(TINY_QWEN2)
    batch = packed_batch(model.layout, seed=3)
    results = {}
    for every in (0, 1, 2):
        calls.clear()
        mg = from_semhitok(model, **recompute(every, TINY_QWEN2["num_hidden_layers"]))
        loss = mg(batch["input_ids"], batch["position_ids"], batch["labels"]).sum()
        loss.backward()
        results[every] = (loss.detach(), {n: p.grad for n, p in mg.named_parameters() if p.grad is not None}, len(calls))
    ref_loss, ref_grads, none = results[0]
    assert none == 0 and results[1][2] == 2 and results[2][2] == 1  # 2 layers: each one, then the first alone
    for every in (1, 2):
        loss, grads, _ = results[every]
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7)
    # under the engine's bf16 autocast (CPU's here, CUDA's on a GPU): the recomputed blocks compute in bf16 too
    grads = {}
    for every in (0, 1):
        engine = tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2), **recompute(every, TINY_QWEN2["num_hidden_layers"])),
                             lr=0.0, bf16=True)  # (a SemHiTokLM each: an engine owns its adapter's weights)
        engine.train_window([batch])  # (learning rate 0: the gradients stay in DDP's buffers, the weights as they were)
        grads[every] = {n: p.main_grad.clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-2, atol=1e-4)
    shared = tiny_semhitok(TINY_QWEN2)
    tiny_engine(from_semhitok(shared))
    with pytest.raises(ValueError, match="already belong to another engine"):  # the adapter is `shared`'s, an engine's
        tiny_engine(from_semhitok(shared))


def tiny_engine(mg: MegatronLM, lr: float = 1e-3, bf16: bool = False):
    """MegatronEngine over `mg` on the CPU: AdamW at lr (3 x lr for the adapter), weight decay 0.01, clipping at 1,
    the learning rate divided by step + 1."""
    from semhitok.mllm.megatron.engine import MegatronEngine

    return MegatronEngine(mg, lr=lr, adapter_lr=3 * lr, weight_decay=0.01, lr_lambda=lambda step: 1 / (step + 1), grad_clip=1.0,
                          bf16=bf16, device=torch.device("cpu"))


def test_a_checkpoint_restores_the_distributed_optimizer_and_refuses_what_it_cannot_read(one_rank, tmp_path):
    """MegatronEngine's checkpoint (dist_checkpointing, the distributed optimizer's fully reshardable state): a fresh
    engine loads the weights, every parameter's moments and step, the groups' learning rates (the adapter's its own)
    and the scheduler exactly, and trains on to the same loss. A tag of the earlier format (no distributed optimizer)
    gives its weights alone; another folder, or one whose .metadata pickle names code, is refused with one line and
    the code does not run (torch.distributed.checkpoint reads .metadata with pickle.load)."""
    import pickle

    from megatron.core import dist_checkpointing

    from semhitok.common.safe_load import UnsafeCheckpoint
    from semhitok.mllm.megatron import cpu
    from semhitok.mllm.megatron.engine import load_weights, sharded_model_state

    trained = tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2)))
    layout = trained.model.layout
    text = packed_batch(layout, seed=1)
    text["input_ids"] = text["input_ids"].masked_fill(text["input_ids"] >= layout.visual_offset, 5)  # no image
    for batch in (text, packed_batch(layout, seed=2)):
        trained.train_window([batch])
    trained.save_checkpoint(str(tmp_path), "step00000002", {"step": 2})
    fresh = tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2, seed=1)))
    assert fresh.load_checkpoint(str(tmp_path), "step00000002") == (str(tmp_path / "step00000002"), {"step": 2})
    for (name, p), q in zip(trained.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    (want,), (got,) = trained._distributed_optimizers(), fresh._distributed_optimizers()
    steps, step_tensors = set(), []
    for group_want, group_got in zip(want.optimizer.param_groups, got.optimizer.param_groups, strict=True):
        assert group_got["lr"] == group_want["lr"]
        for p, q in zip(group_want["params"], group_got["params"], strict=True):
            a, b = want.optimizer.state[p], got.optimizer.state[q]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            steps.add(float(a["step"]))
            step_tensors.append(b["step"])
    assert steps == {2.0}  # every parameter steps every window, the adapter's too (a zero gradient without images)
    assert len({id(t) for t in step_tensors}) == len(step_tensors)  # each its own (AdamW increments them in place)
    assert sorted(fresh.scheduler.get_last_lr()) == sorted(trained.scheduler.get_last_lr()) == [1e-3 / 3, 3e-3 / 3]
    assert fresh.scheduler.state_dict() == trained.scheduler.state_dict()
    after = [engine.train_window([packed_batch(layout, seed=3)])[0]["loss"] for engine in (trained, fresh)]
    assert float(after[1]) == float(after[0])
    assert float(trained.train_window([packed_batch(layout, seed=4)])[0]["loss"]) == \
        float(fresh.train_window([packed_batch(layout, seed=4)])[0]["loss"])

    old = tmp_path / "old" / "step00000002"  # the weights beside no distributed optimizer, as the earlier format wrote
    (old / "dist_checkpoint").mkdir(parents=True)
    with cpu.cuda_on_cpu():  # (as the engine saves on CPU)
        dist_checkpointing.save({"model": sharded_model_state(trained.model), "scheduler": {"last_epoch": 2}}, str(old / "dist_checkpoint"))
    with pytest.raises(ValueError, match=r"step00000002: its optimizer state predates the distributed optimizer"):
        fresh.load_checkpoint(str(old.parent), old.name)
    load_weights(fresh.model, old)
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"older: no dist_checkpoint/metadata.json: not a checkpoint of the Megatron"):
        load_weights(fresh.model, tmp_path / "older")
    marker = tmp_path / "payload_ran"
    (tmp_path / "step00000002" / "dist_checkpoint" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpoint, match=r"\.metadata: refused to load: it needs \w+\.system"):
        fresh.load_checkpoint(str(tmp_path), "step00000002")
    assert not marker.exists()


class FusedAdamLayout(torch.optim.Optimizer):
    """AdamW keeping its step in the parameter group, as transformer-engine's and apex's FusedAdam do (a GPU image's
    optimizer under megatron-core; torch's AdamW keeps a step tensor per parameter)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **_):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (b1, b2), n = group["betas"], group["step"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], (state["exp_avg_sq"] / (1 - b2 ** n)).sqrt_().add_(group["eps"]),
                           value=-group["lr"] / (1 - b1 ** n))


def test_a_checkpoint_resumes_with_a_fused_adam_that_keeps_its_step_in_the_group(one_rank, tmp_path, monkeypatch):
    """The engine's load workarounds for torch's AdamW (a per-parameter step) leave an optimizer with transformer-
    engine's or apex's state layout alone: it saves, loads into a fresh engine and trains on to the same loss."""
    import megatron.core.optimizer as megatron_optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(megatron_optimizer, "Adam", FusedAdamLayout)
    monkeypatch.setattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "Adam", FusedAdamLayout)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)
    trained = tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2)))
    assert type(trained._distributed_optimizers()[0].optimizer) is FusedAdamLayout
    layout = trained.model.layout
    trained.train_window([packed_batch(layout, seed=1)])
    trained.save_checkpoint(str(tmp_path), "step00000001", {"step": 1})
    fresh = tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2, seed=1)))
    fresh.load_checkpoint(str(tmp_path), "step00000001")
    after = [engine.train_window([packed_batch(layout, seed=2)])[0]["loss"] for engine in (trained, fresh)]
    assert float(after[1]) == float(after[0])


def test_an_engine_refuses_gradient_buckets_its_checkpoint_would_misplace(one_rank, monkeypatch):
    """Buckets with padding between them (megatron's overlapped DDP splits a buffer into many) would be saved shifted
    by megatron-core 0.16.1's fully_reshardable format: refused with one line when the engine is built."""
    from megatron.core import distributed

    from semhitok.mllm.megatron.engine import check_one_bucket_per_buffer

    class Overlapped(distributed.DistributedDataParallelConfig):  # megatron's overlap, buckets of 6,000 weights
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "overlap_grad_reduce": True, "bucket_size": 6000})

    monkeypatch.setattr(distributed, "DistributedDataParallelConfig", Overlapped)
    with pytest.raises(ValueError, match=r"a gradient bucket of \d+ weights is padded by \d+, which megatron-core's fully_reshardable"):
        tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2)))
    monkeypatch.undo()
    check_one_bucket_per_buffer(tiny_engine(from_semhitok(tiny_semhitok(TINY_QWEN2))).ddp)  # the engine's own: one bucket
