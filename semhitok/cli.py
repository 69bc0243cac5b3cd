"""The `semhitok` command: a thin layer over the library, one subcommand per job.

    semhitok pipeline --config tiny                     # the whole path on the shipped sample
    semhitok tokenizer train --config tiny --stage 1 [key.sub=value ...]
    semhitok tokenizer encode|decode|reconstruct|eval ...
    semhitok pretokenize --config tiny                  # corpora -> sharded visual ids (resumable)
    semhitok train --config tiny                        # the unified LLM (DeepSpeed; torchrun for many ranks)
    semhitok sample --model DIR --prompt "a red bus"    # CFG text-to-image
    semhitok eval --model DIR                           # POPE, GenEval, gFID, tokenizer metrics
    semhitok chat --model DIR                           # web demo
    semhitok ask --model DIR --image PATH "What color is the circle?"   # one answer, printed
    semhitok push --model DIR --repo ORG/NAME           # upload an export to the Hugging Face Hub
    semhitok config --config 256 [key.sub=value ...]    # print the resolved config

Presets are bare names (`tiny`, `256`, `384`, `recipes/...`) read from the package's configs folder
(semhitok.CONFIG_DIR); anything with a suffix or a slash is a YAML path. Every job writes config.yaml,
run.json and runs.jsonl into its run directory (semhitok.common.run_dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("semhitok")
DEFAULT_PRESET = "tiny"


class TqdmLogHandler(logging.Handler):
    """Log records through tqdm.write, so they print above progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def _config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    p.add_argument("--config", default=default,
                   help="preset name (tiny, 256, 384; `semhitok config --list`) or a YAML path (suffix or slash)"
                   + ("" if default else "; default: the config recorded in the model's run directory, else tiny"))
    p.add_argument("overrides", nargs="*", default=[], help="config overrides such as tokenizer_train.max_steps=100")


def _load(args, model_kind: str | None = None):
    from semhitok.config import load_project_config

    return load_project_config(args.config, args.overrides, model_kind)


def _model_kind(model_dir: str | Path) -> str:
    """The tokenizer kind a local model export records (semhitok_mllm.json), read without loading it."""
    from semhitok.mllm.model import saved_ids

    return saved_ids(model_dir).kind


def _record(job_dir, cfg, job: str, args) -> None:
    """config.yaml, run.json and runs.jsonl in job_dir (semhitok.common.run_dir)."""
    from semhitok.common.run_dir import record_run

    record_run(job_dir, cfg, job, getattr(args, "config", None), getattr(args, "overrides", None))


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (None: cuda when available, else cpu)")


def check_device(device: str | None) -> None:
    """A --device this torch can use, checked before a command writes or loads anything."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU "
                         "(torch.cuda.is_available() is False); pass --device cpu, or leave --device out")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


MAX_BATCH = 4096  # --batch-size of every command: images held on the device together


def check_flag(value, lo, hi, flag: str) -> None:
    """A numeric flag within [lo, hi] (ValueError naming the flag; NaN and infinities never lie in a range)."""
    if not lo <= value <= hi:
        raise ValueError(f"{flag}: must lie in [{lo}, {hi}], got {value!r}")


def _model_dir(name_or_path: str) -> Path:
    """--model: a directory, or a Hub id (org/name) fetched into huggingface_hub's cache."""
    from semhitok.common.hub import resolve_pretrained

    return resolve_pretrained(name_or_path)


