import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from semhitok.data_pipelines.sequences import IGNORE
from semhitok.mllm.loss import chunked_cross_entropy
from semhitok.mllm.model import SemHiTokLM
from semhitok.tokenizer import SemHiTok
from tests.conftest import TINY_QWEN

@pytest.fixture(scope="module")
def model(tiny_mllm) -> SemHiTokLM:
    return tiny_mllm


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_cross_entropy_matches_the_full_logit_loss_and_gradients(dtype, tol):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(301, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 301, (37,))
    upstream = torch.rand(37, dtype=dtype)  # a weighted sum exercises per-token gradients
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (ref * upstream).sum().backward()
    ref_gh, ref_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ours = chunked_cross_entropy(hidden, weight, targets, chunk=8)  # 5 chunks, the last one partial
    (ours * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=tol, atol=tol)


def test_chunked_cross_entropy_in_bf16_is_as_accurate_as_the_plain_bf16_loss():
    """bf16 (training's dtype): the head gradient accumulates over chunks in bf16 (as Liger-Kernel's does);
    errors against an fp64 reference stay within 2x of plain autograd on bf16 logits."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(512, 64, dtype=torch.float64), torch.randn(3001, 64, dtype=torch.float64) * 0.3
    targets, upstream = torch.randint(0, 3001, (512,)), torch.rand(512, dtype=torch.float64)

    def loss_and_grads(loss_fn, dtype):
        h, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
        loss = loss_fn(h, w)
        (loss.double() * upstream).sum().backward()
        return loss.double().detach(), h.grad.double(), w.grad.double()

    ref = loss_and_grads(lambda h, w: F.cross_entropy(h @ w.t(), targets, reduction="none"), torch.float64)
    plain = loss_and_grads(lambda h, w: F.cross_entropy((h @ w.t()).float(), targets, reduction="none"), torch.bfloat16)
    ours = loss_and_grads(lambda h, w: chunked_cross_entropy(h, w, targets, chunk=64), torch.bfloat16)  # 8 chunks
    for name, p, o, r in zip(("loss", "grad hidden", "grad weight"), plain, ours, ref):
        assert (o - r).norm() / r.norm() <= 2 * (p - r).norm() / r.norm(), name


def test_vocabulary_is_extended_by_every_visual_id(model, trained_tokenizer):
    tok = SemHiTok.from_pretrained(trained_tokenizer)
    assert model.layout.vocab_size == TINY_QWEN["vocab_size"] + tok.vocab_size
    assert model.lm.lm_head.weight.shape == (model.layout.vocab_size, 64)
    assert model.lm.get_input_embeddings().weight.shape[0] == model.layout.vocab_size
    rows = model.lm.lm_head.weight[model.layout.visual_offset :]
    text_norm = model.lm.lm_head.weight[: model.layout.text_vocab_size].norm(dim=1).mean()
    torch.testing.assert_close(rows.norm(dim=1), text_norm.expand(len(rows)), rtol=1e-4, atol=1e-4)  # not zeros
    # ids sharing a semantic code start closer in the head than ids from different codes
    m = tok.codes_per_group
    unit = F.normalize(rows.detach(), dim=1).view(-1, m, rows.shape[1])
    same = (unit[:, 0] * unit[:, 1]).sum(1).mean()
    other = (unit[:, 0] * unit.roll(1, dims=0)[:, 1]).sum(1).mean()
    assert same > other


def test_visual_tokens_enter_through_the_adapter(model):
    ids = torch.tensor([[5, 6, model.layout.visual_offset + 7, model.layout.visual_offset + 100]])
    emb = model.embed(ids)
    torch.testing.assert_close(emb[0, :2], model.lm.model.embed_tokens.weight[[5, 6]])
    torch.testing.assert_close(emb[0, 2:], model.adapter(torch.tensor([7, 100])))
    sem, pix = model.adapter.features.sem_codes, model.adapter.features.pix_codes
    torch.testing.assert_close(model.adapter(torch.tensor([100]))[0, : 32], model.adapter.sem_mlp(sem[100 // 12])[:32])
    assert pix.shape[0] == model.layout.visual_vocab_size


def test_loss_equals_the_plain_transformers_loss(model):
    torch.manual_seed(1)
    ids = torch.randint(0, model.layout.vocab_size, (2, 40))
    labels = ids.clone()
    labels[:, :10] = IGNORE
    pos = torch.arange(40).repeat(2, 1)
    ours = model(ids, pos, labels)["loss"]
    plain = model.lm(inputs_embeds=model.embed(ids), position_ids=pos, labels=labels).loss
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_task_loss_weights_weigh_each_token_by_its_task(model):
    torch.manual_seed(2)
    ids = torch.randint(0, model.layout.vocab_size, (2, 40))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    pos = torch.arange(40).repeat(2, 1)
    tasks = torch.zeros(2, 40, dtype=torch.long)  # row 0: understanding (0), row 1: generation (1)
    tasks[1] = 1
    plain = model(ids, pos, labels, task_ids=tasks)
    per_task = plain["task_loss_sum"] / plain["task_tokens"].clamp(min=1)
    ones = model(ids, pos, labels, task_ids=tasks, task_weights=torch.ones(3))["loss"]
    torch.testing.assert_close(ones, plain["loss"])
    only_gen = model(ids, pos, labels, task_ids=tasks, task_weights=torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(only_gen["loss"], per_task[1])
    torch.testing.assert_close(only_gen["task_loss_sum"], plain["task_loss_sum"])  # logs stay unweighted
    three = model(ids, pos, labels, task_ids=tasks, task_weights=torch.tensor([3.0, 1.0, 1.0]))["loss"]
    n = plain["task_tokens"]
    torch.testing.assert_close(three, (3 * plain["task_loss_sum"][0] + plain["task_loss_sum"][1]) / (3 * n[0] + n[1]))


def test_packed_rows_attend_within_documents_only(model):
    torch.manual_seed(2)
    docs = [torch.randint(0, model.layout.vocab_size, (n,)) for n in (7, 12, 5)]
    packed = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        hidden = model.hidden_states(packed, pos).last_hidden_state[0]
        start = 0
        for d in docs:
            alone = model.hidden_states(d[None], torch.arange(len(d))[None]).last_hidden_state[0]
            torch.testing.assert_close(hidden[start : start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)
        # the same row read as one document differs: the boundaries are what made the match
        whole = model.hidden_states(packed, torch.arange(packed.shape[1])[None]).last_hidden_state[0]
        assert not torch.allclose(whole[7:19], hidden[7:19], atol=1e-3)


def test_save_and_load_round_trip_as_a_plain_hf_directory(model, text_tokenizer, trained_tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m", text_tokenizer, trained_tokenizer)
    plain = Qwen2ForCausalLM.from_pretrained(tmp_path / "m")
    assert plain.config.vocab_size == model.layout.vocab_size
    torch.testing.assert_close(plain.lm_head.weight, model.lm.lm_head.weight)
    loaded = SemHiTokLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, model.layout.vocab_size, (1, 30))
    pos = torch.arange(30)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pos, ids)["loss"], model(ids, pos, ids)["loss"])
    assert loaded.layout == model.layout and loaded.image_grid == model.image_grid
    assert SemHiTok.from_pretrained(tmp_path / "m" / "visual_tokenizer").vocab_size == model.layout.visual_vocab_size
    assert np.array_equal(text_tokenizer.encode("a cat"), __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "m").encode("a cat"))


def test_an_export_recording_0_1_s_null_fields_loads_and_a_set_one_is_refused(tiny_mllm_dir, tmp_path):
    """Exports written before 37fb22b hold "qwen2_config": null in semhitok_mllm.json and the tokenizer's
    "pix_width"/"pix_heads": null: read as absent. A set value is refused with one line naming the replacement."""
    import json
    import shutil

    from semhitok.common.config_io import ConfigError
    from semhitok.mllm.sample import load_sampler

    export = shutil.copytree(tiny_mllm_dir, tmp_path / "m")
    meta_file = export / "semhitok_mllm.json"
    meta = json.loads(meta_file.read_text())
    assert "qwen2_config" not in meta["config"]
    meta_file.write_text(json.dumps({**meta, "config": {**meta["config"], "qwen2_config": None}}))
    tok_file = export / "visual_tokenizer" / "config.json"
    tok_file.write_text(json.dumps({**json.loads(tok_file.read_text()), "pix_width": None, "pix_heads": None}))
    decoder, visual = load_sampler(export, "cpu")  # the LLM and the visual tokenizer beside it
    assert decoder.model.config.base_config == meta["config"]["base_config"] and visual.config.pix_encoder_width > 0
    meta_file.write_text(json.dumps({**meta, "config": {**meta["config"], "qwen2_config": {"hidden_size": 64}}}))
    with pytest.raises(ConfigError, match=r"semhitok_mllm.json.qwen2_config: no longer a field; set base_config"):
        SemHiTokLM.from_pretrained(export)


def test_adapter_only_training_moves_the_adapter_and_visual_rows_only(trained_tokenizer, text_tokenizer):
    from semhitok.mllm.config import MLLMConfig

    torch.manual_seed(0)
    model = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_QWEN), SemHiTok.from_pretrained(trained_tokenizer), text_tokenizer)
    model.freeze_text()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    T = model.layout.text_vocab_size
    for _ in range(3):  # sequences mixing text and visual targets, like the packed rows
        ids = torch.cat([torch.randint(0, T, (2, 20)), torch.randint(T, model.layout.vocab_size, (2, 20))], 1)
        model(ids, torch.arange(40).repeat(2, 1), ids)["loss"].backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    head = "lm.lm_head.weight"
    assert torch.equal(after[head][:T], before[head][:T])  # text rows (tied: the embedding table too)
    assert not torch.equal(after[head][T:], before[head][T:])  # visual rows learn
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("lm.model.layers"))
    assert not torch.equal(after["adapter.sem_mlp.0.weight"], before["adapter.sem_mlp.0.weight"])


def test_frozen_rows_get_zero_gradient_in_the_chunked_loss():
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    targets = torch.randint(0, 10, (9,))
    chunked_cross_entropy(hidden, weight, targets, 4).sum().backward()
    full = weight.grad.clone()
    weight.grad = None
    chunked_cross_entropy(hidden, weight, targets, 4, frozen_rows=6).sum().backward()
    assert torch.equal(weight.grad[:6], torch.zeros(6, 4)) and torch.allclose(weight.grad[6:], full[6:])


def test_offline_base_model_and_text_tokenizer_fail_with_one_line_saying_what_to_download():
    from semhitok.data_pipelines.text_tokenizer import TextTokenizerUnavailable, load_text_tokenizer
    from semhitok.mllm.config import MLLMConfig
    from semhitok.mllm.model import load_base_lm
    from semhitok.tokenizer import WeightsUnavailable

    with pytest.raises(WeightsUnavailable, match=r"hf download Qwen/Qwen2.5-1.5B-Instruct") as err:
        load_base_lm(MLLMConfig())
    assert "\n" not in str(err.value)
    with pytest.raises(TextTokenizerUnavailable, match=r"hf download Qwen/Qwen2.5-1.5B-Instruct"):
        load_text_tokenizer("Qwen/Qwen2.5-1.5B-Instruct")
