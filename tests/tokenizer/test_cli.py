import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLE
from semhitok.cli import main
from semhitok.tokenizer import SemHiTok, encode_paths, list_images


def test_reconstruct_writes_side_by_side_pngs(trained_tokenizer, tmp_path):
    out = tmp_path / "recon"
    assert main(["tokenizer", "reconstruct", "--model", str(trained_tokenizer), str(SAMPLE / "holdout.jsonl"),
                 "--out", str(out), "--grid", "4"]) == 0
    pngs = sorted(out.glob("*_recon.png"))
    assert len(pngs) == 12
    with Image.open(pngs[0]) as img:
        assert img.height > 2 * 64 and img.width >= 64  # input above reconstruction
    with Image.open(out / "grid.png") as img:
        assert img.width > 4 * 64


def test_encode_then_decode_cli_matches_the_api(trained_tokenizer, tmp_path):
    ids_file = tmp_path / "ids.npz"
    assert main(["tokenizer", "encode", "--model", str(trained_tokenizer), str(SAMPLE / "holdout.jsonl"),
                 "--out", str(ids_file)]) == 0
    data = np.load(ids_file)
    model = SemHiTok.from_pretrained(trained_tokenizer)
    _, ids = encode_paths(model, list_images([SAMPLE / "holdout.jsonl"]))
    assert np.array_equal(data["ids"], ids.numpy()) and data["ids"].dtype == np.int32
    assert main(["tokenizer", "decode", "--model", str(trained_tokenizer), "--ids", str(ids_file),
                 "--out", str(tmp_path / "decoded")]) == 0
    assert len(list((tmp_path / "decoded").glob("*.png"))) == len(ids)


def test_eval_cli_reports_metrics_and_explains_missing_fid(trained_tokenizer, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["tokenizer", "eval", "--model", str(trained_tokenizer), str(SAMPLE / "holdout.jsonl"),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 12 and 5 < result["psnr"] < 60 and 0 < result["ssim"] <= 1
    assert 0 < result["semantic_codebook_usage"] <= 1 and 0 < result["visual_id_usage"] <= 1
    model = SemHiTok.from_pretrained(trained_tokenizer)  # the usages, recomputed from the ids themselves
    _, ids = encode_paths(model, list_images([SAMPLE / "holdout.jsonl"]))
    K, m = model.config.sem_codebook_size, model.codes_per_group
    assert result["semantic_codebook_usage"] == pytest.approx(len(set((ids // m).flatten().tolist())) / K)
    assert result["visual_id_usage"] == pytest.approx(len(set(ids.flatten().tolist())) / model.vocab_size)
    if result["rfid"] is None:
        assert "pytorch-fid" in result["rfid_error"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["tokenizer", "encode", "--model", str(tmp_path), str(SAMPLE), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("semhitok: error:") and "config.json" in err and "\n" not in err
    assert main(["tokenizer", "train", "--stage", "1", "--config", "tiny", "tokenizer.teacher=google/siglip-so400m-patch14-384",
                 f"run_dir={tmp_path}"]) == 2
    assert "hf download google/siglip-so400m-patch14-384" in capsys.readouterr().err
