"""`semhitok ablate`: one short Table 5 variant end to end, the table's layout, and the skip on rerun."""

import json

import pytest

from semhitok.cli import main
from semhitok.eval.ablate import TABLES, run_table
from tests.conftest import SAMPLE, tiny_config


def test_one_table5_variant_trains_measures_and_is_skipped_on_rerun(tmp_path, capsys, caplog):
    cfg = tiny_config(tmp_path, "tokenizer_train.perceptual=semantic", "tokenizer_train.batch_size=8")
    out = tmp_path / "table5"
    path = run_table(5, cfg.tokenizer, cfg.tokenizer_train, out, stage1_steps=2, steps=2, only=["dim_m12"], fid=False)
    result = json.loads((out / "dim_m12" / "metrics.json").read_text())
    assert result["overrides"] == ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=12"]
    assert 5 < result["psnr"] < 40 and 0 < result["subcode_usage"] <= 1 and 0 < result["semantic_usage"] <= 1
    assert -1 <= result["teacher_cosine"] <= 1 and result["rfid"] is None
    lines = path.read_text().splitlines()
    assert lines[2].startswith("| Fusion | Subc Size | rFID (ours) | PSNR (ours)") and lines[2].endswith("| rFID (paper) | Usage (paper) |")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lines[4:9]}
    assert len(rows) == 5 and "1.26 | 93.7%" in rows["Dim", "12"] and f"{result['psnr']:.2f}" in rows["Dim", "12"]
    assert "(not run)" in rows["w/o sem", "12"] and "1.99 | 98.4%" in rows["w/o sem", "12"]
    # rerun through the CLI: the finished variant is not trained again
    stamp = (out / "dim_m12" / "metrics.json").stat().st_mtime_ns
    assert main(["ablate", "--table", "5", "--config", "tiny", "--out", str(out), "--only", "dim_m12", "--no-fid",
                 f"run_dir={tmp_path}", f"tokenizer_train.holdout_data=[{SAMPLE / 'holdout.jsonl'}]",
                 "tokenizer_train.batch_size=8", "--stage1-steps", "2", "--steps", "2"]) == 0
    assert "ablation dim_m12: done already" in caplog.text and (out / "dim_m12" / "metrics.json").stat().st_mtime_ns == stamp
    assert "| Dim | 12 |" in capsys.readouterr().out


def test_tables_carry_the_papers_rows():
    assert [v.cells for v in TABLES[5].variants] == [["w/o sem", "12"], ["Len", "12"], ["Dim", "8"], ["Dim", "12"], ["Dim", "16"]]
    assert [v.paper[0] for v in TABLES[4].variants] == ["3.10", "2.73", "2.10", "1.24"]
    with pytest.raises(ValueError, match="unknown variant"):
        run_table(5, None, None, None, 1, 1, only=["dim_m99"])
