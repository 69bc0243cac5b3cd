"""Hugging Face artifacts: loading by Hub id from a local mirror of the Hub cache (offline), the transformers-only
round trip of an MLLM export (remote code), model cards, generation config and push_to_hub (a recording HfApi)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from PIL import Image

from tests.conftest import SAMPLE

IMAGE = SAMPLE / "images" / "coco_000000000790.jpg"
MLLM_REPO, TOKENIZER_REPO = "semhitok-test/tiny-mllm", "semhitok-test/tiny-tokenizer"


def mirror(cache: Path, repo_id: str, folder: Path) -> str:
    """Write `folder` as huggingface_hub's cache holds a downloaded repo: models--org--name/{blobs/<sha256>,
    snapshots/<commit>/<path> -> ../../blobs/<sha256> (relative links), refs/main = <commit>}. Returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1("".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tiny_mllm_dir, trained_tokenizer, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    mirror(cache, MLLM_REPO, tiny_mllm_dir)
    mirror(cache, TOKENIZER_REPO, trained_tokenizer)
    return cache


def test_loads_by_hub_id_from_the_cache_offline(hub_cache, tiny_mllm, trained_tokenizer, monkeypatch, capsys):
    from semhitok.cli import main
    from semhitok.common.hub import resolve_pretrained
    from semhitok.mllm.model import SemHiTokLM
    from semhitok.tokenizer import SemHiTok, WeightsUnavailable

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    assert {r.repo_id for r in huggingface_hub.scan_cache_dir(hub_cache).repos} == {MLLM_REPO, TOKENIZER_REPO}  # the library's layout
    tok = SemHiTok.from_pretrained(TOKENIZER_REPO)
    local = SemHiTok.from_pretrained(trained_tokenizer)
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in tok.state_dict().items())
    model = SemHiTokLM.from_pretrained(MLLM_REPO)
    assert all(torch.equal(v, tiny_mllm.state_dict()[k]) for k, v in model.state_dict().items())
    assert resolve_pretrained(MLLM_REPO).parent.parent == hub_cache / "models--semhitok-test--tiny-mllm"
    with pytest.raises(WeightsUnavailable, match=r"hf download semhitok-test/absent --local-dir") as err:
        resolve_pretrained("semhitok-test/absent")
    assert "\n" not in str(err.value)
    assert main(["sample", "--model", "semhitok-test/absent", "--prompt", "a bus", "--out", str(hub_cache / "x")]) == 2
    assert "hf download semhitok-test/absent" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve_pretrained(hub_cache / "not" / "here")


# Imports only transformers, torch and PIL; loads the export by Hub id from the mirrored cache.
ROUND_TRIP = """
import sys, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
repo, image, out = sys.argv[1:]
try:
    AutoModelForCausalLM.from_pretrained(repo)  # no trust_remote_code: refused
    refused = ""
except ValueError as err:
    refused = str(err)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\\nWhat is in the picture?"}],
                                        add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open(image))
batch = processor(text=[prompt, "no image here"], images=[Image.open(image)])  # padded rows
try:
    processor(text=prompt)
    missing = ""
except ValueError as err:
    missing = str(err)
with torch.no_grad():
    logits = model(**inputs).logits
    model.model.norm.weight.zero_()  # every logit 0: greedy decoding picks id 0, <|endoftext|>
stopped = model.generate(**inputs, max_new_tokens=6)
unstopped = model.generate(**inputs, max_new_tokens=6, eos_token_id=None)
torch.save({"ids": inputs["input_ids"], "logits": logits, "batch": dict(batch), "missing": missing, "refused": refused, "stopped": stopped, "unstopped": unstopped,
            "eos": model.generation_config.eos_token_id, "semhitok": [m for m in sys.modules if m.startswith("semhitok")]}, out)
"""


