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
def tiny_fp32_bundle(tiny_llama, tmp_path_factory):
    """The tiny llama as an fp32 bundle (fp32 weights, hidden states and head; the small shape groups), built
    once per worker: the side-by-side reference of the backends (test_backends, test_fused). Read-only."""
    from generator.contract import Bundle
    from models import SMALL_GROUPS, quiet_build

    out = tmp_path_factory.mktemp("tiny_fp32") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="fp32", hidden_state_type="fp32",
                post_weight_type="fp32", **SMALL_GROUPS)
    return Bundle(out)


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory):
    """The embedded default model built for AX650 at s8 with check level 2, once per test session:
    pytest-xdist workers share one build through a lock in the session's common temp directory."""
    import fcntl
    import json

    from models import quiet_build

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if base.name.startswith("popen-gw") else base
    out = shared / "smollm2_shared" / "smollm2-135m-instruct_ax650"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = out.parent / "manifest.json"
    with open(out.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            manifest = quiet_build(model="smollm2-135m-instruct", chip="AX650", output_path=str(out), check_level=2)
            record.write_text(json.dumps(manifest))
    return out, json.loads(record.read_text())
