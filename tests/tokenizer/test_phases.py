"""Phased stage 2 (continue a stage-2 tokenizer, enlarge its decoder), the paper's recipes, and the ablation
switches of Table 4 (student init, joint training, no pixel codes)."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from semhitok.common.config_io import ConfigError
from semhitok.config import load_project_config
from semhitok.tokenizer import SemHiTok, TokenizerConfig
from semhitok.tokenizer.data import ImageDataset, collate_images
from semhitok.tokenizer.siglip import load_teacher
from semhitok.tokenizer.semhitok.train import Stage2Task, build_task, stage_dirs, train_tokenizer
from tests.conftest import REPO, SAMPLE, stub_python_env, tiny_config

CPU = torch.device("cpu")
QUIET = ["tokenizer_train.perceptual=semantic", "tokenizer_train.disc_start=1000"]


def holdout_images(n=8):
    data = ImageDataset([SAMPLE / "holdout.jsonl"], 64)
    return collate_images([data[i] for i in range(n)])[0]


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    """A tiny stage-2 tokenizer after a few steps of each stage (cheaper than the session's trained one):
    its final directory, next to stage1/final."""
    run = tmp_path_factory.mktemp("phases")
    cfg = tiny_config(run, *QUIET)
    images = holdout_images()
    task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, CPU, world=1)
    task.train_step(images, 0)
    task.model.trained_stages = [1]
    task.model.save_pretrained(run / "tokenizer" / "stage1" / "final")
    task = build_task(2, cfg.tokenizer, cfg.tokenizer_train, run / "tokenizer" / "stage1" / "final", CPU, world=1)
    for step in range(2):
        task.train_step(images, step)
    task.model.trained_stages = [1, 2]
    task.model.save_pretrained(run / "tokenizer" / "stage2" / "final")
    return run / "tokenizer" / "stage2" / "final"


def decoder_side(state):
    return {k for k in state if k.startswith(("pixel.fuse.", "pixel.sem_in.", "pixel.decoder.", "pixel.to_pixels."))}


def test_continued_stage2_starts_exactly_where_the_parent_ended(parent_dir, tmp_path):
    parent = SemHiTok.from_pretrained(parent_dir)
    cfg = tiny_config(tmp_path, *QUIET)
    task = build_task(2, cfg.tokenizer, cfg.tokenizer_train, parent_dir, CPU, world=1)
    assert task.model.trained_stages == [1, 2]
    mine, theirs = task.model.state_dict(), parent.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the first forward of the continued run equals the parent's on the same batch: reconstruction and loss
    images = holdout_images()
    reference = Stage2Task(SemHiTok.from_pretrained(parent_dir), cfg.tokenizer_train, CPU, world=1)
    with torch.no_grad():
        assert torch.equal(task._reconstruct(images), reference._reconstruct(images))
        assert torch.allclose(task._reconstruct(images), parent.decode(parent.encode(images)), atol=1e-5)
    first, ref = task.train_step(images, 0), reference.train_step(images, 0)
    for key in ("loss", "l1_loss", "vq_loss", "perceptual_loss", "train_psnr"):
        assert first[key] == ref[key], key
    # what main did before: a stage-1 start has a new pixel branch, so the same check fails there
    fresh = build_task(2, cfg.tokenizer, cfg.tokenizer_train, parent_dir.parent.parent / "stage1" / "final", CPU, world=1)
    assert fresh.model.trained_stages == [1]
    with torch.no_grad():
        assert not torch.allclose(fresh._reconstruct(images), parent.decode(parent.encode(images)), atol=1e-2)


def test_continued_run_through_the_trainer_logs_the_parents_holdout_psnr(parent_dir, tmp_path):
    """stage_dirs resolves init_from=stage2 in the parent's run dir; the step-0 evaluation of the new phase
    equals the parent's, and the saved result keeps trained_stages [1, 2]."""
    run_dir = tmp_path / "run"
    shutil.copytree(parent_dir.parent, run_dir / "tokenizer" / "stage2")
    cfg = tiny_config(run_dir, *QUIET, "tokenizer_train.phase=coyo", "tokenizer_train.init_from=stage2",
                      "tokenizer_train.max_steps=1")
    out, init = stage_dirs(cfg.run_dir, 2, cfg.tokenizer_train)
    assert out == run_dir / "tokenizer" / "stage2_coyo" and init == run_dir / "tokenizer" / "stage2" / "final"
    cfg.tokenizer_train.stage = 2
    model = train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, out, init)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    psnr0 = next(r["holdout_psnr"] for r in rows if r["step"] == 0)
    reference = Stage2Task(SemHiTok.from_pretrained(parent_dir), cfg.tokenizer_train, CPU, world=1)
    assert psnr0 == reference.evaluate(holdout_images(cfg.tokenizer_train.holdout_images))["holdout_psnr"]
    assert model.trained_stages == [1, 2] and SemHiTok.from_pretrained(out / "final").trained_stages == [1, 2]