def test_transformers_only_round_trip_matches_semhitok(hub_cache, tiny_mllm, tmp_path):
    from semhitok.data_pipelines.sequences import SequenceBuilder
    from semhitok.data_pipelines.text_tokenizer import load_text_tokenizer
    from semhitok.mllm.model import VISUAL_TOKENIZER
    from semhitok.tokenizer import SemHiTok, encode_images

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1", PYTHONPATH="")
    (tmp_path / "round_trip.py").write_text(ROUND_TRIP)
    proc = subprocess.run([sys.executable, "round_trip.py", MLLM_REPO, str(IMAGE), "out.pt"], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["semhitok"] == []  # transformers ran only the exported code
    assert "trust_remote_code=True" in got["refused"]  # a plain load is refused, not silently wrong

    export = huggingface_hub.snapshot_download(MLLM_REPO, cache_dir=hub_cache)
    visual = SemHiTok.from_pretrained(Path(export) / VISUAL_TOKENIZER)
    ids = encode_images(visual, [Image.open(IMAGE)], tiny_mllm.sequence_config.understanding_image)[0].flatten().numpy()
    builder = SequenceBuilder(load_text_tokenizer(export), tiny_mllm.layout, tiny_mllm.sequence_config)
    tokens = torch.tensor([builder.chat_prompt([("user", "<image>\nWhat is in the picture?")], ids)])
    assert torch.equal(got["ids"], tokens)  # the processor's image ids and chat format are semhitok's
    assert (tokens >= tiny_mllm.layout.visual_offset).sum() == ids.size
    assert torch.equal(got["batch"]["input_ids"][0], tokens[0]) and got["batch"]["attention_mask"][1].sum() < tokens.shape[1]
    assert "1 image place(s)" in got["missing"] and "0 image(s) given" in got["missing"]
    with torch.no_grad():
        expected = tiny_mllm.logits(tiny_mllm.hidden_states(tokens).last_hidden_state)
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)  # visual ids went through the adapter

    layout, n = tiny_mllm.layout, tokens.shape[1]
    assert set(got["eos"]) == {layout.im_end, layout.eos}
    assert got["stopped"][0, n:].tolist() == [layout.eos]  # stopped at <|endoftext|> (generation_config.json)
    assert got["unstopped"].shape[1] == n + 6  # without eos it runs on


# Imports only transformers, torch and PIL; loads the export from its directory through pipeline("image-text-to-text").
PIPELINE = """
import sys, torch
from PIL import Image
from transformers import pipeline
from transformers.processing_utils import ProcessorMixin
export, image, out = sys.argv[1:]
question = "What color is the circle?"
typed = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}]}]
pipe = pipeline("image-text-to-text", model=export, trust_remote_code=True)
chat = pipe(text=typed, max_new_tokens=8)[0]["generated_text"]
answer = pipe(text=typed, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
sequence = pipe(text=typed, max_new_tokens=8, return_tensors=True)[0]["generated_token_ids"]
processor, model = pipe.processor, pipe.model
plain = [{"role": "user", "content": "<image>\\n" + question}]
by_path = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": question}]}]
inputs = processor.apply_chat_template(by_path, add_generation_prompt=True, tokenize=True, return_dict=True)
manual = model.generate(**inputs, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:]

def error(call):
    try:
        call()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return ""

# a prompt that opens an image span: grid**2 visual ids, then <|vision_end|>, then text again (greedy and sampled)
opened = torch.cat([inputs["input_ids"], torch.tensor([[processor.image_start]])], dim=1)
grid = model.config.image_grid
span = model.generate(input_ids=opened, attention_mask=torch.ones_like(opened), max_new_tokens=grid * grid + 2,
                      eos_token_id=None)[0, opened.shape[1]:]
torch.manual_seed(0)
sampled = model.generate(input_ids=opened, attention_mask=torch.ones_like(opened), max_new_tokens=grid * grid + 2,
                         eos_token_id=None, do_sample=True, top_k=3)[0, opened.shape[1]:]
torch.save({"chat": [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "typed"} for m in chat],
            "answer": answer, "sequence": sequence, "manual": manual,
            "manual_text": processor.decode(manual, skip_special_tokens=True),
            "classes": [type(model).__name__, type(processor).__name__, isinstance(processor, ProcessorMixin)],
            "rendered": [processor.apply_chat_template(plain), processor.apply_chat_template(typed),
                         processor.apply_chat_template(typed, add_generation_prompt=True)],
            "span": span, "sampled": sampled,
            "errors": [error(lambda: processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])),
                       error(lambda: processor(text="<image>", images=Image.open(image), truncation=True)),
                       error(lambda: processor(text=question, images=Image.open(image)))],
            "semhitok": [m for m in sys.modules if m.startswith("semhitok")]}, out)
"""


