"""The stack learns: a short run of the whole path on a small shapes world (data_pipelines/world.py) answers held-out
colour questions and draws the colour a held-out prompt asks for, both far above chance (a quarter: four colours).

One run, shared by the tests (module fixture `learned`; about 2 minutes on the 2-core box at one compute thread, the
LLM half of it): a world of 400 single-object training scenes; stage 0, a SigLIP teacher trained on it for 100 steps;
both tokenizer stages for 120 steps; pre-tokenization; 700 steps of the shapes preset's LLM cut to 2 layers, in-process
(mllm_train.deepspeed_config=none). A random teacher (tokenizer.teacher=random) does not do: its features barely
depend on the image, the tokenizer's ids collapse onto one or two, and nothing downstream can learn.

One compute thread (an xdist worker's; two before 2026-12-04, which made the run 254 s beside the other worker): the
float sums, and so the run, differ with the thread count. At one thread the two-thread recipe (LLM lr 0.004,
understanding unweighted) read the colour from the image at 0.65 on seed 0, so the LLM trains at lr 0.002 with the
understanding loss weighted 3x. Measured at one thread, seeds 0 / 1 / 2: understanding (colour) 0.81 / 1.0 / 1.0,
generation at CFG 2 0.97 / 0.94 / 1.0, the id checker 1.0 each (at the preset's 4 layers, twice the LLM's time: 0.99 /
0.98 / 1.0 and 0.96 / 0.79 / 1.0). Others tried at 4 layers on seeds 0 and 2 missed the colour bar on one of them
(0.61-0.69): lr 0.004 with understanding weighted 1x, 3x or 10x, or drawn twice as often.

Broken on purpose once each (seed 0; then reverted), and what the asserted scores became:
    CFG mix with its sign flipped (mllm/sample.py cfg_mix)         generation at CFG 2: 0.015 (CFG 1, no mix: 0.94)
    labels shifted by one position (data_pipelines/loader.py)      understanding 0.0, generation 0.13
Measured with the two-thread recipe (the world before its splits were made disjoint):
    visual ids on other embedding rows in training (the ids of     understanding 0.28 (blind to the image; generation
      a batch reversed, mllm/model.py visual_embeds)                 1.0: the caption alone decides the colour)
A head whose visual rows start 100x too large (mllm/model.py from_features) is absorbed by training (0.90 and 1.0): not
a failure this test can or need see.

Generation is judged on the ids, not on decoded pixels: at this tokenizer budget the decoder gets the object's place
but not yet its flat colour, which the palette checker (eval/world_eval.detect) needs. Each visual id is named by the
colour of the training scenes it occurs in, when at least 90% of them share it (the teacher's contextual features put
the object's colour into the background's codes too); a generated image's colour is the majority name among its ids.
The same rule must find the colour of the held-out scenes' own ids. Prompts naming a colour-shape combination that no
training scene shows (WorldConfig.heldout_combos) are scored apart and not asserted: composing them is not learnt
reliably at this budget (0.33-1.0 over seeds 0-2).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from semhitok.data_pipelines.pretokenize import run_pretokenize
from semhitok.data_pipelines.world import read_scenes, write_world
from semhitok.eval.world_eval import answer_questions, read_jsonl
from semhitok.mllm.config import SamplingConfig
from semhitok.mllm.sample import load_sampler
from semhitok.mllm.train import train_mllm
from semhitok.tokenizer import encode_images, load_rgb
from semhitok.tokenizer.kinds import kind_trainer
from semhitok.tokenizer.teacher import train_teacher

from semhitok.config import load_project_config

pytestmark = pytest.mark.slow

COLOUR_CHANCE = 0.25  # four colours
MARGIN = 0.45  # above chance: working runs (seeds 0-2) clear it by 0.11 or more, each broken one misses it by 0.42 or more

# The shapes preset at a test's budget (the preset itself trains for tens of minutes).
BUDGET = [
    "world.train_scenes=400", "world.holdout_scenes=100", "world.max_objects=1", "world.text_rows=100",
    "world.single_min_size=0.375", "world.caption_requests=0",  # objects of 3-4 lattice cells: more of each image says its colour
    "world.captions_per_scene=2", "world.questions_per_scene=0",  # every row of each of the few scenes (as measured)
    "world.turns_per_conversation=1", "mllm_train.task_loss_weights={understanding: 3}",  # as measured
    "teacher_train.steps=100",
    "tokenizer.sem_codebook_size=32", "tokenizer.pix_codes_per_group=4",  # 128 visual ids (the world uses ~30): a small LLM head
    "tokenizer_train.max_steps=120", "tokenizer_train.lr=0.001", "tokenizer_train.log_every=1000",
    "tokenizer_train.eval_every=1000", "tokenizer_train.image_every=1000", "tokenizer_train.ckpt_every=1000",
    "pretokenize.records_per_shard=100000",
    "data.max_length=256", "data.micro_batch_size=4", "mllm.base_config.num_hidden_layers=2",  # half the preset's depth
    # drawing the asked colour is learnt last: generation documents drawn four times as often as the others
    ("data.mixture=[{source: shapes_captions, task: generation, weight: 4.0}, "
     "{source: shapes_llava, task: understanding, weight: 1.0}, {source: shapes_text, task: text, weight: 0.1}]"),
    "mllm_train.deepspeed_config=none", "mllm_train.max_steps=700", "mllm_train.lr=0.002", "mllm_train.adapter_lr=0.002",
    "mllm_train.warmup_steps=10", "mllm_train.activation_checkpointing=0", "mllm_train.log_every=50", "mllm_train.eval_every=0",
    "mllm_train.ckpt_every=100000",
]


def colour_names(ids: torch.Tensor, colours: list[str], purity: float = 0.9, min_scenes: int = 5) -> dict[int, str]:
    """Visual ids of N single-object scenes [N, h, w] and each scene's colour -> {id: colour} for the ids that occur in
    at least min_scenes scenes, a share `purity` of them of one colour."""
    seen: dict[int, Counter] = {}
    for row, colour in zip(ids.reshape(len(ids), -1).tolist(), colours):
        for i in set(row):
            seen.setdefault(i, Counter())[colour] += 1
    return {i: c.most_common(1)[0][0] for i, c in seen.items()
            if c.total() >= min_scenes and c.most_common(1)[0][1] >= purity * c.total()}


def colour_of(ids: torch.Tensor, names: dict[int, str]) -> str | None:
    """One image's ids -> the majority colour name among them (None: no named id)."""
    votes = Counter(names[i] for i in ids.flatten().tolist() if i in names)
    return votes.most_common(1)[0][0] if votes else None