def cmd_config(args) -> None:
    import yaml

    from semhitok import CONFIG_DIR
    from semhitok.common.config_io import list_presets, resolve_preset
    from semhitok.common.run_dir import plain

    if args.list:
        print(f"presets in {CONFIG_DIR}: {', '.join(list_presets())}")
        return
    print(f"# {resolve_preset(args.config)}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""))
    print(yaml.safe_dump(plain(_load(args)), sort_keys=False), end="")


# -- tokenizer ---------------------------------------------------------------------------------------
def cmd_tokenizer_train(args) -> None:
    import dataclasses

    from semhitok.tokenizer.kinds import kind_trainer
    from semhitok.tokenizer.semhitok.train import check_resumes, stage_dirs, train_tokenizer
    from semhitok.tokenizer.trainer import check_resume

    cfg = _load(args)
    if args.stage is None:  # every stage of tokenizer.kind, through its registered trainer
        if cfg.tokenizer.kind == "semhitok":
            check_resumes(cfg)  # a refused resume records nothing (the other kinds' trainers refuse after it)
        _record(Path(cfg.run_dir) / "tokenizer", cfg, f"tokenizer-{cfg.tokenizer.kind}", args)
        log.info("%s tokenizer done: %s", cfg.tokenizer.kind, kind_trainer(cfg.tokenizer.kind)[0](cfg))
        return
    if cfg.tokenizer.kind != "semhitok":
        raise ValueError(f"--stage is SemHiTok's; tokenizer.kind={cfg.tokenizer.kind!r} trains all its stages without it")
    cfg.tokenizer_train.stage = args.stage
    out, init_from = stage_dirs(cfg.run_dir, args.stage, cfg.tokenizer_train)
    check_resume(out, args.stage, dataclasses.asdict(cfg.tokenizer))
    _record(out, cfg, f"tokenizer-stage{args.stage}", args)
    train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, out, init_from)
    log.info("stage %d done: %s", args.stage, out / "final")


def cmd_tokenizer_encode(args) -> None:
    import numpy as np

    from semhitok.common.io import check_output_dir
    from semhitok.tokenizer import encode_paths, list_images, load_tokenizer

    check_flag(args.batch_size, 1, MAX_BATCH, "--batch-size")
    out = Path(args.out if args.out.endswith(".npz") else f"{args.out}.npz")  # (what np.savez writes)
    if Path(args.out).is_dir() or out.is_dir():
        raise ValueError(f"--out {args.out}: a folder; pass the .npz file to write (e.g. {Path(args.out) / 'ids.npz'})")
    check_output_dir(out.parent, "--out's folder")
    paths = list_images(args.inputs)
    model = load_tokenizer(args.model, args.device)
    kept, ids = encode_paths(model, paths, args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, ids=ids.numpy().astype(np.int32), paths=np.array([str(p) for p in kept]))
    print(f"{len(kept)} images -> ids {list(ids.shape)}, code vocabularies {list(model.code_vocab_sizes)} -> {out}")


def cmd_tokenizer_decode(args) -> None:
    import numpy as np
    import torch

    from semhitok.common.io import check_output_dir
    from semhitok.tokenizer import load_tokenizer, to_pil

    check_flag(args.batch_size, 1, MAX_BATCH, "--batch-size")
    check_output_dir(args.out, "--out")  # (a file there: one line before the work, not FileExistsError after it)
    if Path(args.ids).exists() and not Path(args.ids).is_file():  # a FIFO would block np.load forever
        raise ValueError(f"--ids {args.ids}: not a regular file (write one with `semhitok tokenizer encode`)")
    try:
        data = np.load(args.ids, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{args.ids}: not a readable .npz ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile) or "ids" not in data:
        raise ValueError(f"{args.ids}: no 'ids' array (write it with `semhitok tokenizer encode`)")
    raw = data["ids"]
    if raw.ndim not in (3, 4) or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{args.ids}: ids must be an integer array [N, h, w] (or [N, h, w, L]), got {raw.dtype} {list(raw.shape)}")
    ids = torch.from_numpy(raw.astype(np.int64))
    names = [Path(str(p)).stem for p in data["paths"]] if "paths" in data else [f"{i:05d}" for i in range(len(ids))]
    if len(names) != len(ids):
        raise ValueError(f"{args.ids}: {len(names)} paths for {len(ids)} id maps")
    used: set[str] = set()
    for i, name in enumerate(names):  # two inputs with one stem: both kept, the later ones numbered
        final, n = name, 0
        while not final or final in used:
            n += 1
            final = f"{name}_{n}"
        names[i] = final
        used.add(final)
    model = load_tokenizer(args.model, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(ids), args.batch_size):
        images = model.decode(ids[start : start + args.batch_size].to(model.device))
        for name, image in zip(names[start : start + args.batch_size], images, strict=True):
            to_pil(image).save(out / f"{name}.png")
    print(f"{len(ids)} images -> {out}")