@pytest.fixture(params=["qwen2", "llama"])
def chat_export(request, tiny_mllm_dir, trained_tokenizer, tmp_path_factory) -> tuple[Path, str]:
    """An export of each chat family (ChatML, Vicuna v1 with a pad-less sentencepiece tokenizer) and the text its
    chat template adds for add_generation_prompt=True."""
    if request.param == "qwen2":
        return tiny_mllm_dir, "<|im_start|>assistant\n"
    from semhitok.data_pipelines.text_tokenizer import resolve_text_tokenizer
    from semhitok.mllm.config import MLLMConfig
    from semhitok.mllm.model import SemHiTokLM
    from semhitok.tokenizer import SemHiTok
    from tests.mllm.test_llama import TINY_LLAMA  # skips without sentencepiece

    out = tmp_path_factory.mktemp("llama")
    text_tokenizer = resolve_text_tokenizer("tiny-llama", out / "tok", SAMPLE)
    torch.manual_seed(0)
    model = SemHiTokLM.build(MLLMConfig(base_model="random", base_config=TINY_LLAMA), SemHiTok.from_pretrained(trained_tokenizer),
                             text_tokenizer)
    model.save_pretrained(out / "model", text_tokenizer, trained_tokenizer)
    return out / "model", "ASSISTANT:"


