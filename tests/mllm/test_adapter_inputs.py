"""mllm.adapter_inputs (issue 24): both = SemHiTok's dual MLP, concat = one MLP on the concatenated code vectors
(the arXiv text), semantic = the semantic MLP alone; the exported remote code builds the same adapter."""

import torch

from semhitok.mllm.hf_remote.configuration_semhitok import SemHiTokMLLMConfig
from semhitok.mllm.hf_remote.modeling_semhitok import VisualAdapter as RemoteAdapter
from semhitok.mllm.model import VisualAdapter
from semhitok.tokenizer.semhitok.model import SemHiTokFeatures

K, M, SEM, PIX, HIDDEN, D = 8, 3, 4, 2, 16, 12


def features() -> SemHiTokFeatures:
    g = torch.Generator().manual_seed(0)
    return SemHiTokFeatures(torch.randn(K, SEM, generator=g), torch.randn(K * M, PIX, generator=g), M).requires_grad_(False)


def test_concat_is_one_mlp_on_both_code_vectors():
    torch.manual_seed(0)
    concat, dual = VisualAdapter(features(), HIDDEN, D, "concat"), VisualAdapter(features(), HIDDEN, D, "both")
    assert concat.visual_mlp[0].in_features == SEM + PIX and concat.visual_mlp[-1].out_features == D
    assert not hasattr(concat, "sem_mlp") and not hasattr(concat, "pix_mlp")
    assert (dual.sem_mlp[0].in_features, dual.pix_mlp[0].in_features) == (SEM, PIX)
    assert (dual.sem_mlp[-1].out_features, dual.pix_mlp[-1].out_features) == (D - D // 2, D // 2)
    same_sem = torch.tensor([5 * M, 5 * M + 1])  # one semantic code, two pixel codes
    out = concat(same_sem)
    assert out.shape == (2, D) and not torch.equal(out[0], out[1])  # the pixel code reaches every channel
    # every output channel mixes both code vectors (the dual MLP keeps them in separate halves)
    x = concat.features(same_sem.view(1, -1, 1))[0, :1].clone().requires_grad_(True)  # [1, SEM + PIX]
    jac = torch.autograd.functional.jacobian(lambda f: concat.project(f), x)[0, :, 0]  # [D, SEM + PIX]
    assert (jac[:, :SEM].abs().sum(1) > 0).all() and (jac[:, SEM:].abs().sum(1) > 0).all()


def test_remote_code_builds_the_same_concat_adapter():
    torch.manual_seed(0)
    ours = VisualAdapter(features(), HIDDEN, D, "concat")
    cfg = SemHiTokMLLMConfig(text_config={"model_type": "qwen2", "hidden_size": D, "num_attention_heads": 2,
                                          "num_key_value_heads": 2, "intermediate_size": 16, "num_hidden_layers": 1},
                             visual_vocab_size=K * M, codes_per_group=M, sem_code_dim=SEM, pix_code_dim=PIX,
                             adapter_hidden=HIDDEN, adapter_inputs="concat")
    remote = RemoteAdapter(cfg)
    remote.load_state_dict({k.removeprefix("features."): v for k, v in ours.state_dict().items()})  # as the export loads
    ids = torch.arange(K * M)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids), ours(ids))