def test_continuing_refuses_a_changed_encoder_side(parent_dir, tmp_path):
    cfg = tiny_config(tmp_path, *QUIET, "tokenizer.pix_encoder_layers=3")
    with pytest.raises(ValueError, match="pix_encoder_layers=2"):
        build_task(2, cfg.tokenizer, cfg.tokenizer_train, parent_dir, CPU, world=1)
    cfg = tiny_config(tmp_path, *QUIET, "tokenizer_train.trains=decoder")
    with pytest.raises(ValueError, match="stage-2 tokenizer to continue"):
        build_task(2, cfg.tokenizer, cfg.tokenizer_train, parent_dir.parent.parent / "stage1" / "final", CPU, world=1)


def test_decoder_enlargement_trains_the_new_decoder_and_keeps_every_id(parent_dir, tmp_path):
    parent = SemHiTok.from_pretrained(parent_dir)
    cfg = tiny_config(tmp_path, *QUIET, "tokenizer_train.perceptual=none", "tokenizer_train.trains=decoder", "tokenizer.pix_decoder_width=192",
                      "tokenizer.pix_decoder_heads=6", "tokenizer.pix_decoder_layers=4")
    task = build_task(2, cfg.tokenizer, cfg.tokenizer_train, parent_dir, CPU, world=1)
    model = task.model
    assert model.pixel.decoder.blocks[0].qkv.weight.shape == (3 * 192, 192) and len(model.pixel.decoder.blocks) == 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = set(before) - decoder_side(before)
    assert all(torch.equal(before[k], parent.state_dict()[k]) for k in kept)  # all but the decoder side carried over
    trained = {id(p) for group in task.optimizers["pixel"].param_groups for p in group["params"]}
    assert trained == {id(p) for m in model.pixel.decoder_side() for p in m.parameters()}
    images = holdout_images(4)
    ids_before = parent.encode(images)
    losses = [task.train_step(images, step)["loss"] for step in range(8)]
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 0.78 -> 0.63 after 6 steps
    after = model.state_dict()
    assert [k for k in kept if not torch.equal(before[k], after[k])] == []  # encoder, codebooks, semantic: frozen
    assert all(not torch.equal(before[k], after[k]) for k in decoder_side(after) if k.endswith("weight"))
    assert torch.equal(model.encode(images), ids_before)


def test_joint_training_updates_the_semantic_branch_with_its_loss_and_the_stage1_teacher(parent_dir, tmp_path):
    cfg = tiny_config(tmp_path, *QUIET, "tokenizer_train.trains=joint")
    stage1 = parent_dir.parent.parent / "stage1" / "final"
    task = build_task(2, cfg.tokenizer, cfg.tokenizer_train, stage1, CPU, world=1)
    torch.manual_seed(cfg.tokenizer_train.seed)  # how stage 1 built its (random) teacher
    stage1_teacher = load_teacher(cfg.tokenizer).state_dict()
    assert all(torch.equal(v, stage1_teacher[k]) for k, v in task.teacher.state_dict().items())
    before = {k: v.clone() for k, v in task.model.semantic.state_dict().items()}
    images = holdout_images(4)
    metrics = [task.train_step(images, step) for step in range(2)]
    assert metrics[0]["semantic_loss"] > 0
    changed = [k for k, v in task.model.semantic.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("codebook.") for k in changed)
    assert "holdout_teacher_cosine" in task.evaluate(images)


@pytest.mark.parametrize("copy", [True, False])
def test_student_init_switch(tmp_path, copy):
    cfg = tiny_config(tmp_path, f"tokenizer_train.student_from_teacher={str(copy).lower()}")
    task = build_task(1, cfg.tokenizer, cfg.tokenizer_train, None, CPU, world=1)
    student = task.model.semantic.encoder.state_dict()
    same = [torch.equal(v, student[k]) for k, v in task.teacher.state_dict().items() if v.is_floating_point() and v.dim() > 1]
    assert all(same) if copy else not any(same)


