import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    from models import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tok):
    """A 2-layer llama with GQA and an untied head, random weights, safetensors."""
    from models import save_tiny, tiny_llama_config

    tok_dir, vocab = tiny_tok
    return save_tiny(tiny_llama_config(vocab), tmp_path_factory.mktemp("tiny_llama"), tok_dir)


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory):
    """The embedded default model built for AX650 at s8 with check level 2 (once per test worker;
    mark users with @pytest.mark.xdist_group("smollm2") so they share one worker)."""
    from models import quiet_build

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct_ax650"
    manifest = quiet_build(model="smollm2-135m-instruct", chip="AX650", output_path=str(out), check_level=2)
    return out, manifest
