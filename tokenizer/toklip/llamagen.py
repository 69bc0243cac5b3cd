"""LlamaGen's released VQ tokenizer (FoundationVision/LlamaGen's VQModel, e.g. vq_ds16_t2i.pt, the VQGAN TokLIP
is built on) -> our VQGAN (vqgan.py), which has the same layers under other names:

    LlamaGen                                   ours
    {encoder,decoder}.conv_blocks.i.res.j.*    {encoder,decoder}.levels.i.res.j.*   (nin_shortcut -> skip)
    {encoder,decoder}.conv_blocks.i.attn.j.*   {encoder,decoder}.levels.i.attn.j.*  (proj_out -> proj)
    encoder.conv_blocks.i.downsample.conv      encoder.levels.i.resample.conv
    decoder.conv_blocks.i.upsample.conv        decoder.levels.i.resample.conv
    quantize.embedding.weight                  quantizer.embedding
    quantize.codebook_used                     (dropped: a usage counter, not a weight)
    conv_in, mid.*, norm_out, conv_out, quant_conv, post_quant_conv: the same names

The checkpoint is a pickle ({"model": state_dict}; TokLIP's code also takes "ema" first, then "state_dict"):
it is read with torch.load(weights_only=True), which builds tensors and containers and runs no code; a
safetensors file holding the same state dict is read directly. The architecture (width, levels, blocks,
codebook) is read off the tensor shapes; every tensor must land on a weight of that architecture.

    python -m semhitok.tokenizer.toklip.llamagen vq_ds16_t2i.pt OUT_DIR --image-size 256
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from semhitok.tokenizer.toklip.config import VQGANConfig
from semhitok.tokenizer.toklip.vqgan import VQGAN

# (LlamaGen pattern, our replacement), applied in order to every key
RENAMES = [
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.(?:downsample|upsample)\.conv\.", r"\1.levels.\2.resample.conv."),
    (r"^(encoder|decoder)\.conv_blocks\.", r"\1.levels."),
    (r"\.nin_shortcut\.", ".skip."),
    (r"\.proj_out\.", ".proj."),
    (r"^quantize\.embedding\.weight$", "quantizer.embedding"),
]
DROPPED = {"quantize.codebook_used"}
WRAPPERS = ("ema", "model", "state_dict")  # TokLIP's order of preference


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A LlamaGen checkpoint file -> its VQModel state dict (LlamaGen's key names); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LlamaGen checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused something that is not a tensor or container
        raise ValueError(f"{path}: refused to unpickle anything but tensors and containers ({str(err)[:200]})") from None
    except Exception as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    if isinstance(blob, dict):
        for key in WRAPPERS:
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        raise ValueError(f"{path}: no state dict of tensors under {'/'.join(WRAPPERS)} or at the top level")
    return blob


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen's key names -> ours (module docstring); a DDP "module." prefix is removed."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in DROPPED:
            continue
        for pattern, repl in RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def config_from_state_dict(state: dict[str, torch.Tensor], image_size: int) -> VQGANConfig:
    """The VQGANConfig whose model has these (LlamaGen-named) weights' shapes; image_size is the caller's."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"not a LlamaGen VQModel state dict: no {key}")
        return tuple(state[key].shape)

    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"not a LlamaGen VQModel state dict: encoder levels {levels}")
    channels = shape("encoder.conv_in.weight")[0]
    widths = [shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in levels]
    if any(w % channels for w in widths):
        raise ValueError(f"LlamaGen encoder widths {widths} are not multiples of its {channels} input channels")
    res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.conv_blocks.0.res.")})
    codebook_size, code_dim = shape("quantize.embedding.weight")
    return VQGANConfig(image_size=image_size, codebook_size=codebook_size, code_dim=code_dim, channels=channels,
                       channel_mult=[w // channels for w in widths], res_blocks=res_blocks,
                       z_channels=shape("encoder.conv_out.weight")[0])


def from_llamagen(state: dict[str, torch.Tensor], image_size: int) -> VQGAN:
    """A LlamaGen VQModel state dict -> our VQGAN holding exactly its weights (every key used, none missing)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = VQGAN(config_from_state_dict(state, image_size))
    ours = convert_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    wrong = [k for k in expected if k in ours and ours[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"LlamaGen weights do not fit VQ-16's layout: {len(missing)} missing (first {missing[:3]}), "
                         f"{len(unexpected)} unexpected (first {unexpected[:3]}), {len(wrong)} of another shape "
                         f"(first {wrong[:3]})")
    model.load_state_dict({k: v.float() for k, v in ours.items()})
    model.trained_stages = [1]
    return model.eval()


def load_llamagen(path: str | Path, image_size: int) -> VQGAN:
    """LlamaGen's checkpoint file (.pt / .safetensors) -> our VQGAN; errors name the file."""
    state = read_checkpoint(path)
    try:
        return from_llamagen(state, image_size)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert LlamaGen's VQ checkpoint into a VQGAN directory "
                                                 "(config.json + model.safetensors) that toklip.vqgan_pretrained takes.")
    parser.add_argument("checkpoint", help="vq_ds16_t2i.pt (or a .safetensors of its state dict)")
    parser.add_argument("out", help="the directory to write")
    parser.add_argument("--image-size", type=int, default=256, help="the resolution the VQGAN will encode (256 or 384 for TokLIP)")
    args = parser.parse_args(argv)
    model = load_llamagen(args.checkpoint, args.image_size)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.config.codebook_size} codes of {model.config.code_dim} dims, {model.grid}x{model.grid} ids)")


if __name__ == "__main__":
    main()