def cmd_tokenizer_reconstruct(args) -> None:
    from semhitok.common.io import check_output_dir
    from semhitok.tokenizer import list_images, load_tokenizer, reconstruct_to_dir

    check_flag(args.batch_size, 1, MAX_BATCH, "--batch-size")
    check_output_dir(args.out, "--out")
    model = load_tokenizer(args.model, args.device)
    grid = reconstruct_to_dir(model, list_images(args.inputs), Path(args.out), args.batch_size, args.grid)
    print(f"side-by-side PNGs (input above reconstruction) -> {args.out}; overview: {grid}")


def cmd_tokenizer_eval(args) -> None:
    from semhitok.common.io import check_output_dir, write_json
    from semhitok.eval.recon import evaluate_reconstruction
    from semhitok.tokenizer import load_tokenizer

    inputs = list(args.inputs)
    if not inputs:
        raise ValueError("tokenizer eval: give images, folders or jsonl files (as for `semhitok tokenizer encode`)")
    check_flag(args.batch_size, 1, MAX_BATCH, "--batch-size")
    if args.json and Path(args.json).is_dir():  # before the evaluation runs, not after
        raise ValueError(f"--json {args.json}: a folder; pass the file to write (e.g. {Path(args.json) / 'eval.json'})")
    if args.json:
        check_output_dir(Path(args.json).parent, "--json's folder")
    model = load_tokenizer(args.model, args.device)
    result = evaluate_reconstruction(model, inputs, args.batch_size, fid=not args.no_fid)
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))


# -- data ------------------------------------------------------------------------------------------
def cmd_pretokenize(args) -> None:
    from semhitok.data_pipelines.pretokenize import check_resume, run_pretokenize

    cfg = _load(args)
    check_resume(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir)  # a refused resume records nothing
    _record(cfg.pretokenized_dir, cfg, "pretokenize", args)
    summary = run_pretokenize(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir,
                              args.num_shards, args.shard_index, args.device)
    print(json.dumps(summary))


# -- mllm ------------------------------------------------------------------------------------------
def cmd_train(args) -> None:
    from semhitok.mllm.train import check_resume, train_mllm

    cfg = _load(args)
    check_resume(cfg)  # a refused resume records nothing
    _record(cfg.mllm_dir, cfg, "mllm-train", args)
    print(f"exported: {train_mllm(cfg)}")


class SamplingDefault:
    """A flag's default that is SamplingConfig's field of that name, looked up only when help is printed
    (importing the sampler pulls in torch and transformers)."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        from semhitok.mllm.config import SamplingConfig

        return f"{getattr(SamplingConfig(), self.name)!r} (SamplingConfig.{self.name})"


def _sampling(args, kind: str | None = None):
    """The flags given on the command line, the other fields SamplingConfig's defaults, except cfg_scale: without
    --cfg-scale, the paper's of tokenizer kind `kind` (the model's; None: SamplingConfig's, to check the flags)."""
    import dataclasses

    from semhitok.mllm.config import SamplingConfig
    from semhitok.mllm.sample import kind_sampling

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)
             if not isinstance(getattr(args, f.name), SamplingDefault)}
    return kind_sampling(kind, **given) if kind else SamplingConfig(**given)


def _sampling_args(p, seed_default, seed_help: str) -> None:
    """The image sampling flags (sample, chat)."""
    p.add_argument("--cfg-scale", type=float, default=SamplingDefault("cfg_scale"),
                   help="classifier-free guidance scale, 0 to 100 (1: off; 0: unconditional); default: the model's "
                   "tokenizer kind's paper's CFG (SemHiTok 2, DualToken 3, TokLIP 2.5)")
    p.add_argument("--temperature", type=float, default=SamplingDefault("temperature"), help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=SamplingDefault("top_k"), help="keep the k most likely ids (0: off)")
    p.add_argument("--top-p", type=float, default=SamplingDefault("top_p"), help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=seed_default, help=seed_help)


COMPILE_HELP = "compile the decoding step (CUDA graphs on GPUs): a one-off compilation per batch size, then fast steps"


