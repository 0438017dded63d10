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