def test_semantic_only_has_no_pixel_codes(tmp_path):
    cfg = tiny_config(tmp_path, "tokenizer.fusion=semantic_only")
    model = SemHiTok.from_teacher(cfg.tokenizer, load_teacher(cfg.tokenizer))
    model.trained_stages = [1, 2]
    assert not hasattr(model.pixel, "encoder") and model.vocab_size == cfg.tokenizer.sem_codebook_size
    images = holdout_images(2)
    ids = model.encode(images)
    assert torch.equal(ids.flatten(1), model.semantic_ids(images))  # the ids are the semantic ids
    assert model.decode(ids).shape == images.shape
    sem, pix = model.code_features()
    assert pix.shape == (cfg.tokenizer.sem_codebook_size, cfg.tokenizer.pix_code_dim)


def test_encoder_and_decoder_sizes_apart_and_the_retired_fields(tmp_path):
    with pytest.raises(ValueError, match="pix_decoder_width: 100 is not a multiple"):
        TokenizerConfig(pix_decoder_width=100)
    model = SemHiTok.from_teacher(tiny_config(tmp_path, "tokenizer.pix_decoder_width=64", "tokenizer.pix_decoder_heads=2").tokenizer,
                                  load_teacher(tiny_config(tmp_path).tokenizer))
    assert model.pixel.encoder.pos.shape[-1] == 128 and model.pixel.decoder.pos.shape[-1] == 64
    # a directory saved by 0.1 (pix_width / pix_heads null in config.json) loads; one that sets them is refused
    model = SemHiTok.from_teacher(tiny_config(tmp_path).tokenizer, load_teacher(tiny_config(tmp_path).tokenizer))
    model.save_pretrained(tmp_path / "tok")
    config = tmp_path / "tok" / "config.json"
    meta = json.loads(config.read_text())
    assert "pix_width" not in meta
    config.write_text(json.dumps({**meta, "pix_width": None, "pix_heads": None}))
    again = SemHiTok.from_pretrained(tmp_path / "tok")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    config.write_text(json.dumps({**meta, "pix_width": 128}))
    with pytest.raises(ConfigError, match=r"config.json.pix_width: no longer a field; set pix_encoder_width and pix_decoder_width$"):
        SemHiTok.from_pretrained(tmp_path / "tok")


RECIPES = ["stage1", "stage2a_imagenet", "stage2b_coyo", "stage2c_decoder_l"]


@pytest.mark.parametrize("res", ["256", "384"])
def test_recipes_chain_the_papers_phases(res, tmp_path):
    cfgs = [load_project_config(f"recipes/{res}_{name}", [f"run_dir={tmp_path}"]) for name in RECIPES]
    dirs = [stage_dirs(c.run_dir, 1 if i == 0 else 2, c.tokenizer_train) for i, c in enumerate(cfgs)]
    for (out, _), (_, init) in zip(dirs, dirs[1:]):
        assert init == out / "final"  # each phase starts from the previous one
    assert dirs[-1][0] == tmp_path / "tokenizer" / "stage2"  # the last phase is what later jobs read
    for c in cfgs:  # the paper: ViT-B pixel encoder throughout
        t = c.tokenizer
        assert (t.pix_encoder_width, t.pix_encoder_heads, t.pix_encoder_layers) == (768, 12, 12)
        assert t.teacher == load_project_config(res).tokenizer.teacher
    decoders = [(c.tokenizer.pix_decoder_width, c.tokenizer.pix_decoder_layers) for c in cfgs]
    assert decoders == [(768, 12)] * 3 + [(1024, 24)]  # ViT-B, then ViT-L in the last phase
    assert [c.tokenizer_train.trains for c in cfgs[1:]] == ["pixel", "pixel", "decoder"]
    # the dry run's own config check (a process importing torch) is load_project_config above, same overrides: stubbed
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "SEMHITOK_CONDA_ENV"},
           "SEMHITOK_REPO": str(REPO), "DRY_RUN": "1", **stub_python_env(tmp_path)}
    for i, name in enumerate(RECIPES):  # the sbatch line each recipe names runs it
        proc = subprocess.run(["bash", "launch_scripts/tokenizer_train.sbatch", "1" if i == 0 else "2", f"recipes/{res}_{name}", str(tmp_path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and f"--config recipes/{res}_{name}" in proc.stdout, proc.stderr
        assert f"sbatch launch_scripts/tokenizer_train.sbatch {1 if i == 0 else 2} recipes/{res}_{name} " in \
            (REPO / "configs" / "recipes" / f"{res}_{name}.yaml").read_text()
