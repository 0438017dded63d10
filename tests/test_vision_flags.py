"""Qwen2.5-VL's board flags and its image token typed as text, on the tiny Qwen2.5-VL of
tests/test_vision_qwen25vl.py.

- The run script passes the board runtime's `--vision_start_token_id` (contract section 9) for an
  mRoPE bundle; `python -m generator run` accepts it and checks it against the bundle.
- The image-pad token's text in a message: transformers' processors refuse it ("Found N <image token>
  tokens in the text but no images were passed" / "should be the same as the number of images"), and
  so does the runner, naming the token, instead of counting a stray run as an image in mRoPE.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models import threads
from test_vision_qwen25vl import START, build, test_image, tiny  # noqa: F401  (tiny: the fixture)

from generator.errors import GeneratorError
from generator.runtime.chat import Chat
from generator.runtime.engine import Engine


@pytest.fixture(scope="module")
def qbundle(tiny):  # noqa: F811
    return build(tiny, "fp32", kv_cache_len=192)


def _env():
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "AXGEN_LOCAL"}


def test_run_script_passes_vision_start_token_id(qbundle, tmp_path):
    from PIL import Image

    script = next(qbundle.dir.glob("run_*_ax650.sh")).read_text()
    assert f"--vision_start_token_id {START}" in script
    assert qbundle.manifest.vision.img_start_token_id == START
    photo = tmp_path / "photo.png"
    Image.fromarray(test_image(seed=5)).save(photo)
    base = [sys.executable, "-m", "generator", "run", str(qbundle.dir), "--image", str(photo), "--prompt", "What?",
            "--max_new_tokens", "2", "--threads", "1", "--system_prompt", "A bot."]
    ok = subprocess.run(base + ["--vision_start_token_id", str(START)], capture_output=True, text=True, env=_env(),
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(base + ["--vision_start_token_id", str(START + 7)], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert bad.returncode != 0 and "--vision_start_token_id" in bad.stderr and f"token {START}" in bad.stderr


def test_image_token_typed_as_text_is_refused(qbundle):
    chat = Chat(qbundle, Engine(qbundle, threads=threads()), system_prompt="A bot.")
    chat.reset()
    token = chat.image_token_text()
    assert token == "<IMG_CONTEXT>"  # the tiny tokenizer's text of the config's image_token_id
    for images in ([], [test_image()]):
        with pytest.raises(GeneratorError, match="image token '<IMG_CONTEXT>'"):
            list(chat.turn(f"look {token}{token} here", max_new_tokens=2, images=images))
    # plain text and an image turn still work
    assert isinstance("".join(chat.turn("hello", max_new_tokens=2)), str)
    assert isinstance("".join(chat.turn("and this?", max_new_tokens=2, images=[test_image()])), str)
    # serve's path: a conversation whose ids hold a stray run besides the image's
    chat.reset()
    ids = list(chat.tok.encode("a picture", img_prompt=True)[0])
    ctx = qbundle.manifest.vision.img_context_token_id
    stray = ids[:-3] + [ctx, ctx] + ids[-3:]
    with pytest.raises(GeneratorError, match="2 run\\(s\\) of the image token '<IMG_CONTEXT>' for 1 image"):
        list(chat.complete(stray, 2, images=[test_image()]))
