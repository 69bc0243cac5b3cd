import torch

from semhitok.data_pipelines.text_tokenizer import TokenLayout
from semhitok.mllm.config import MLLMConfig
from semhitok.mllm.flops import batch_flops, document_lengths, row_flops
from semhitok.mllm.model import SemHiTokLM, load_base_lm
from tests.conftest import TINY_QWEN


def tiny_model() -> SemHiTokLM:
    cfg = MLLMConfig(base_model="random", base_config=TINY_QWEN, attn_implementation="sdpa")
    layout = TokenLayout(1024, 64 * 4, 1, 2, 3, 4, 5)  # 1,024 text + 256 visual rows
    torch.manual_seed(0)
    return SemHiTokLM.from_base(load_base_lm(cfg), layout, torch.randn(64, 8), torch.randn(256, 4), 4, 4, cfg)


def packed_batch():
    """Row 0: documents of 3 and 5 tokens; row 1: 4 and 2 tokens, then 2 padding positions."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 0, 1]])
    valid = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    input_ids = torch.tensor([[7, 8, 9, 10, 1030, 1031, 1100, 11], [12, 1024, 1279, 13, 14, 15, 0, 0]])  # 5 visual
    labels = torch.full((2, 8), -100)
    labels[0, 4:7] = input_ids[0, 4:7]  # 3 supervised targets in row 0
    labels[1, 2] = 1279  # 1 in row 1
    return position_ids, labels, valid, input_ids


def test_document_lengths_follow_position_restarts_and_skip_padding():
    position_ids, _, valid, _ = packed_batch()
    assert document_lengths(position_ids, valid).tolist() == [3, 5, 4, 2]


def test_batch_flops_equal_a_hand_count():
    model = tiny_model()
    position_ids, labels, valid, input_ids = packed_batch()
    # TINY_QWEN: d 64, 2 layers, 4 heads x 16, 2 kv heads (kv width 32), intermediate 128, q/k/v biases
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64  # attention, MLP, 2 RMSNorms
    body = 2 * layer + 64  # + final norm
    adapter = (8 * 64 + 64 + 64 * 32 + 32) + (4 * 64 + 64 + 64 * 32 + 32)  # sem MLP 8->64->32, pix MLP 4->64->32
    head = 1280 * 64
    tokens, supervised, visual = 14, 4, 5
    attention = 12 * 2 * 64 * (3**2 + 5**2 + 4**2 + 2**2)  # per document, not 12 L d T per token
    expected = 6 * (body * tokens + head * supervised + adapter * visual) + attention
    assert batch_flops(model, position_ids, labels, valid, input_ids) == expected
    # the old formula charged the head at every position and attention over the whole row: higher
    assert row_flops(model, tokens, seq_len=8) > 1.5 * expected


def test_depth_heads_are_charged_what_torch_counts_for_them():
    """DepthHeads (two groups of 2 and 3 codes): torch's FlopCounterMode over a teacher-forced forward+backward
    counts the matmuls; depth_head_flops adds what it does not count here (attention over the depths, and 6 per
    bias or norm parameter per depth, as the body's convention charges them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from semhitok.mllm.depth_head import DepthHeads
    from semhitok.mllm.flops import depth_head_flops

    torch.manual_seed(0)
    vocab, groups, targets = (16, 16, 24, 24, 24), (2, 3), 7
    heads = DepthHeads(32, vocab, groups, layers=2, width=32, heads=2)
    hidden = torch.randn(targets, 32, requires_grad=True)
    codes = torch.stack([torch.randint(0, v, (targets,)) for v in vocab], 1)
    with FlopCounterMode(display=False) as counter:
        heads(hidden, codes).sum().backward()
    small = 2 * (2 * 32 + 2 * 32 + 3 * 32 + 32 + 4 * 32 + 32) + 2 * 32  # per depth: 2 blocks' norms and biases, final norm
    uncounted = sum(12 * 2 * 32 * d * d + 6 * small * d for d in groups) * targets
    assert counter.get_total_flops() + uncounted == depth_head_flops(heads, targets)
    assert depth_head_flops(None, targets) == 0


def test_batch_flops_charge_the_depth_heads_at_visual_targets_only():
    from semhitok.mllm.depth_head import DepthHeads
    from semhitok.mllm.flops import depth_head_flops

    model = tiny_model()
    position_ids, labels, valid, input_ids = packed_batch()
    flat = batch_flops(model, position_ids, labels, valid, input_ids)
    model.visual_head = DepthHeads(64, (16, 16), (1, 1), layers=1, width=32, heads=2)
    labels[0, 3] = 11  # a text target: no depth heads
    extra = batch_flops(model, position_ids, labels, valid, input_ids) - flat - 6 * 1280 * 64  # (the head, one more target)
    assert extra == depth_head_flops(model.visual_head, 4)  # 3 visual targets in row 0, 1 in row 1