def cmd_sample(args) -> None:
    import dataclasses

    from semhitok.common.run_dir import record_run
    from semhitok.mllm.config import MAX_SAMPLES_PER_PROMPT
    from semhitok.mllm.sample import load_sampler, read_prompts, sample_images

    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)  # "": the unconditional prompt
    sampling = _sampling(args)  # checked before the model is resolved (perhaps downloaded) and loaded
    check_flag(args.samples_per_prompt, 1, MAX_SAMPLES_PER_PROMPT, "--samples-per-prompt")  # (sample.py's bound)
    check_flag(args.batch_size, 1, MAX_BATCH, "--batch-size")
    args.model = str(_model_dir(args.model))
    sampling = _sampling(args, _model_kind(args.model))  # without --cfg-scale: the model's kind's paper's CFG
    record_run(args.out, {"model": str(Path(args.model).resolve()), "prompt": args.prompt, "prompts": args.prompts,
                          "sampling": dataclasses.asdict(sampling), "batch_size": args.batch_size,
                          "samples_per_prompt": args.samples_per_prompt}, "sample")
    decoder, visual = load_sampler(args.model, args.device, args.compile)
    grid = sample_images(decoder, visual, prompts, args.out, sampling, args.batch_size, args.samples_per_prompt)
    print(f"{len(prompts) * args.samples_per_prompt} images -> {Path(args.out) / 'images'}; overview: {grid}")


def cmd_eval(args) -> None:
    from semhitok.common.model_card import eval_dir
    from semhitok.common.run_dir import find_run_config
    from semhitok.eval.summary import evaluate_model, runnable

    args.model = str(_model_dir(args.model))
    if args.config is None:
        recorded = find_run_config(args.model)
        if recorded is None:
            log.warning("no config.yaml recorded beside %s: using the %s preset's eval settings (pass --config)",
                        args.model, DEFAULT_PRESET)
        else:
            log.info("config: %s (recorded by the run that trained %s)", recorded, args.model)
        args.config = str(recorded or DEFAULT_PRESET)
    if not (checked := _load(args)).eval.allow_skip:  # a requested benchmark without data fails first, naming it
        runnable(checked.eval, {})
    cfg = _load(args, _model_kind(args.model))  # eval.sampling.cfg_scale, unless set: the model's kind's paper's
    out = Path(args.out) if args.out else eval_dir(args.model)
    _record(out, cfg, "eval", args)
    evaluate_model(args.model, cfg.eval, out, args.device)
    print((out / "summary.md").read_text())
    print(f"summary: {out / 'summary.json'}")


