
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from semhitok.data_pipelines.text_tokenizer import TokenLayout, train_tiny_text_tokenizer
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.loss import chunk_for_budget, logit_bytes
from semhitok.mllm.model import SemHiTokLM, load_base_lm
from tests.conftest import TINY_QWEN


TEXT_TOKENIZER = train_tiny_text_tokenizer(["a b c"] * 4, vocab_size=300)


def tiny(tied: bool, dtype=torch.bfloat16) -> SemHiTokLM:
    cfg = MLLMConfig(base_model="random", base_config={**TINY_QWEN, "tie_word_embeddings": tied}, attn_implementation="sdpa")
    torch.manual_seed(0)
    layout = TokenLayout.from_tokenizer(TEXT_TOKENIZER, 64 * 4, 1024)  # 1,024 text + 256 visual rows
    return SemHiTokLM.from_base(load_base_lm(cfg, dtype), layout, torch.randn(64, 8), torch.randn(256, 4), 4, 4, cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_built_in_the_training_dtype_without_visual_input_rows_when_untied(tied):
    model = tiny(tied)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    table, head = model.lm.get_input_embeddings().weight, model.lm.lm_head.weight
    assert head.shape == (1280, 64)
    assert (table is head) == tied
    assert table.shape[0] == (1280 if tied else 1024)  # untied: text rows only, visual inputs use the adapter
    norms = head.float().norm(dim=1)  # visual head rows: the adapter's projections at the text rows' mean norm
    torch.testing.assert_close(norms[1024:], norms[:1024].mean().expand(256), rtol=2e-2, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_export_in_the_training_dtype_round_trips_tied_and_untied(tied, tmp_path):
    model = tiny(tied)
    (tmp_path / "vt").mkdir()
    (tmp_path / "vt" / "config.json").write_text("{}")
    model.save_pretrained(tmp_path / "m", TEXT_TOKENIZER, tmp_path / "vt")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # not fp32: half the bytes
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [1280, 64]  # padded: transformers loads it
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)  # the export's own model code
    assert hf.dtype == torch.bfloat16 and hf.config.text_config.vocab_size == 1280
    assert (hf.get_input_embeddings().weight is hf.lm_head.weight) == tied
    loaded = SemHiTokLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.lm.get_input_embeddings().weight.shape[0] == (1280 if tied else 1024)
    assert (loaded.lm.get_input_embeddings().weight is loaded.lm.lm_head.weight) == tied
    ids = torch.randint(0, 1280, (1, 30))
    pos = torch.arange(30)[None]
    with torch.no_grad():
        assert loaded(ids, pos, ids)["loss"] == model(ids, pos, ids)["loss"]
        # the transformers model (remote code) reads visual ids through the adapter, tied or not
        torch.testing.assert_close(hf(ids).logits, loaded.logits(loaded.hidden_states(ids).last_hidden_state))


def test_loss_chunk_is_picked_from_the_memory_budget():
    assert logit_bytes(torch.bfloat16) == 6 and logit_bytes(torch.float32) == 4  # product + its fp32 copy
    assert chunk_for_budget(0, 2.0, 348_544) == 1026  # 2 GiB / (6 B x 348,544 rows)
    assert chunk_for_budget(0, 2.0, 348_544, torch.float32) == 1540
    assert chunk_for_budget(512, 2.0, 348_544) == 512  # an explicit chunk wins
    assert chunk_for_budget(0, 1e-9, 348_544) == 1
