"""The paper's tokenizer ablations (Tables 4 and 5) as runnable variants, with their published numbers.

    semhitok ablate --table 5 --config tiny           # every variant at equal budget -> <out>/table5.md
    semhitok ablate --table 4 --config shapes         # + each variant's LLM, scored on the shapes world

Each table trains its stage-1 runs once (shared by the variants that need the same one), then a stage 2 per
variant with the same steps, batch and learning rate, and measures on the held-out images: rFID (when the
Inception weights load, else '-'), PSNR, SSIM, codebook usage, the teacher cosine of the semantic branch and the
GFLOPs of one image through stage 2's forward. What would confound the rows is held equal: the joint row's
semantic branch distils as many steps as the others' (its own stage 1 is shorter by the stage-2 steps in which
it keeps distilling), and a "semantic" perceptual term reads the frozen teacher in every row. Table 5's "w/o
sem" keeps the paper's sub-codebooks (its "Subc Size 12"): the decoder sees no semantic code, but the pixel code
is chosen in the semantic id's sub-codebook; the extra row "w/o sem, shared codebook" quantizes in one codebook
of the K * m codes, so that no semantic id reaches the pixel code, the decoder or the LLM.

With the LLM path (default when the config has world.enabled; the shapes world, data_pipelines/world.py),
each variant's tokenizer then goes through the rest of the pipeline as `semhitok pipeline` runs it: the
config's pre-tokenize sources encoded with it, the unified LLM trained on them (the config's mllm_train
schedule), and the LLM scored on the world's held-out questions and prompts (eval/world_eval.py score_world):
understanding and generation accuracy, our measure of what Table 4's understanding scores (GQA, POPE, SEED)
measure. Everything a variant writes lies under <out>/<variant> (the LLM's part under <out>/<variant>/llm).

A variant whose metrics.json (and, with the LLM path, llm.json) exists is skipped, an interrupted one resumes
from its checkpoints (tokenizer, pre-tokenized shards, LLM), so the command can simply be run again.

Lives in eval/ (not tokenizer/) because rFID does: nothing in tokenizer/ may import eval.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semhitok.common.config_io import deep_merge, from_dict, parse_overrides
from semhitok.common.io import write_json
from semhitok.common.run_dir import record_run
from semhitok.eval.compare import world_cells, world_scores
from semhitok.eval.recon import evaluate_reconstruction
from semhitok.tokenizer import SemHiTok, TokenizerConfig, TokenizerTrainConfig, iter_image_batches, list_images
from semhitok.tokenizer.data import ImageDataset, collate_images
from semhitok.tokenizer.losses import distill_loss
from semhitok.tokenizer.siglip import load_teacher, teacher_features
from semhitok.tokenizer.semhitok.train import train_tokenizer

log = logging.getLogger("semhitok")


@dataclass
class Variant:
    name: str  # directory name
    cells: list[str]  # the row's leading cells, in the paper's layout
    overrides: list[str] = field(default_factory=list)  # tokenizer.* / tokenizer_train.* for stage 2
    stage1: str = "teacher_init"  # key into STAGE1
    paper: list[str] = field(default_factory=list)  # the published numbers, in Table.paper_columns order


@dataclass
class Table:
    number: int
    title: str
    columns: list[str]  # the paper's leading columns
    paper_columns: list[str]
    variants: list[Variant]
    note: str = ""


# Stage-1 runs the variants share: stage-1 overrides by key.
STAGE1 = {"teacher_init": [], "random_init": ["tokenizer_train.student_from_teacher=false"], "joint": []}
# The joint row's stage 2 keeps distilling the semantic branch for its `steps` steps, so its own stage 1 runs
# stage1_steps - steps: every row's semantic branch then distils the same number of steps.
JOINT_STAGE1 = "joint"


def default_stage1_steps(number: int, only: list[str] | None, max_steps: int, steps: int) -> int:
    """Stage-1 steps when none are given: tokenizer_train.max_steps, or with the joint row among the variants
    max_steps + steps (the joint row's own stage 1 then runs max_steps)."""
    table = TABLES.get(number)
    joint = table is not None and any(v.stage1 == JOINT_STAGE1 and (only is None or v.name in only) for v in table.variants)
    return max_steps + steps if joint else max_steps


# Every row's stage 2: a "semantic" perceptual term reads the frozen teacher, not the row's own encoder (a random
# student, a teacher-initialised one, or one that joint training moves).
FIXED_STAGE2 = ["tokenizer_train.perceptual_network=teacher"]


def stage1_budget(key: str, stage1_steps: int, steps: int) -> int:
    """The stage-1 steps of the stage-1 run `key` (STAGE1) when every row's stage 1 is `stage1_steps`."""
    return stage1_steps - steps if key == JOINT_STAGE1 else stage1_steps

Y = "✓"
TABLES = {
    4: Table(
        4, "Impact of key design choices", ["SemEnc Init", "Texture Incorp.", "SGHC"], ["rFID", "GQA", "POPE", "SEEDB"],
        [
            # No pixel codes: the pixel decoder reconstructs from the semantic codes alone.
            Variant("spc_random_init", ["", "", ""], ["tokenizer.fusion=semantic_only"], "random_init", ["3.10", "56.7", "80.4", "54.1"]),
            Variant("spc_teacher_init", [Y, "", ""], ["tokenizer.fusion=semantic_only"], "teacher_init", ["2.73", "58.2", "83.1", "57.4"]),
            # Texture incorporated into the semantic tokenizer by joint training (MUSE-VL): stage 2 also
            # updates the semantic branch, which keeps its distillation loss.
            Variant("spc_joint", [Y, Y, ""], ["tokenizer.fusion=semantic_only", "tokenizer_train.trains=joint"], JOINT_STAGE1,
                    ["2.10", "58.0", "77.3", "56.7"]),
            Variant("sghc", [Y, "", Y], [], "teacher_init", ["1.24", "58.8", "83.2", "58.7"]),
        ],
        "The extracted paper text loses the check marks' columns; rows follow its prose: baseline with a randomly "
        "initialised semantic encoder, + teacher init, + joint texture training, SGHC (teacher init).",
    ),
    5: Table(
        5, "Impact of fusion type and sub-codebook size", ["Fusion", "Subc Size"], ["rFID", "Usage"],
        [
            Variant("wo_sem_m12", ["w/o sem", "12"], ["tokenizer.fusion=pixel_only", "tokenizer.pix_codes_per_group=12"],
                    paper=["1.99", "98.4%"]),
            # "w/o sem" taken strictly: no semantic id in the pixel code either (one shared codebook of K * m codes)
            Variant("wo_sem_shared_m12", ["w/o sem, shared codebook", "12"],
                    ["tokenizer.fusion=pixel_only", "tokenizer.pix_codebook=shared", "tokenizer.pix_codes_per_group=12"],
                    paper=["-", "-"]),
            Variant("len_m12", ["Len", "12"], ["tokenizer.fusion=length", "tokenizer.pix_codes_per_group=12"], paper=["1.45", "97.1%"]),
            Variant("dim_m8", ["Dim", "8"], ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=8"], paper=["1.42", "96.4%"]),
            Variant("dim_m12", ["Dim", "12"], ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=12"], paper=["1.26", "93.7%"]),
            Variant("dim_m16", ["Dim", "16"], ["tokenizer.fusion=concat", "tokenizer.pix_codes_per_group=16"], paper=["1.19", "79.3%"]),
        ],
        "Paper: trained and evaluated on ImageNet only.",
    ),
}

OUR_COLUMNS = ["rFID", "PSNR", "SSIM", "Sem usage", "Sub-code usage", "Teacher cos", "GFLOPs / img"]
LLM_FILE = "llm.json"  # a variant's finished LLM path, beside its tokenizer's metrics.json


def _apply(tok: TokenizerConfig, train: TokenizerTrainConfig, overrides: list[str]):
    """Copies of the two configs with `tokenizer.x=..` / `tokenizer_train.x=..` overrides applied."""
    tree = parse_overrides(overrides)
    unknown = sorted(set(tree) - {"tokenizer", "tokenizer_train"})
    if unknown:
        raise ValueError(f"ablation overrides may only touch tokenizer and tokenizer_train, got {unknown}")
    tok = from_dict(TokenizerConfig, deep_merge(dataclasses.asdict(tok), tree.get("tokenizer", {})), "tokenizer")
    train = from_dict(TokenizerTrainConfig, deep_merge(dataclasses.asdict(train), tree.get("tokenizer_train", {})), "tokenizer_train")
    return tok, train


@torch.no_grad()
def measure(model: SemHiTok, tok: TokenizerConfig, train: TokenizerTrainConfig, fid: bool = True) -> dict:
    """Held-out reconstruction metrics, codebook usage over every sample image (train + held-out) and the
    held-out teacher cosine of the semantic branch (teacher: as stage 1 built it from `tok`)."""
    model.eval()
    result = evaluate_reconstruction(model, train.holdout_data, fid=fid)
    # Usage over all sample images: the held-out set alone is too small to fill K * m ids. Sub-code usage
    # normalises by the groups that occur (distinct ids / (m * distinct semantic ids)): at a scale where most
    # of the K groups never occur it is the comparable figure to the paper's usage.
    # With pix_codebook=shared the ids are indices into one codebook of K * m codes, not semantic * m + pixel:
    # its sub-code usage is the share of those K * m codes that occur.
    sem_used, ids_used = set(), set()
    for _, images in iter_image_batches(list_images(train.train_data + train.holdout_data), model.image_size, 32):
        images = images.to(model.device)
        ids_used.update(model.encode(images).flatten().tolist())
        sem_used.update(model.semantic_ids(images).flatten().tolist())
    m = model.codes_per_group
    result["semantic_usage"] = len(sem_used) / model.config.sem_codebook_size
    shared = tok.pix_codebook == "shared"
    result["subcode_usage"] = None if m == 1 else len(ids_used) / (m * (model.config.sem_codebook_size if shared else len(sem_used)))
    result["gflops_per_image"] = forward_gflops(model)
    torch.manual_seed(train.seed)  # then built from the run's config, as stage 1 did: a random teacher comes out the same
    teacher = load_teacher(tok).to(model.device)
    holdout = ImageDataset(train.holdout_data, model.image_size)
    images = collate_images([holdout[i] for i in range(len(holdout))])[0].to(model.device)
    cosine, _ = distill_loss(model.semantic(images)[0], teacher_features(teacher, images, tok.distill_layer))
    result["teacher_cosine"] = 1 - float(cosine)
    return result


@torch.no_grad()
def forward_gflops(model: SemHiTok) -> float:
    """GFLOPs of one image through stage 2's training forward (semantic branch for the ids and codes, pixel
    branch: encoder, quantizer, decoder), counted by torch's FlopCounterMode (matmuls and convolutions). The
    variants differ here: "Len" decodes 2N tokens, "w/o sem" searches K * m codes per patch."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(1, 3, model.image_size, model.image_size, device=model.device)
    with FlopCounterMode(display=False) as counter:
        _, sem, _, q_sem = model.semantic(image, with_codes=True)
        model.pixel(image, sem, q_sem, 0.25)
    return counter.get_total_flops() / 1e9


def _trained_steps(run: Path) -> int | None:
    """The max_steps a tokenizer run directory was trained with (its run_config.json), None when unreadable."""
    try:
        return json.loads((run / "run_config.json").read_text())["train"]["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {"pct": f"{100 * value:.1f}%", "db": f"{value:.2f}", "3": f"{value:.3f}", "2": f"{value:.2f}"}[kind]


LLM_COLUMNS = ["World und. (ours)", "World gen. (ours)"]
LLM_NOTE = ("World und.: the variant's LLM's exact-match accuracy on the shapes world's held-out questions (in "
            "brackets: colour / shape questions); World gen.: the share of its images for the held-out prompts that "
            "pass the world's checker, the mean over the prompt categories (in brackets: single objects).")


def render(table: Table, results: dict[str, dict], budget: str, llm: bool = False) -> str:
    """The markdown table: the paper's leading columns, ours (with `llm`, the world scores of each variant's
    LLM, results[name]["llm"]), then the published numbers."""
    ours_head = OUR_COLUMNS + (LLM_COLUMNS if llm else [])
    head = table.columns + [f"{c} (ours)" for c in OUR_COLUMNS] + (LLM_COLUMNS if llm else []) + [f"{c} (paper)" for c in table.paper_columns]
    lines = [f"Table {table.number}: {table.title}. {budget}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for v in table.variants:
        r = results.get(v.name)
        ours = ["(not run)"] + [""] * (len(ours_head) - 1) if r is None else [
            _fmt(r.get("rfid"), "2"), _fmt(r["psnr"], "db"), _fmt(r["ssim"], "3"), _fmt(r["semantic_usage"], "pct"),
            _fmt(r["subcode_usage"], "pct"), _fmt(r["teacher_cosine"], "3"), _fmt(r.get("gflops_per_image"), "2")]
        if r is not None and llm:
            ours += ["(LLM not run)", ""] if r.get("llm") is None else world_cells(r["llm"]["scores"])
        lines.append("| " + " | ".join(v.cells + ours + v.paper) + " |")
    notes = [n for n in (LLM_NOTE if llm else "", table.note) if n]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def prepare_stage0(cfg) -> None:
    """What the variants train on and distil, made as `semhitok pipeline` makes it before its tokenizer: the
    shapes world (world.enabled) and the stage-0 SigLIP teacher (teacher_train.enabled). Either is kept when it
    exists, made with the same config (a pipeline run in the same run_dir shares them)."""
    if cfg.world.enabled:
        from semhitok.data_pipelines.world import write_world

        log.info("ablation: shapes world -> %s", cfg.world_dir)
        write_world(cfg.world, cfg.world_dir)
    if cfg.teacher_train.enabled:
        from semhitok.tokenizer.teacher import train_teacher

        log.info("ablation: stage 0, SigLIP teacher -> %s", cfg.teacher_dir)
        train_teacher(cfg.teacher_train, cfg.teacher_dir)


def _require_world(cfg) -> None:
    if not cfg.world.enabled:
        raise ValueError("the ablations' LLM columns are scores on the shapes world: use a config with "
                         "world.enabled=true (e.g. --config shapes), or --no-llm")


def variant_llm_config(cfg, tokenizer_dir: Path, out: Path):
    """A copy of the run's config whose LLM stages use the variant's tokenizer and write under `out`: the
    pre-tokenize sources encoded with tokenizer_dir into out/pretokenized, the LLM trained into out/mllm.
    Paths a preset names with "{run_dir}" (the world, the teacher) were expanded when the config loaded and
    stay the run's: every variant reads the same world."""
    if cfg.mllm_train.init_from:
        raise ValueError(f"mllm_train.init_from={cfg.mllm_train.init_from}: an ablation's LLM starts from base_model "
                         "with the variant's tokenizer (an export carries its own)")
    c = copy.deepcopy(cfg)
    c.run_dir = str(out)  # mllm_dir = out/mllm
    c.pretokenize.tokenizer = c.mllm_train.tokenizer = str(tokenizer_dir)
    c.pretokenize.output_dir = c.data.pretokenized = str(out / "pretokenized")
    return c


def train_and_score_llm(cfg, tokenizer_dir: Path, out: Path) -> dict:
    """The pipeline's downstream stages with one tokenizer, in this process: pre-tokenize the config's sources,
    train the LLM (resuming from its checkpoints; an existing export is kept), score it on the world
    (out/world_eval) -> {"world": score_world's result, "scores": world_scores, the budget, seconds}."""
    from semhitok.data_pipelines.pretokenize import run_pretokenize
    from semhitok.eval.world_eval import score_world
    from semhitok.mllm.sample import load_sampler
    from semhitok.mllm.train import train_mllm

    _require_world(cfg)
    start = time.time()
    c = variant_llm_config(cfg, tokenizer_dir, out)
    record_run(out, c, "ablate-llm")
    log.info("ablation LLM: pretokenize %s with %s -> %s", [s.name for s in c.pretokenize.sources], tokenizer_dir, c.pretokenized_dir)
    run_pretokenize(c.pretokenize, tokenizer_dir, c.pretokenized_dir)
    final = c.mllm_dir / "final"
    if (final / "semhitok_mllm.json").is_file():
        log.info("ablation LLM: trained already at %s", final)
    else:
        log.info("ablation LLM: %d steps -> %s", c.mllm_train.max_steps, c.mllm_dir)
        train_mllm(c)
    e = cfg.eval
    decoder, visual = load_sampler(final)
    world = score_world(decoder, visual, cfg.world_dir, out / "world_eval", e.sampling, e.world_questions_limit,
                        e.world_prompts_limit, e.batch_size)
    return {"world": world, "scores": world_scores(world, e.sampling.cfg_scale), "mllm_steps": c.mllm_train.max_steps,
            "mllm_micro_batch": c.data.micro_batch_size, "mllm_lr": c.mllm_train.lr, "seconds": round(time.time() - start, 1)}


def check_table(number: int, cfg, out: Path, stage1_steps: int, steps: int, only: list[str] | None = None,
                llm: bool = False) -> list[Variant]:
    """The variants run_table would train -> refuse (ValueError, one line) a request it cannot serve: an unknown
    table or variant, a joint row without stage-1 steps, LLM columns without the world, a stage 1 in `out` of
    another budget. The CLI calls this before it records anything."""
    if number not in TABLES:
        raise ValueError(f"--table must be one of {sorted(TABLES)}, got {number}")
    table = TABLES[number]
    variants = [v for v in table.variants if only is None or v.name in only]
    if only is not None and len(variants) != len(only):
        raise ValueError(f"unknown variant(s) {sorted(set(only) - {v.name for v in variants})}; "
                         f"table {number} has {[v.name for v in table.variants]}")
    if llm:
        _require_world(cfg)
    short = [v.name for v in variants if stage1_budget(v.stage1, stage1_steps, steps) < 1]
    if short:
        raise ValueError(f"{', '.join(short)}: its stage 1 runs --stage1-steps minus --steps ({stage1_steps} - {steps}) so "
                         f"that its semantic branch distils as many steps as the other rows'; pass --stage1-steps > --steps")
    for v in variants:
        stage1, n1 = out / f"stage1_{v.stage1}", stage1_budget(v.stage1, stage1_steps, steps)
        if not (out / v.name / "metrics.json").is_file() and (stage1 / "final" / "config.json").is_file() \
                and (had := _trained_steps(stage1)) != n1:
            raise ValueError(f"{stage1}: a stage 1 of {had} steps, this table asks for {n1}: use another --out, "
                             f"or --stage1-steps to match")
    return variants


def run_table(number: int, cfg, out: Path, stage1_steps: int, steps: int, only: list[str] | None = None,
              fid: bool = True, llm: bool = False) -> Path:
    """Train and measure every variant of table `number` (or those named in `only`) from the run's config
    `cfg` (ProjectConfig; the variants override its tokenizer and tokenizer_train); with `llm`, each variant's
    LLM too (train_and_score_llm). Writes <out>/table<N>.md, after every variant."""
    variants = check_table(number, cfg, out, stage1_steps, steps, only, llm)
    table = TABLES[number]
    tok, train = cfg.tokenizer, cfg.tokenizer_train
    out.mkdir(parents=True, exist_ok=True)
    prepare_stage0(cfg)
    joint = any(v.stage1 == JOINT_STAGE1 for v in variants)
    budget = (f"Each variant: stage 1 {stage1_steps} steps (shared{'; the joint row ' + str(stage1_steps - steps) + ' then ' + str(steps) + ' of joint distillation in stage 2' if joint else ''}), "
              f"stage 2 {steps} steps, batch {train.batch_size}, lr {train.lr}; metrics on "
              f"{len(list_images(train.holdout_data))} held-out images; GFLOPs: one image through stage 2's forward.")
    if llm:
        e = cfg.eval
        budget += (f" Then its LLM: {cfg.mllm_train.max_steps} steps, micro-batch {cfg.data.micro_batch_size}, lr "
                   f"{cfg.mllm_train.lr}; world scores on {e.world_questions_limit or 'all'} held-out questions and "
                   f"{e.world_prompts_limit or 'all'} prompts per category, generation at CFG {e.sampling.cfg_scale:g}.")
    path = out / f"table{number}.md"

    def finished() -> dict[str, dict]:
        results = {}
        for v in table.variants:
            if (f := out / v.name / "metrics.json").is_file():
                results[v.name] = json.loads(f.read_text())
                if llm and (g := out / v.name / LLM_FILE).is_file():
                    results[v.name]["llm"] = json.loads(g.read_text())
        return results

    for v in variants:
        done = out / v.name / "metrics.json"
        if done.is_file():
            log.info("ablation %s: done already (%s)", v.name, done)
            old = json.loads(done.read_text())
            if (old.get("stage1_steps"), old.get("steps"), old.get("batch_size")) != (stage1_steps, steps, train.batch_size):
                log.warning("ablation %s was trained at another budget (stage 1 %s, stage 2 %s steps, batch %s): delete "
                            "%s to retrain it", v.name, old.get("stage1_steps"), old.get("steps"), old.get("batch_size"), done.parent)
        else:
            start = time.time()
            tok1, train1 = _apply(tok, train, STAGE1[v.stage1])
            stage1 = out / f"stage1_{v.stage1}"
            n1 = stage1_budget(v.stage1, stage1_steps, steps)
            if not (stage1 / "final" / "config.json").is_file():  # (one of another budget: refused by check_table)
                log.info("ablation: stage 1 (%s, %d steps) -> %s", v.stage1, n1, stage1)
                train_tokenizer(tok1, dataclasses.replace(train1, stage=1, max_steps=n1), stage1)
            tok2, train2 = _apply(tok, train, STAGE1[v.stage1] + v.overrides + FIXED_STAGE2)
            log.info("ablation %s: stage 2 %s", v.name, v.overrides)
            model = train_tokenizer(tok2, dataclasses.replace(train2, stage=2, max_steps=steps), out / v.name, stage1 / "final")
            result = {**measure(model, tok2, train2, fid), "variant": v.name, "overrides": v.overrides,
                      "stage1_steps": stage1_steps, "steps": steps, "batch_size": train.batch_size, "lr": train.lr,
                      "seconds": round(time.time() - start, 1)}
            write_json(done, result)
            path.write_text(render(table, finished(), budget, llm))  # after every variant: a partial table to read
        if llm:
            llm_done = out / v.name / LLM_FILE
            if llm_done.is_file():
                old = json.loads(llm_done.read_text())
                log.info("ablation %s: LLM done already (%s)", v.name, llm_done)
                if old.get("mllm_steps") != cfg.mllm_train.max_steps:
                    log.warning("ablation %s's LLM was trained %s steps, not %s: delete %s and %s to retrain it", v.name,
                                old.get("mllm_steps"), cfg.mllm_train.max_steps, llm_done, out / v.name / "llm")
            else:
                log.info("ablation %s: the LLM path with %s", v.name, out / v.name / "final")
                write_json(llm_done, train_and_score_llm(cfg, out / v.name / "final", out / v.name / "llm"))
                path.write_text(render(table, finished(), budget, llm))
    path.write_text(render(table, finished(), budget, llm))
    return path
