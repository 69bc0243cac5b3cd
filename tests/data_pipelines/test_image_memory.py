"""The pad path is bounded like the crop path (issue 26, class 5): a tall or wide image inside the pixel and aspect
limits is padded to square after resizing, never on a max(w, h)^2 canvas. The cases run in one child process whose
address space is capped, per case, a little above what it already holds (RLIMIT_AS, as a job under a memory
limit): padding a 600x12000 image first needs a 12000^2 canvas (432 MB) and failed there with a MemoryError."""

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import io, json, resource, sys
import numpy as np
from PIL import Image
from semhitok.tokenizer.data import ImageLimits, open_rgb, preprocess

budget, cases = int(sys.argv[1]), json.loads(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
for w, h, mode in cases:
    arr = np.full((h, w, 3), 255, np.uint8)
    arr[: h // 2, : w // 2] = (200, 30, 30)  # a red quarter, the rest white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    del arr, buf
    held = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (held + budget, hard))
    try:
        img = open_rgb(data, ImageLimits(), size=64)  # as pre-tokenization decodes (the chat: without size)
        x = preprocess([img], 64, mode)[0]  # [3, 64, 64] in [-1, 1], as pre-tokenization and encode_images do
        result = {"shape": list(x.shape), "red": float(x[0].mean())}
    except MemoryError:
        result = {"error": "MemoryError"}
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    del data
    img = x = None
    print(json.dumps([w, h, mode, result]), flush=True)
"""

BUDGET = 160 * 2**20  # bytes of address space above what the child holds: 7 times the 600x12000 image's 21.6 MB

# (width, height, mode): every case inside the default limits (36M pixels, aspect ratio 20)
CASES = [(600, 12000, "pad"), (12000, 600, "pad"), (600, 12000, "crop"), (12000, 600, "crop"), (3000, 3000, "pad")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(BUDGET), json.dumps(CASES)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path_factory.mktemp("child"), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {tuple(row[:3]): row[3] for row in map(json.loads, proc.stdout.strip().splitlines())}


@pytest.mark.parametrize("w,h,mode", CASES)
def test_padding_a_tall_or_wide_image_needs_no_more_memory_than_cropping(results, w, h, mode):
    got = results[(w, h, mode)]
    assert got.get("error") is None, f"{w}x{h} {mode}: {got['error']} under a {BUDGET >> 20} MiB budget"
    assert got["shape"] == [3, 64, 64]
    # the picture's red is 200 or 255, the padding grey 127 (PAD_FILL): about -0.01 at worst; black padding: about -0.9
    assert got["red"] > -0.5


@pytest.mark.parametrize("size, says", [((6001, 6000), "above the limit of 36,000,000 pixels"),
                                        ((2100, 100), "an aspect ratio above 20"), ((6000, 6000), None)])
def test_the_exported_processor_checks_the_header_as_semhitok_does(tmp_path, size, says):
    """The transformers-only processor (mllm/hf_remote, which imports nothing of semhitok) refuses what
    semhitok.tokenizer.data.to_rgb refuses, before decoding: its limits are ImageLimits' defaults."""
    from PIL import Image

    from semhitok.mllm.hf_remote import processing_semhitok as remote
    from semhitok.tokenizer.data import ImageLimits, ImageRejected, to_rgb

    assert (remote.MAX_PIXELS, remote.MAX_ASPECT_RATIO) == (ImageLimits().max_pixels, ImageLimits().max_aspect_ratio)
    path = tmp_path / "big.png"
    Image.new("1", size).save(path)  # 1 bit per pixel: 4.5 MB decoded at most
    for check, refused in ((lambda im: remote.to_rgb(im, 64), ValueError), (lambda im: to_rgb(im, size=64), ImageRejected)):
        with Image.open(path) as img:
            if says is None:
                assert check(img).size == size
            else:
                with pytest.raises(refused, match=says):
                    check(img)
