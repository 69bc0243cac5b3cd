"""Configs are range-checked at load time with one line naming the field; the override parser lets only
ConfigError escape (a Hypothesis property over random override strings)."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semhitok.common.config_io import ConfigError, parse_overrides
from semhitok.config import load_project_config
from semhitok.mllm.config import SamplingConfig


@pytest.mark.parametrize("override, field", [
    ("tokenizer_train.lr=0", "tokenizer_train.lr"),
    ("tokenizer_train.lr=-1e-4", "tokenizer_train.lr"),
    ("tokenizer_train.lr=.nan", "tokenizer_train.lr"),
    ("mllm_train.lr=.inf", "mllm_train.lr"),
    ("tokenizer_train.lr=1e999", "tokenizer_train.lr"),
    ("tokenizer_train.lr=1" + "0" * 400, "tokenizer_train.lr"),
    ("tokenizer_train.max_steps=-1" + "0" * 400, "tokenizer_train.max_steps"),
    ("tokenizer_train.max_steps=0", "tokenizer_train.max_steps"),
    ("mllm_train.max_steps=1.5", "mllm_train.max_steps"),
    ("tokenizer_train.log_every=0", "tokenizer_train.log_every"),
    ("mllm_train.log_every=0", "mllm_train.log_every"),
    ("mllm_train.ckpt_every=0", "mllm_train.ckpt_every"),
    ("mllm_train.gradient_accumulation=0", "mllm_train.gradient_accumulation"),
    ("tokenizer_train.batch_size=0", "tokenizer_train.batch_size"),
    ("data.micro_batch_size=0", "data.micro_batch_size"),
    ("data.cfg_dropout=1.5", "data.cfg_dropout"),
    ("data.cfg_dropout=-0.1", "data.cfg_dropout"),
    ("data.max_length=0", "data.max_length"),
    ("pretokenize.records_per_shard=0", "pretokenize.records_per_shard"),
    ("tokenizer.pix_encoder_heads=5", "tokenizer.pix_encoder_width"),
    ("tokenizer.pix_heads=4", "tokenizer.pix_heads"),  # retired: "no longer a field; set pix_encoder_heads and ..."
    ("mllm.qwen2_config={hidden_size: 8}", "mllm.qwen2_config"),
    ("tokenizer.pix_decoder_heads=0", "tokenizer.pix_decoder_heads"),
    ("tokenizer.sem_ema_decay=2", "tokenizer.sem_ema_decay"),
    ("eval.sampling.cfg_scale=.nan", "eval.sampling.cfg_scale"),
    ("eval.sampling.temperature=-1", "eval.sampling.temperature"),
    ("eval.sampling.top_k=-1", "eval.sampling.top_k"),
    ("eval.sampling.top_p=1.5", "eval.sampling.top_p"),
    ("eval.geneval_samples=0", "eval.geneval_samples"),
    ("tokenizer_train.lr.x=1", "tokenizer_train.lr"),  # a nested override on a scalar
    ("run_dir.x=1", "run_dir"),
    ("pretokenize.sources.name=x", "pretokenize.sources"),
])
def test_out_of_range_values_are_one_line_errors_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_project_config("tiny", [override])
    message = str(err.value)
    assert f"{field}:" in message and "\n" not in message


@pytest.mark.parametrize("overrides", [
    ["tokenizer_train.lr=[", ],
    ["tokenizer_train=1", "tokenizer_train.lr=1"],
    ["tokenizer_train.lr=1", "tokenizer_train.lr.x=1"],
    ["tokenizer_train..lr=1"],
    ["=1"],
])
def test_malformed_overrides_are_config_errors(overrides):
    with pytest.raises(ConfigError, match="override|tokenizer_train"):
        load_project_config("tiny", overrides)


def test_sampling_config_rejects_nonsense_where_it_is_built():
    for bad in (dict(cfg_scale=math.nan), dict(cfg_scale=math.inf), dict(temperature=-0.5), dict(temperature=math.nan),
                dict(top_p=math.nan), dict(top_p=-0.1), dict(top_k=-3), dict(top_k=2.5)):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)
    SamplingConfig(cfg_scale=1.0, temperature=0.0, top_k=0, top_p=1.0)  # the edges are fine


def test_valid_configs_still_load():
    cfg = load_project_config("tiny", ["mllm_train.grad_clip=0", "data.cfg_dropout=0", "eval.sampling.temperature=0"])
    assert cfg.mllm_train.grad_clip == 0 and cfg.data.cfg_dropout == 0


FIELDS = ["run_dir", "tokenizer.sem_codebook_size", "tokenizer.fusion", "tokenizer.siglip_config", "tokenizer_train.lr",
          "tokenizer_train.max_steps", "tokenizer_train.log_backends", "tokenizer_train.train_data", "pretokenize.sources",
          "data.mixture", "data.cfg_dropout", "mllm.base_config", "mllm_train.trainable", "eval.sampling.top_p", "eval"]
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS).map(lambda f: f + ".x"),
                 st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.=[]{}: ", max_size=20))
values = st.one_of(st.text(max_size=20), st.sampled_from(["0", "-1", "1e999", ".nan", ".inf", "[1, 2]", "{a: 1}", "[", "{",
                                                          "null", "true", "2020-01-01", "!!binary x", "&a [*a]", "'", "1.5",
                                                          "[{source: x, task: text}]", "{1: 2}", "- a"]),
                   st.integers().map(str), st.floats().map(str))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=30), max_size=4))
def test_only_config_errors_escape_the_parser(overrides):
    try:
        parse_overrides(overrides)
        load_project_config("tiny", overrides)
    except ConfigError as err:
        assert "\n" not in str(err).strip() or "override" in str(err)
