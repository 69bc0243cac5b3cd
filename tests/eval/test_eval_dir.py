"""One eval folder per model: `semhitok eval` writes it, the export's model card reads it right after."""

import json

from huggingface_hub import ModelCard

from semhitok.cli import main
from semhitok.common.model_card import eval_dir, find_eval_summary

ONLY_POPE = ["--config", "tiny", "eval.geneval_metadata=", "eval.gaps_data=", "eval.gfid_captions="]


def test_semhitok_eval_writes_the_models_eval_folder_and_rewrites_its_card(tiny_mllm, text_tokenizer, trained_tokenizer,
                                                                           tmp_path, capsys):
    final = tmp_path / "run" / "mllm" / "final"
    tiny_mllm.save_pretrained(final, text_tokenizer, trained_tokenizer)
    assert "No eval summary was found" in (final / "README.md").read_text()  # the export precedes its eval
    elsewhere = tmp_path / "elsewhere"
    assert main(["eval", "--model", str(final), "--out", str(elsewhere), *ONLY_POPE]) in (0, None)
    assert "No eval summary was found" in (final / "README.md").read_text()  # not the model's eval folder: card untouched

    assert main(["eval", "--model", str(final), *ONLY_POPE]) in (0, None)
    assert eval_dir(final) == tmp_path / "run" / "mllm" / "eval" and find_eval_summary(final) == eval_dir(final) / "summary.json"
    pope = json.loads((eval_dir(final) / "summary.json").read_text())["pope"]
    assert "summary: " + str(eval_dir(final) / "summary.json") in capsys.readouterr().out
    card = ModelCard.load(final / "README.md")
    assert f"| pope.accuracy | {pope['accuracy']:.4g} |" in card.text and f"| pope.unparsed | {pope['unparsed']:.4g} |" in card.text
    assert {"pope.accuracy", "pope.unparsed", "pope.questions"} <= set(card.data.metrics)
    assert "No eval summary" not in card.text