def learn(run_dir: Path, seed: int = 0, cfg_scales: tuple[float, ...] = (1.0, 2.0)) -> dict:
    """The whole path on the world under run_dir -> the scores the tests assert (and the run's config)."""
    seeds = [f"{key}={seed}" for key in ("world.seed", "teacher_train.seed", "tokenizer_train.seed", "data.seed", "mllm_train.seed")]
    cfg = load_project_config("shapes", [f"run_dir={run_dir}", *BUDGET, *seeds])
    write_world(cfg.world, cfg.world_dir)
    teacher = train_teacher(cfg.teacher_train, cfg.teacher_dir)
    kind_trainer(cfg.tokenizer.kind)[0](cfg)
    run_pretokenize(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir)
    train_mllm(cfg)
    decoder, visual = load_sampler(cfg.mllm_dir / "final")

    understanding = answer_questions(decoder, visual, cfg.world_dir)
    encode = lambda split: encode_images(visual, [load_rgb(cfg.world_dir / p) for p, _, _ in read_scenes(cfg.world_dir, split)], "crop").cpu()
    colours = lambda split: [scene.objects[0].colour for _, scene, _ in read_scenes(cfg.world_dir, split)]
    names = colour_names(encode("train"), colours("train"))
    held_out = [colour_of(ids, names) for ids in encode("holdout")]
    rows = read_jsonl(cfg.world_dir / "prompts.jsonl")  # "a <colour> <shape>", some a combination never seen
    prompts, asked = [r["prompt"] for r in rows], [r["prompt"].split()[1] for r in rows]
    generation = {}
    for scale in cfg_scales:
        ids = torch.cat([decoder.image_ids(prompts[k : k + 25], SamplingConfig(cfg_scale=scale), samples=list(range(k, min(k + 25, len(rows)))))
                         for k in range(0, len(rows), 25)]).cpu()  # [N, h, w]
        hit = [colour_of(row, names) == a for row, a in zip(ids, asked)]
        generation[scale] = {combo: float(np.mean([h for h, r in zip(hit, rows) if r["heldout_combo"] == (combo == "heldout")]))
                             for combo in ("seen", "heldout")}
    return {"cfg": cfg, "teacher": teacher, "understanding": {t: v["accuracy"] for t, v in understanding["by_type"].items()},
            "questions": understanding["by_type"]["colour"]["n"],
            "prompts": sum(not r["heldout_combo"] for r in rows),
            "checker": float(np.mean([h == c for h, c in zip(held_out, colours("holdout"))])),
            "generation": generation, "default_cfg": SamplingConfig().cfg_scale}


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> dict:
    # One compute thread, as every measured run above, also in a lone pytest (two threads): at two the float sums
    # differ and seed 0 trains another way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return learn(tmp_path_factory.mktemp("learning"))
    finally:
        torch.set_num_threads(threads)


