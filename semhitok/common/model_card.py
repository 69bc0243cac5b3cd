"""The model card (README.md with Hub metadata) written into every tokenizer and MLLM export.

Metadata (YAML front matter, huggingface_hub.ModelCardData): license, library_name, pipeline_tag,
base_model, tags, datasets, metrics. `datasets` holds Hub dataset ids (owner/name) only, those the training
sources read from; local sources are named in the body alone. Body: what the model is built from, the data
it was trained on (the sources in the run's recorded config.yaml), the scores of its eval summary
(summary.json in the model's eval folder, eval_dir) when one exists, and how to load it. `semhitok eval`
rewrites the card of the export it evaluated, so the card shows the scores right after an eval.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

CARD = "README.md"
LICENSE = "apache-2.0"


def eval_dir(model_dir: str | Path) -> Path:
    """The one eval folder of a model, where `semhitok eval`, the pipeline's eval stage and eval/run_lmms.sh
    (under lmms_eval/) write and the model card reads: <run>/mllm/final -> <run>/mllm/eval; DIR -> DIR-eval."""
    model_dir = Path(model_dir)
    return model_dir.parent / "eval" if model_dir.name == "final" else model_dir.parent / f"{model_dir.name}-eval"


def find_eval_summary(model_dir: str | Path) -> Path | None:
    """summary.json of `semhitok eval` in the model's eval folder (eval_dir), when it exists."""
    summary = eval_dir(Path(model_dir).resolve()) / "summary.json"
    return summary if summary.is_file() else None


def summary_metrics(summary: dict, prefix: str = "", depth: int = 2) -> dict[str, float]:
    """Numeric leaves of an eval summary, up to `depth` levels: {"pope.accuracy": 0.81, "gfid.fid": 96.2, ...}."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict) and depth > 0:
            out.update(summary_metrics(value, name + ".", depth - 1))
    return out


# A Hub dataset in a source path: hf://datasets/owner/name/... or a huggingface.co/datasets/owner/name/... URL
# (also inside a `pipe:` command)
HUB_DATASET = re.compile(r"(?:hf://|huggingface\.co/)datasets/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)")


@dataclass(frozen=True)
class TrainingSource:
    name: str  # the pre-tokenize source's name (a local label)
    hub_ids: tuple[str, ...] = ()  # the Hub datasets (owner/name) its path reads from

    def card_line(self) -> str:
        return f"- {self.name}" + "".join(f" ([{i}](https://huggingface.co/datasets/{i}))" for i in self.hub_ids)


def training_sources(model_dir: str | Path) -> list[TrainingSource]:
    """The pre-tokenized sources in the config.yaml recorded for the run that made `model_dir`."""
    from semhitok.common.run_dir import find_run_config

    config = find_run_config(model_dir)
    if config is None:
        return []
    try:
        sources = (yaml.safe_load(config.read_text()) or {}).get("pretokenize", {}).get("sources") or []
    except (yaml.YAMLError, AttributeError):
        return []
    return [TrainingSource(str(s["name"]), tuple(dict.fromkeys(HUB_DATASET.findall(str(s.get("path") or "")))))
            for s in sources if isinstance(s, dict) and s.get("name")]


def write_model_card(folder: str | Path, *, title: str, about: list[str], usage: str, pipeline_tag: str,
                     base_model: str | None, tags: list[str], sources: list[TrainingSource],
                     run_dir: str | Path | None = None) -> Path:
    """folder/README.md; metrics come from the eval summary found for `run_dir` (default: folder) when present."""
    from huggingface_hub import ModelCard, ModelCardData

    summary_file = find_eval_summary(run_dir or folder)
    metrics: dict[str, float] = {}
    if summary_file is not None:
        try:
            metrics = summary_metrics(json.loads(summary_file.read_text()))
        except (ValueError, UnicodeDecodeError, AttributeError):
            metrics = {}
    hub_ids = list(dict.fromkeys(i for s in sources for i in s.hub_ids))
    data = ModelCardData(license=LICENSE, library_name="semhitok", pipeline_tag=pipeline_tag,
                         base_model=base_model or None, tags=["semhitok", *tags], datasets=hub_ids or None,
                         metrics=sorted(metrics) or None)
    lines = [f"# {title}", "", *about, ""]
    lines += ["## Training data", ""]
    lines += [s.card_line() for s in sources] if sources else ["Not recorded with this export."]
    lines += ["", "## Evaluation", ""]
    if metrics:
        lines += [f"From `{summary_file.name}` of `semhitok eval`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    else:
        lines += [f"No eval summary was found (`semhitok eval --model` writes {eval_dir(Path(run_dir or folder).resolve()).name}/summary.json "
                  "beside this export and rewrites this card)."]
    lines += ["", "## How to load", "", usage.strip(), ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(Path(folder) / CARD)
    return Path(folder) / CARD