def cmd_chat(args) -> None:
    from semhitok.mllm.chat import ChatEngine, ChatLimits
    from semhitok.mllm.chat_app import chat_examples, check_page, serve
    from semhitok.mllm.config import SamplingConfig
    from semhitok.mllm.sample import load_sampler

    random_seed = args.seed is None  # no --seed: a fresh seed for every picture
    if random_seed:
        args.seed = SamplingDefault("seed")
    # every flag checked before the model is resolved and loaded
    sampling, answer = _sampling(args), SamplingConfig(temperature=args.answer_temperature)
    limits = ChatLimits(args.max_upload_mb, args.max_pixels, args.max_new_tokens)
    check_page(sampling.cfg_scale, sampling.temperature, sampling.top_k, sampling.top_p, answer.temperature, sampling.seed,
               args.queue_size)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: must lie in [0, 65535], got {args.port}")
    args.model = str(_model_dir(args.model))
    sampling = _sampling(args, _model_kind(args.model))  # without --cfg-scale: the model's kind's paper's CFG
    decoder, visual = load_sampler(args.model, args.device, args.compile)
    engine = ChatEngine(decoder, visual, int(limits.max_upload_mb * 2**20), limits.max_pixels, sampling,
                        max_new_tokens=limits.max_new_tokens, answer_sampling=answer)
    examples = chat_examples(run_world(args.model), model=args.model)
    log.info("chat examples: %s", examples.source or "none")
    print(f"chat on http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    serve(engine, args.host, args.port, random_seed, args.queue_size, examples=examples)


def run_world(model: str | Path) -> Path | None:
    """The shapes world of the run that trained `model` (its recorded config's world_dir, found as `eval` finds
    the config; else a world/ folder beside the model or up to two levels above), when it has one."""
    from semhitok.common.config_io import ConfigError
    from semhitok.common.run_dir import find_run_config
    from semhitok.config import load_project_config

    model = Path(model).resolve()
    candidates = [model.parent / "world", model.parent.parent / "world"]
    recorded = find_run_config(model)
    if recorded is not None:
        try:
            candidates.insert(0, load_project_config(recorded).world_dir)
        except ConfigError as err:
            log.warning("%s: %s (looking for the run's world beside the model instead)", recorded, err)
    return next((w for w in candidates if (w / "questions.jsonl").is_file() and (w / "prompts.jsonl").is_file()), None)


def cmd_ask(args) -> None:
    from semhitok.mllm.ask import ask, read_image
    from semhitok.mllm.config import SamplingConfig
    from semhitok.mllm.sample import load_sampler

    if len(args.image) > 1:
        raise ValueError(f"{len(args.image)} --image flags: a question is about one image (the chat prompt holds one)")
    image = read_image(args.image[0]) if args.image else None  # checked before the model is resolved and loaded
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    decoder, visual = load_sampler(args.model, args.device)
    print(ask(decoder, visual, args.question, image, sampling, args.max_new_tokens))


def cmd_push(args) -> None:
    """Upload an export with its model card refreshed (metrics of its eval summary, the repo id); the export's
    README.md becomes that card once the upload succeeded."""
    from semhitok.common.hub import push_export
    from semhitok.common.io import read_json
    from semhitok.tokenizer.kinds import KINDS

    model = Path(args.model)
    if (model / "semhitok_mllm.json").is_file():
        from semhitok.mllm.hf_export import write_mllm_card as write_card
    elif (model / "config.json").is_file() and isinstance(meta := read_json(model / "config.json"), dict) \
            and meta.get("model_type") in KINDS:  # a tokenizer of any kind
        from semhitok.tokenizer.hub import write_tokenizer_card as write_card
    else:
        raise FileNotFoundError(f"{model}: not a semhitok export (no semhitok_mllm.json, no tokenizer config.json of a "
                                f"kind in {sorted(KINDS)})")
    url, card = push_export(model, args.repo, write_card, private=args.private or None, token=args.token)
    print(f"{model} -> {args.repo} ({card.name} refreshed): {url}")


# -- ablations ---------------------------------------------------------------------------------------
def cmd_ablate(args) -> None:
    from semhitok.eval.ablate import check_table, default_stage1_steps, run_table

    cfg = _load(args)
    t = cfg.tokenizer_train
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "ablate" / f"table{args.table}"
    llm = cfg.world.enabled if args.llm is None else args.llm
    only = args.only.split(",") if args.only else None
    steps = args.steps or t.max_steps
    stage1 = args.stage1_steps or default_stage1_steps(args.table, only, t.max_steps, steps)
    check_table(args.table, cfg, out, stage1, steps, only, llm)  # a refused request records nothing
    _record(out, cfg, "ablate", args)
    path = run_table(args.table, cfg, out, stage1, steps, only, fid=not args.no_fid, llm=llm)
    print(path.read_text())
    print(f"table: {path}")


def _ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's tokenizer ablations (Tables 4, 5): train each variant, write the table",
                       description="Train every variant of the paper's Table 4 (design choices) or Table 5 (fusion type, "
                       "sub-codebook size)\nat one budget, measure each on the held-out images (rFID, PSNR, SSIM, "
                       "codebook usage) and write\n<out>/table<N>.md beside the paper's numbers; with --llm each "
                       "variant's LLM is trained and scored\non the shapes world too. Finished variants are not rerun.",
                       formatter_class=HelpFormatter)
    p.add_argument("--table", type=int, choices=(4, 5), required=True, help="the paper's table to reproduce (4 or 5)")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/ablate/table<N>); reruns skip finished variants")
    p.add_argument("--stage1-steps", type=int, default=None,
                   help="stage-1 steps (default: tokenizer_train.max_steps; with table 4's joint row that plus --steps, "
                   "since the joint row's own stage 1 is --stage1-steps minus --steps)")
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps per variant (default: tokenizer_train.max_steps)")
    p.add_argument("--only", default=None, help="comma-separated variants to run (names as in the output folders)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    p.add_argument("--llm", action=argparse.BooleanOptionalAction, default=None,
                   help="also train each variant's LLM (the config's pretokenize sources and mllm_train schedule) and "
                   "score it on the shapes world: understanding and generation accuracy columns (default: on when the "
                   "config has world.enabled)")
    _config_args(p)
    p.set_defaults(func=cmd_ablate)


