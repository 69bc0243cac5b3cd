"""The project's job configuration: one section per subsystem, loaded from <CONFIG_DIR>/<preset>.yaml
(configs/ in a checkout, semhitok/configs in an installed wheel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from semhitok.common.config_io import ConfigError, config_data, from_dict
from semhitok.common.resources import map_strings, resolve_shipped
from semhitok.data_pipelines.config import PretokenizeConfig, SequenceConfig
from semhitok.data_pipelines.world import WorldConfig
from semhitok.eval.config import EvalConfig
from semhitok.mllm.config import MLLMConfig, MLLMTrainConfig
from semhitok.tokenizer.config import TeacherTrainConfig, TokenizerConfig, TokenizerTrainConfig
from semhitok.tokenizer.dualtoken.config import DualTokenConfig
from semhitok.tokenizer.kinds import kind_trainer, paper_cfg_scale
from semhitok.tokenizer.toklip.config import TokLIPConfig


@dataclass
class ProjectConfig:
    run_dir: str = "runs/default"  # every job writes under here; "{run_dir}" in any other string field means it
    world: WorldConfig = field(default_factory=WorldConfig)  # the procedural shapes world (data_pipelines/world.py)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)  # stage 0 (tokenizer/teacher.py)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)
    data: SequenceConfig = field(default_factory=SequenceConfig)
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    mllm_train: MLLMTrainConfig = field(default_factory=MLLMTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    toklip: TokLIPConfig = field(default_factory=TokLIPConfig)  # tokenizer.kind=toklip's architecture and stages
    dualtoken: DualTokenConfig = field(default_factory=DualTokenConfig)  # tokenizer.kind=dualtoken's architecture

    def __post_init__(self) -> None:
        # adapter_inputs=semantic drops the pixel codes from every visual input, the generated images' too: the
        # model would draw pixel codes it can never see. It is the paper's understanding-side comparison only.
        if self.mllm.adapter_inputs == "semantic":
            for i, comp in enumerate(self.data.mixture):
                if comp.task == "generation" and comp.weight > 0:
                    raise ConfigError(f"mllm.adapter_inputs=semantic is for understanding only (the model could not "
                                      f"see the pixel codes it generates), but data.mixture[{i}] ({comp.source!r}) "
                                      "is a generation task: drop it or set mllm.adapter_inputs=both")

    def tokenizer_stage_dir(self, stage: int) -> Path:
        return Path(self.run_dir) / "tokenizer" / f"stage{stage}"

    @property
    def tokenizer_dir(self) -> Path:
        """The finished tokenizer of kind `tokenizer.kind`, as later jobs consume it (its trainer's final_dir)."""
        return kind_trainer(self.tokenizer.kind)[1](self)

    @property
    def pretokenize_tokenizer(self) -> Path:
        return Path(self.pretokenize.tokenizer) if self.pretokenize.tokenizer else self.tokenizer_dir

    @property
    def pretokenized_dir(self) -> Path:
        return Path(self.pretokenize.output_dir) if self.pretokenize.output_dir else Path(self.run_dir) / "pretokenized"

    @property
    def training_data_dir(self) -> Path:
        """The pre-tokenized corpus the LLM trains on."""
        return Path(self.data.pretokenized) if self.data.pretokenized else self.pretokenized_dir


    @property
    def teacher_dir(self) -> Path:
        """Where stage 0 writes its SigLIP teacher (presets point tokenizer.teacher at "{run_dir}/teacher")."""
        return Path(self.run_dir) / "teacher"

    @property
    def world_dir(self) -> Path:
        return Path(self.world.out_dir) if self.world.out_dir else Path(self.run_dir) / "world"

    @property
    def mllm_dir(self) -> Path:
        return Path(self.run_dir) / "mllm"


def load_project_config(preset: str | Path | None, overrides: list[str] | None = None,
                        model_kind: str | None = None) -> ProjectConfig:
    """Preset (or YAML path) + overrides -> the config, with relative paths into the shipped files
    (`data/...`, `configs/...`) resolved to the repository's or the installed package's copy when the
    current directory has none (semhitok.common.resources).

    eval.sampling.cfg_scale, unless the preset or an override sets it (to any value, 2 included), is the CFG
    scale of tokenizer.kind's paper (tokenizer.kinds.PAPER_CFG_SCALE: SemHiTok 2, DualToken 3), or of
    `model_kind`'s when given (the kind of the model `semhitok eval` scores, whatever the config's)."""
    data = config_data(preset, overrides)
    cfg = from_dict(ProjectConfig, data, where=str(preset or ProjectConfig.__name__))
    if not _is_set(data, "eval", "sampling", "cfg_scale"):
        cfg.eval.sampling.cfg_scale = paper_cfg_scale(model_kind or cfg.tokenizer.kind)
    return resolve_shipped(expand_run_dir(cfg))


def _is_set(data: dict, *keys: str) -> bool:
    """Whether the nested mapping `data` holds keys[0] -> keys[1] -> ... (a field the preset or an override set)."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def expand_run_dir(cfg: ProjectConfig) -> ProjectConfig:
    """Replace "{run_dir}" in every string field of the config by cfg.run_dir, in place (presets name files a
    run makes, such as the world's, as "{run_dir}/world/train.jsonl")."""
    run_dir = cfg.run_dir
    return map_strings(cfg, lambda text: text.replace("{run_dir}", run_dir))