def test_the_world_is_the_intended_one(learned, capsys):
    with capsys.disabled():
        print(f"\nlearning on the shapes world: understanding {learned['understanding']}, generation by CFG scale "
              f"{learned['generation']}, id checker on held-out scenes {learned['checker']:.2f}")
    assert learned["cfg"].world.max_objects == 1 and learned["prompts"] >= 50 and learned["questions"] >= 90


def test_the_teacher_retrieves_held_out_captions(learned):
    # stage 0 after its 100 steps: held-out retrieval (both directions) well above a random pick under the same-text
    # rule (~4% here). Seeds 0, 1, 2 measured: 21.5%, 25.5%, 21.0% (train loss 7.3, 6.4, 7.8 from 13.6, 16.0, 17.3)
    result = learned["teacher"]
    assert result["train_loss"] < 0.75 * result["initial_train_loss"]
    mean = (result["image_to_caption"] + result["caption_to_image"]) / 2
    assert mean > 3 * result["chance_text"], result


def test_the_id_colour_checker_names_real_scenes(learned):
    # the rule that judges generated ids finds the colour of the held-out scenes' own ids: measured 1.0 (seeds 0-2,
    # one compute thread); 0.88 and 0.71 (seed 0, two runs at two threads): ids of new places are less often named
    assert learned["checker"] >= 0.6, learned["checker"]


def test_understanding_reads_the_colour_from_the_image(learned):
    # held-out "What color is the <shape>?": measured 0.81, 1.0, 1.0 (seeds 0-2); broken: 0.0 and 0.28 (docstring)
    assert learned["understanding"]["colour"] >= COLOUR_CHANCE + MARGIN, learned["understanding"]


def test_generation_draws_the_asked_colour_at_the_default_cfg(learned):
    # held-out "a <colour> <shape>" (seen combinations) at CFG 2: measured 0.97, 0.94, 1.0 (seeds 0-2); broken: 0.015
    # and 0.13 (docstring)
    drawn = learned["generation"][learned["default_cfg"]]["seen"]
    assert drawn >= COLOUR_CHANCE + MARGIN, learned["generation"]