def test_pipeline_answers_an_image_question_with_transformers_alone(chat_export, tmp_path):
    from PIL import ImageDraw

    from semhitok.mllm.config import SamplingConfig
    from semhitok.mllm.sample import load_sampler
    from semhitok.tokenizer import encode_images

    export, generation_prompt = chat_export
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((24, 8, 72, 56), fill="red")
    image.save(tmp_path / "circle.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", PYTHONPATH="")
    (tmp_path / "pipe.py").write_text(PIPELINE)
    proc = subprocess.run([sys.executable, "pipe.py", str(export), "circle.png", "out.pt"], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["semhitok"] == []  # transformers ran only the exported code
    assert got["classes"] == ["SemHiTokForCausalLM", "SemHiTokProcessor", True]
    assert isinstance(got["answer"], str) and got["chat"] == [{"role": "user", "content": "typed"},
                                                              {"role": "assistant", "content": got["answer"]}]
    assert got["answer"] == got["manual_text"]  # the pipeline's answer is generate's on the processor's inputs

    # typed blocks render as the string content semhitok trains on; no generation prompt unless asked for
    plain, typed, prompt = got["rendered"]
    assert plain == typed and "<image>\nWhat color is the circle?" in typed and not typed.endswith(generation_prompt)
    assert prompt == typed + generation_prompt

    # the pipeline's prompt and greedy answer are semhitok's own (Decoder.answer's prompt and vocabulary)
    decoder, visual = load_sampler(export, device="cpu")
    ids = encode_images(visual, [image], decoder.seq_cfg.understanding_image)[0].flatten().numpy()
    tokens = decoder.builder.chat_prompt([("user", "<image>\nWhat color is the circle?")], ids)
    layout = decoder.layout
    reply = decoder.decode([tokens], 8, (0, len(decoder.tokenizer)), SamplingConfig(temperature=0.0), stop=layout.im_end)[0]
    sequence = got["sequence"]
    assert sequence[: len(tokens)].tolist() == tokens and torch.equal(got["manual"], sequence[len(tokens):])
    assert sequence[len(tokens):].tolist() == reply.tolist()[: len(sequence) - len(tokens)]

    # generate keeps ids where semhitok's decoder does: an opened image span gets grid**2 visual ids, then it closes
    n = decoder.model.image_grid ** 2
    for span in (got["span"], got["sampled"]):
        assert (span[:n] >= layout.visual_offset).all() and span[n] == layout.image_end and span[n + 1] < len(decoder.tokenizer)

    video, truncation, missing = got["errors"]
    assert video == "TemplateError: message content blocks are text or image, got type video"
    assert truncation == "TypeError: SemHiTokProcessor got unexpected keyword argument(s): truncation"
    assert "0 image place(s)" in missing and "1 image(s) given" in missing


def test_export_carries_card_generation_config_and_self_contained_code(tiny_mllm_dir, trained_tokenizer):
    from huggingface_hub import ModelCard

    config = json.loads((tiny_mllm_dir / "config.json").read_text())
    assert config["model_type"] == "semhitok_mllm" and config["text_config"]["model_type"] == "qwen2"
    for name in set(config["auto_map"].values()):
        source = (tiny_mllm_dir / f"{name.split('.')[0]}.py").read_text()
        assert not re.search(r"^\s*(from|import)\s+semhitok", source, re.M)  # self-contained
    generation = json.loads((tiny_mllm_dir / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {2, 0} and generation["pad_token_id"] == 0  # <|im_end|>, <|endoftext|>
    for folder, pipeline in ((tiny_mllm_dir, "image-text-to-text"), (trained_tokenizer, "image-feature-extraction")):
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "semhitok" and card.data.license == "apache-2.0"
        assert card.data.pipeline_tag == pipeline and "semhitok" in card.data.tags
        assert "No eval summary" in card.text and "## How to load" in card.text


def test_card_metadata_lists_hub_datasets_only(tiny_mllm_dir, tmp_path):
    from huggingface_hub import ModelCard

    from semhitok.common.run_dir import record_run
    from semhitok.config import load_project_config
    from semhitok.data_pipelines.config import SourceConfig
    from semhitok.mllm.hf_export import write_mllm_card

    final = tmp_path / "mllm" / "final"
    shutil.copytree(tiny_mllm_dir, final)
    cfg = load_project_config("tiny", [f"run_dir={tmp_path}"])
    hub = "https://huggingface.co/datasets/pixparse/cc3m-wds/resolve/main/cc3m-train-{0000..0575}.tar"
    cfg.pretokenize.sources = [SourceConfig("shapes_captions", "caption_jsonl", "data/shapes/train.jsonl"),
                               SourceConfig("cc3m", "wds", hub + "::" + hub.replace("train", "validation")),
                               SourceConfig("laion", "wds", "pipe:curl -sL hf://datasets/org/laion-sub@main/00.tar")]
    record_run(tmp_path / "mllm", cfg, "mllm-train", "tiny")
    card = ModelCard.load(write_mllm_card(final, final))
    assert card.data.datasets == ["pixparse/cc3m-wds", "org/laion-sub"]  # Hub ids; a local name is no Hub dataset
    assert "- shapes_captions\n- cc3m ([pixparse/cc3m-wds](https://huggingface.co/datasets/pixparse/cc3m-wds))\n" in card.text

    local = SourceConfig("coco_captions", "caption_jsonl", "data/sample/train.jsonl")
    cfg.pretokenize.sources = [cfg.pretokenize.sources[0], local]
    record_run(tmp_path / "mllm", cfg, "mllm-train", "tiny")
    card = ModelCard.load(write_mllm_card(final, final))
    assert card.data.datasets is None and "datasets:" not in card.content.split("---")[1]  # the key is left out
    assert "## Training data\n\n- shapes_captions\n- coco_captions\n" in card.text


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records create_repo and what upload_folder would send."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        RecordingApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        RecordingApi.calls.append(("upload_folder", repo_id, files, (folder / "README.md").read_text(), kw))
        return SimpleNamespace(commit_url=f"https://hub.test/{repo_id}/commit/1")


def test_push_uploads_a_fresh_export_with_its_card(tiny_mllm, tiny_mllm_dir, text_tokenizer, trained_tokenizer, tmp_path,
                                                   monkeypatch, capsys):
    from semhitok.cli import main
    from semhitok.tokenizer import SemHiTok

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    url = tiny_mllm.push_to_hub("org/mllm", text_tokenizer, trained_tokenizer, private=True, token="t0k")
    assert url == "https://hub.test/org/mllm/commit/1"
    (_, repo, kw), (_, repo2, files, card, _) = RecordingApi.calls
    assert repo == repo2 == "org/mllm" and kw["private"] is True and kw["exist_ok"] and kw["token"] == "t0k"
    assert {"config.json", "model.safetensors", "adapter.safetensors", "generation_config.json", "processor_config.json",
            "modeling_semhitok.py", "visual_tokenizer/model.safetensors", "README.md"} <= set(files)
    assert 'from_pretrained("org/mllm", trust_remote_code=True)' in card

    RecordingApi.calls = []
    SemHiTok.from_pretrained(trained_tokenizer).push_to_hub("org/tok")
    (_, _, kw), (_, repo, files, card, _) = RecordingApi.calls
    assert repo == "org/tok" and kw["private"] is None and {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert 'load_tokenizer("org/tok")' in card

    # the CLI uploads an existing export, its card refreshed with the eval summary found beside it
    final = tmp_path / "mllm" / "final"
    shutil.copytree(tiny_mllm_dir, final)
    (tmp_path / "mllm" / "eval").mkdir()
    (tmp_path / "mllm" / "eval" / "summary.json").write_text(json.dumps(
        {"model": str(final), "pope": {"accuracy": 0.625, "f1": 0.5, "n": 16}, "gfid": {"fid": 201.5, "images": "gfid_images"}}))
    RecordingApi.calls = []
    assert main(["push", "--model", str(final), "--repo", "org/pushed"]) == 0
    assert "org/pushed" in capsys.readouterr().out
    (_, _, kw), (_, repo, files, card, _) = RecordingApi.calls
    assert repo == "org/pushed" and "semhitok_mllm.json" in files
    assert "| pope.accuracy | 0.625 |" in card and "| gfid.fid | 201.5 |" in card
    assert huggingface_hub.ModelCard(card).data.metrics == ["gfid.fid", "pope.accuracy", "pope.f1", "pope.n"]
    assert main(["push", "--model", str(tmp_path), "--repo", "org/x"]) == 2
    assert "not a semhitok export" in capsys.readouterr().err


def tokenizer_export(folder: Path) -> Path:
    """A tokenizer export as `semhitok push` reads it (config.json, the card it replaces); no weights needed."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "semhitok", "sem_codebook_size": 4, "pix_codes_per_group": 2,
                                                    "siglip_config": {"image_size": 16, "patch_size": 4}}))
    (folder / "README.md").write_text("the card before the push\n")
    return folder


def test_push_without_the_hub_is_one_line_and_the_export_is_unchanged(tmp_path, monkeypatch, capsys):
    from semhitok.cli import main

    final = tokenizer_export(tmp_path / "final")
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_test", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE")  # online, with nothing listening on the endpoint
    proc = subprocess.run([sys.executable, "-m", "semhitok.cli", "push", "--model", str(final), "--repo", "org/x"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "http://127.0.0.1:9 is not reachable" in proc.stderr and "ConnectError" in proc.stderr
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py
    assert main(["push", "--model", str(final), "--repo", "org/x"]) == 2
    assert capsys.readouterr().err == "semhitok: error: upload to org/x: HF_HUB_OFFLINE is set; unset it to upload\n"
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)  # an upload that succeeds: then the card is replaced
    RecordingApi.calls = []
    assert main(["push", "--model", str(final), "--repo", "org/x"]) == 0
    (_, _, files, card, _) = RecordingApi.calls[1]
    assert files == ["README.md", "config.json"] and 'load_tokenizer("org/x")' in card
    assert (final / "README.md").read_text() == card and sorted(p.name for p in final.iterdir()) == ["README.md", "config.json"]
