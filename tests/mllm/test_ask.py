"""`semhitok ask`: the printed answer is Decoder.answer's for the same image and question; bad images are
refused in one line before any model loads."""

import pytest

from semhitok.cli import main
from semhitok.mllm.ask import ask, read_image
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import load_sampler
from semhitok.tokenizer import encode_images
from tests.conftest import SAMPLE

PHOTO = next((SAMPLE / "images").glob("*.jpg"))
QUESTION = "What is in this photo?"


@pytest.fixture(scope="module")
def sampler(tiny_mllm_dir):
    return load_sampler(tiny_mllm_dir, "cpu")


def expected(sampler, question: str, image, sampling: SamplingConfig, max_new_tokens: int) -> str:
    """What the chat's decoder answers: the image encoded as uploads are, then Decoder.answer."""
    decoder, visual = sampler
    if image is None:
        return decoder.answer([("user", question)], None, sampling, max_new_tokens)
    ids = encode_images(visual, [read_image(image)], decoder.seq_cfg.understanding_image)[0]
    return decoder.answer([("user", "<image>\n" + question)], ids, sampling, max_new_tokens)


@pytest.mark.parametrize("flags, sampling", [
    ([], SamplingConfig(temperature=0.0)),  # greedy, the default
    # sampled: the random tiny model's greedy answer is empty, a sampled one is not
    (["--temperature", "1", "--seed", "3"], SamplingConfig(temperature=1.0, seed=3)),
], ids=["greedy", "sampled"])
def test_the_printed_answer_is_the_decoders_for_the_same_image_and_question(tiny_mllm_dir, sampler, flags, sampling, capsys):
    want = expected(sampler, QUESTION, PHOTO, sampling, 12)
    code = main(["ask", "--model", str(tiny_mllm_dir), "--image", str(PHOTO), "--device", "cpu", "--max-new-tokens", "12",
                 *flags, QUESTION])
    assert code == 0
    assert capsys.readouterr().out == want + "\n"
    if flags:
        assert want.strip()
    assert ask(*sampler, QUESTION, read_image(PHOTO), sampling, 12) == want  # the library function the CLI calls


def test_a_text_only_question_has_no_image(tiny_mllm_dir, sampler, capsys):
    sampling = SamplingConfig(temperature=1.0, seed=5)
    want = expected(sampler, "What shapes are there?", None, sampling, 8)
    assert main(["ask", "--model", str(tiny_mllm_dir), "--device", "cpu", "--max-new-tokens", "8", "--temperature", "1",
                 "--seed", "5", "What shapes are there?"]) == 0
    assert capsys.readouterr().out == want + "\n" and want.strip()


def test_a_missing_or_unreadable_image_is_one_line_naming_it_before_the_model_loads(tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")
    missing = tmp_path / "nowhere.jpg"
    no_model = tmp_path / "no-model"  # never loaded: the image is checked first
    for bad in (missing, not_an_image):
        assert main(["ask", "--model", str(no_model), "--image", str(bad), "What is this?"]) == 2
        out, err = capsys.readouterr()
        assert not out and err.count("\n") == 1 and err.startswith("semhitok: error: ") and str(bad) in err, err
        assert "no-model" not in err and "Traceback" not in err
    assert main(["ask", "--model", str(no_model), "--image", str(PHOTO), "--image", str(PHOTO), "Which is brighter?"]) == 2
    assert "one image" in capsys.readouterr().err
