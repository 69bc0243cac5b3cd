"""The `semhitok` command: a thin layer over the library, one subcommand per job.

    semhitok pipeline --config tiny                     # the whole path on the shipped sample
    semhitok tokenizer train --config tiny --stage 1 [key.sub=value ...]
    semhitok tokenizer encode|decode|reconstruct|eval ...
    semhitok pretokenize --config tiny                  # corpora -> sharded visual ids (resumable)
    semhitok train --config tiny                        # the unified LLM (DeepSpeed; torchrun for many ranks)
    semhitok sample --model DIR --prompt "a red bus"    # CFG text-to-image
    semhitok eval --model DIR --config tiny             # POPE, GenEval, gFID, tokenizer metrics
    semhitok chat --model DIR                           # web demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("semhitok")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name under configs/ (tiny, 256, 384) or a YAML path")
    p.add_argument("overrides", nargs="*", help="config overrides such as tokenizer_train.max_steps=100")


def _load(args):
    from semhitok.config import load_project_config

    return load_project_config(args.config, args.overrides)


# -- tokenizer ---------------------------------------------------------------------------------------
def cmd_tokenizer_train(args) -> None:
    from semhitok.tokenizer.train import stage_dirs, train_tokenizer

    cfg = _load(args)
    cfg.tokenizer_train.stage = args.stage
    out, init_from = stage_dirs(cfg.run_dir, args.stage, cfg.tokenizer_train)
    train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, out, init_from)
    log.info("stage %d done: %s", args.stage, out / "final")


def cmd_tokenizer_encode(args) -> None:
    import numpy as np

    from semhitok.tokenizer import encode_paths, list_images, load_tokenizer

    model = load_tokenizer(args.model, args.device)
    kept, ids = encode_paths(model, list_images(args.inputs), args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, ids=ids.numpy().astype(np.int32), paths=np.array([str(p) for p in kept]))
    print(f"{len(kept)} images -> ids {list(ids.shape)} in [0, {model.vocab_size}) -> {out}")


def cmd_tokenizer_decode(args) -> None:
    import numpy as np
    import torch

    from semhitok.tokenizer import load_tokenizer, to_pil

    try:
        data = np.load(args.ids, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{args.ids}: not a readable .npz ({err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile) or "ids" not in data:
        raise ValueError(f"{args.ids}: no 'ids' array (write it with `semhitok tokenizer encode`)")
    raw = data["ids"]
    if raw.ndim != 3 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{args.ids}: ids must be an integer array [N, h, w], got {raw.dtype} {list(raw.shape)}")
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
    from semhitok.tokenizer import list_images, load_tokenizer, reconstruct_to_dir

    model = load_tokenizer(args.model, args.device)
    grid = reconstruct_to_dir(model, list_images(args.inputs), Path(args.out), args.batch_size, args.grid)
    print(f"side-by-side PNGs (input above reconstruction) -> {args.out}; overview: {grid}")


def cmd_tokenizer_eval(args) -> None:
    from semhitok.common.io import write_json
    from semhitok.eval.recon import evaluate_reconstruction
    from semhitok.tokenizer import load_tokenizer

    model = load_tokenizer(args.model, args.device)
    result = evaluate_reconstruction(model, args.images, args.batch_size, fid=not args.no_fid)
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))


# -- data ------------------------------------------------------------------------------------------
def cmd_pretokenize(args) -> None:
    from semhitok.data_pipelines.pretokenize import run_pretokenize

    cfg = _load(args)
    summary = run_pretokenize(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir,
                              args.num_shards, args.shard_index, args.device)
    print(json.dumps(summary))


# -- mllm ------------------------------------------------------------------------------------------
def cmd_train(args) -> None:
    from semhitok.mllm.train import train_mllm

    cfg = _load(args)
    print(f"exported: {train_mllm(cfg)}")


def _sampling(args):
    """SamplingConfig defaults, with the flags given on the command line."""
    import dataclasses

    from semhitok.mllm.sample import SamplingConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig) if getattr(args, f.name) is not None}
    return SamplingConfig(**given)


COMPILE_HELP = "compile the decoding step (CUDA graphs on GPUs): a one-off compilation per batch size, then fast steps"


def cmd_sample(args) -> None:
    from semhitok.mllm.sample import load_sampler, read_prompts, sample_images

    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)  # "": the unconditional prompt
    sampling = _sampling(args)  # checked before the model loads
    if args.samples_per_prompt < 1 or args.batch_size < 1:
        raise ValueError(f"samples per prompt and batch size must be >= 1, got {args.samples_per_prompt} and {args.batch_size}")
    decoder, visual = load_sampler(args.model, args.device, args.compile)
    grid = sample_images(decoder, visual, prompts, args.out, sampling, args.batch_size, args.samples_per_prompt)
    print(f"{len(prompts) * args.samples_per_prompt} images -> {Path(args.out) / 'images'}; overview: {grid}")


def cmd_eval(args) -> None:
    from semhitok.eval.summary import evaluate_model

    cfg = _load(args)
    out = Path(args.out) if args.out else Path(args.model).parent / "eval"
    evaluate_model(args.model, cfg.eval, out, args.device)
    print((out / "summary.md").read_text())
    print(f"summary: {out / 'summary.json'}")


def cmd_chat(args) -> None:
    from semhitok.mllm.chat import ChatEngine, make_server
    from semhitok.mllm.sample import load_sampler

    decoder, visual = load_sampler(args.model, args.device, args.compile)
    engine = ChatEngine(decoder, visual, int(args.max_upload_mb * 2**20), args.max_pixels)
    server = make_server(engine, args.host, args.port)
    print(f"chat on http://{server.server_address[0]}:{server.server_address[1]}  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


# -- ablations ---------------------------------------------------------------------------------------
def cmd_ablate(args) -> None:
    from semhitok.eval.ablate import run_table

    cfg = _load(args)
    t = cfg.tokenizer_train
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "ablate" / f"table{args.table}"
    path = run_table(args.table, cfg.tokenizer, t, out, args.stage1_steps or t.max_steps, args.steps or t.max_steps,
                     args.only.split(",") if args.only else None, fid=not args.no_fid)
    print(path.read_text())
    print(f"table: {path}")


def _ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's tokenizer ablations (Tables 4, 5): train each variant, write the table")
    p.add_argument("--table", type=int, choices=(4, 5), required=True)
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/ablate/table<N>); reruns skip finished variants")
    p.add_argument("--stage1-steps", type=int, default=None, help="stage-1 steps (default: tokenizer_train.max_steps)")
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps per variant (default: tokenizer_train.max_steps)")
    p.add_argument("--only", default=None, help="comma-separated variants to run (names as in the output folders)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    _config_args(p)
    p.set_defaults(func=cmd_ablate)


# -- pipeline ----------------------------------------------------------------------------------------
def cmd_pipeline(args) -> None:
    """Every stage in order on the configured data; each stage resumes if it was interrupted."""
    from semhitok.common.io import write_json
    from semhitok.data_pipelines.pretokenize import run_pretokenize
    from semhitok.eval.recon import evaluate_reconstruction
    from semhitok.eval.summary import evaluate_model
    from semhitok.mllm.sample import load_sampler, read_prompts, sample_images
    from semhitok.mllm.train import train_mllm
    from semhitok.tokenizer import list_images, load_tokenizer, reconstruct_to_dir
    from semhitok.tokenizer.train import train_tokenizer

    cfg = _load(args)
    for stage in (1, 2):
        cfg.tokenizer_train.stage = stage
        if (cfg.tokenizer_stage_dir(stage) / "final" / "config.json").is_file():
            log.info("== tokenizer stage %d already finished at %s; skipping", stage, cfg.tokenizer_stage_dir(stage) / "final")
            continue
        log.info("== tokenizer stage %d -> %s", stage, cfg.tokenizer_stage_dir(stage))
        train_tokenizer(cfg.tokenizer, cfg.tokenizer_train, cfg.tokenizer_stage_dir(stage), cfg.tokenizer_stage_dir(1) / "final")
    model = load_tokenizer(cfg.tokenizer_dir)
    log.info("== tokenizer eval on %s", cfg.tokenizer_train.holdout_data)
    result = evaluate_reconstruction(model, cfg.tokenizer_train.holdout_data, fid=False)
    write_json(Path(cfg.run_dir) / "tokenizer_eval.json", result)
    grid = reconstruct_to_dir(model, list_images(cfg.tokenizer_train.holdout_data), Path(cfg.run_dir) / "reconstructions")
    print(json.dumps(result))
    print(f"held-out reconstructions (input above reconstruction): {grid}")
    log.info("== pretokenize %s -> %s", [src.name for src in cfg.pretokenize.sources], cfg.pretokenized_dir)
    print(json.dumps(run_pretokenize(cfg.pretokenize, cfg.pretokenize_tokenizer, cfg.pretokenized_dir)))
    if (cfg.mllm_dir / "final" / "semhitok_mllm.json").is_file():
        log.info("== mllm already trained at %s; skipping", cfg.mllm_dir / "final")
    else:
        log.info("== mllm training -> %s", cfg.mllm_dir)
        train_mllm(cfg)
    model_dir = cfg.mllm_dir / "final"
    log.info("== text-to-image samples for the held-out captions")
    decoder, visual = load_sampler(model_dir)
    captions = read_prompts(cfg.eval.gfid_captions)
    grid = sample_images(decoder, visual, captions, Path(cfg.run_dir) / "samples", cfg.eval.sampling, cfg.eval.batch_size)
    log.info("== evaluation -> %s", Path(cfg.run_dir) / "eval")
    evaluate_model(model_dir, cfg.eval, Path(cfg.run_dir) / "eval")
    print((Path(cfg.run_dir) / "eval" / "summary.md").read_text())
    print(f"generated from held-out captions: {grid}")
    print(f"chat with the model: semhitok chat --model {model_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semhitok", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run the whole path end to end (default: tiny preset on the shipped sample)")
    _config_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("pretokenize", help="encode image-text corpora into sharded id files (resumable)")
    _config_args(p)
    p.add_argument("--num-shards", type=int, default=None, help="jobs splitting the work (default: from SLURM, else 1)")
    p.add_argument("--shard-index", type=int, default=None, help="this job's index in [0, num-shards)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_pretokenize)

    p = sub.add_parser("train", help="train the unified LLM with DeepSpeed (run under torchrun for several ranks)")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="text-to-image with classifier-free guidance")
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help=".txt (a prompt per line) or .jsonl (prompt/caption/text field)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: SamplingConfig's)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="every score of a model: POPE, GenEval, gFID, tokenizer reconstruction")
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final)")
    p.add_argument("--out", default=None, help="output folder (default: <model>/../eval)")
    p.add_argument("--device", default=None)
    _config_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="web chat demo: ask about an uploaded image, or ask for one")
    p.add_argument("--model", required=True, help="a trained model directory (<run_dir>/mllm/final)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_chat)

    _ablate_parser(sub)

    tok = sub.add_parser("tokenizer", help="SemHiTok: train, encode, decode, reconstruct, eval").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train (or resume) stage 1 or 2")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    _config_args(p)
    p.set_defaults(func=cmd_tokenizer_train)

    def model_args(p):
        p.add_argument("--model", required=True, help="tokenizer directory (save_pretrained output)")
        p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        p.add_argument("--batch-size", type=int, default=32)

    p = tok.add_parser("encode", help="image files/folders -> ids .npz")
    model_args(p)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True, help="output .npz (arrays: ids [N, h, w] int32, paths)")
    p.set_defaults(func=cmd_tokenizer_encode)

    p = tok.add_parser("decode", help="ids .npz -> PNG images")
    model_args(p)
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_tokenizer_decode)

    p = tok.add_parser("reconstruct", help="encode+decode images, write input-vs-reconstruction PNGs")
    model_args(p)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid", type=int, default=8, help="images in the overview grid.png")
    p.set_defaults(func=cmd_tokenizer_reconstruct)

    p = tok.add_parser("eval", help="PSNR, SSIM, codebook usage, rFID on images")
    model_args(p)
    p.add_argument("--images", nargs="+", required=True, help="folders, jsonl files or images")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    p.set_defaults(func=cmd_tokenizer_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from semhitok.common.config_io import ConfigError
    from semhitok.data_pipelines.text_tokenizer import TextTokenizerUnavailable
    from semhitok.mllm.train import NonFiniteLoss
    from semhitok.tokenizer.model import WeightsUnavailable

    try:
        args.func(args)
    except (ConfigError, WeightsUnavailable, TextTokenizerUnavailable, NonFiniteLoss, FileNotFoundError, ValueError) as err:
        print(f"semhitok: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