# -- comparison --------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from semhitok.eval.compare import run_comparison

    cfg = _load(args)  # the config and overrides are checked before any kind runs
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "compare"
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    _record(out, cfg, "compare", args)
    report = run_comparison(args.config, args.overrides, out, kinds, fid=not args.no_fid, figure_images=args.figure_images)
    print((out / "compare.md").read_text())
    print(f"table: {out / 'compare.md'} (and compare.json); reconstructions side by side: {out / 'compare.png'}")
    failed = [kind for kind, row in report["kinds"].items() if row.get("errors")]
    if failed:
        print(f"semhitok: error: {len(failed)} of {len(report['kinds'])} kinds failed ({', '.join(failed)}): see their "
              "rows; a rerun retries them and skips the finished ones", file=sys.stderr)
        return 1
    return 0


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="every tokenizer kind through the same pipeline at equal budget: a side-by-side table",
                       description="Run `semhitok pipeline` once per tokenizer kind (same config and overrides, "
                       "run_dir=<out>/<kind>, tokenizer.kind=<kind>),\nmeasure each on the held-out images and write "
                       "<out>/compare.md, compare.json and compare.png.\nFinished kinds are not rerun.",
                       formatter_class=HelpFormatter)
    p.add_argument("--kinds", default=None, help="comma-separated tokenizer kinds (None: every registered kind)")
    p.add_argument("--out", default=None, help="output folder, a run directory per kind inside (None: <run_dir>/compare)")
    p.add_argument("--figure-images", type=int, default=8, help="held-out images in compare.png")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    _config_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_pipeline(args) -> None:
    from semhitok.pipeline import run_pipeline

    run_pipeline(_load(args), args.config, args.overrides)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """A flag's help ends with its default, except where there is none to show (a required flag, None, an empty
    list: the help says what None means) or the help already names it; descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from semhitok import __version__

    parser = argparse.ArgumentParser(prog="semhitok", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, help: str, func) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command(sub, "pipeline", "run the whole path end to end (default: tiny preset on the shipped sample)", cmd_pipeline)
    _config_args(p)

    p = command(sub, "config", "print the resolved config of a preset plus overrides (YAML, loadable with --config)", cmd_config)
    _config_args(p)
    p.add_argument("--list", action="store_true", help="list the shipped presets instead")

    p = command(sub, "pretokenize", "encode image-text corpora into sharded id files (resumable)", cmd_pretokenize)
    _config_args(p)
    p.add_argument("--num-shards", type=int, default=None, help="jobs splitting the work (None: from SLURM, else 1)")
    p.add_argument("--shard-index", type=int, default=None, help="this job's index in [0, num-shards) (None: from SLURM, else 0)")
    _device_arg(p)

    p = command(sub, "train", "train the unified LLM with DeepSpeed (run under torchrun for several ranks)", cmd_train)
    _config_args(p)

    p = command(sub, "sample", "text-to-image with classifier-free guidance", cmd_sample)
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final) or a Hub id (org/name)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help=".txt (a prompt per line) or .jsonl (prompt/caption/text field)")
    p.add_argument("--out", required=True, help="output folder (images/, prompts.jsonl, grid.png, config.yaml, run.json)")
    _sampling_args(p, SamplingDefault("seed"), "an image depends on (seed, prompt, sample index) only, not on the batch")
    p.add_argument("--batch-size", type=int, default=8, help="images decoded together, 1 to 4096 (does not change them)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="images per prompt, 1 to 10,000")
    _device_arg(p)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)

    p = command(sub, "eval", "every score of a model: POPE, GenEval, gFID, tokenizer reconstruction", cmd_eval)
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final) or a Hub id (org/name)")
    p.add_argument("--out", default=None, help="output folder; lmms-eval scores under <out>/lmms_eval join the table "
                   "(None: <run>/mllm/eval for <run>/mllm/final, else <model>-eval; where eval/run_lmms.sh writes)")
    _device_arg(p)
    _config_args(p, default=None)

    p = command(sub, "chat", "web chat demo: ask about an uploaded image, or ask for one", cmd_chat)
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final) or a Hub id (org/name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface, no authentication)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (up to 1024)")
    p.add_argument("--max-pixels", type=int, default=36_000_000,
                   help="largest accepted image in pixels (up to the image encoder's limit, 36,000,000)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (the page's answer length slider "
                   "goes up to it)")
    p.add_argument("--answer-temperature", type=float, default=0.0, help="answers' sampling temperature, 0 to 2 (0: greedy)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the model, 1 to 1000 (more are refused)")
    _sampling_args(p, None, "the page's starting seed for pictures (None: a fresh random seed for every picture)")
    _device_arg(p)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)

    p = command(sub, "ask", "answer one question about an image (or a text-only one) and print the answer", cmd_ask)
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final) or a Hub id (org/name)")
    p.add_argument("--image", action="append", default=[], help="the image the question is about (none: a text-only question)")
    p.add_argument("question", help='the question, e.g. "What color is the circle?"')
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (with --temperature above 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens")
    _device_arg(p)

    p = command(sub, "push", "upload an MLLM or tokenizer export to the Hugging Face Hub (its model card refreshed)", cmd_push)
    p.add_argument("--model", required=True, help="an export directory (<run_dir>/mllm/final or a tokenizer's final/)")
    p.add_argument("--repo", required=True, help="Hub repo id, org/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`'s)")

    _ablate_parser(sub)
    _compare_parser(sub)

    tok = sub.add_parser("tokenizer", help="the visual tokenizer (tokenizer.kind): train, encode, decode, reconstruct, eval",
                         description="the visual tokenizer (tokenizer.kind): train, encode, decode, reconstruct, eval",
                         formatter_class=HelpFormatter)
    tok = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = command(tok, "train", "train (or resume) the tokenizer of tokenizer.kind (SemHiTok: one --stage)", cmd_tokenizer_train)
    p.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="SemHiTok's stage, 1: semantic codebook; 2: pixel sub-codebooks (default: every stage of tokenizer.kind)")
    _config_args(p)

    def model_args(p):
        p.add_argument("--model", required=True, help="tokenizer directory (save_pretrained output) or a Hub id (org/name)")
        _device_arg(p)
        p.add_argument("--batch-size", type=int, default=32, help="images per forward pass, 1 to 4096")

    inputs_help = "image files, folders of images, or .jsonl files with an `image` field"
    p = command(tok, "encode", "image files/folders -> ids .npz", cmd_tokenizer_encode)
    model_args(p)
    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--out", required=True, help="output .npz (arrays: ids [N, h, w] int32, paths)")

    p = command(tok, "decode", "ids .npz -> PNG images", cmd_tokenizer_decode)
    model_args(p)
    p.add_argument("--ids", required=True, help="an .npz written by `semhitok tokenizer encode`")
    p.add_argument("--out", required=True, help="output folder")

    p = command(tok, "reconstruct", "encode+decode images, write input-vs-reconstruction PNGs", cmd_tokenizer_reconstruct)
    model_args(p)
    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid", type=int, default=8, help="images in the overview grid.png")

    p = command(tok, "eval", "PSNR, SSIM, codebook usage, rFID on images", cmd_tokenizer_eval)
    model_args(p)
    p.add_argument("inputs", nargs="*", default=[], help=inputs_help)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    return parser


def main(argv: list[str] | None = None) -> int:
    handler = TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = build_parser().parse_args(argv)
    from semhitok.common.config_io import ConfigError
    from semhitok.common.hub import PushFailed
    from semhitok.data_pipelines.text_tokenizer import TextTokenizerUnavailable
    from semhitok.common.metrics_log import NonFiniteLoss
    from semhitok.common.hub import WeightsUnavailable

    try:
        check_device(getattr(args, "device", None))
        code = args.func(args)
    except (ConfigError, WeightsUnavailable, TextTokenizerUnavailable, NonFiniteLoss, PushFailed, FileNotFoundError,
            ValueError) as err:
        print(f"semhitok: error: {err}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
