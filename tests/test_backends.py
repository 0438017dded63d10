"""The backend registry (runtime/backends.py) and `--config boost.yaml` (runtime/boost_config.py):
built-in and entry-point backends, onnxruntime and transformers agreeing greedily on an fp32 bundle,
config keys applied or refused with the key and the file named, `--backend` on run."""

from types import SimpleNamespace

import pytest

from generator.cli import main
from generator.errors import GeneratorError
from generator.runtime import backends
from generator.runtime.boost_config import load_config
from generator.runtime.chat import Chat
from models import token_ids


@pytest.fixture(scope="module")
def fp32(tiny_fp32_bundle):
    return tiny_fp32_bundle


def write(tmp_path, text: str):
    path = tmp_path / "boost.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_registry_lists_the_built_in_backends():
    assert {"onnxruntime", "transformers"} <= set(backends.available())
    assert backends.get("onnxruntime").capabilities["numerics"] == ("board", "fast")
    assert backends.get("transformers").capabilities["batching"] is False
    with pytest.raises(GeneratorError, match="'nope' is not a known backend; available: .*onnxruntime.*transformers"):
        backends.get("nope")


def test_entry_point_backend_is_found(monkeypatch):
    class Mine(backends.Backend):
        @classmethod
        def open(cls, bundle, **options):
            return "engine"

    good = SimpleNamespace(name="mine", value="pkg:Mine", load=lambda: Mine)

    def boom():
        raise ImportError("no module named pkg2")

    bad = SimpleNamespace(name="broken", value="pkg2:X", load=boom)
    monkeypatch.setattr(backends, "_loaded_entry_points", False)
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [good] if group == backends.ENTRY_POINT_GROUP else [])
    assert "mine" in backends.available() and backends.get("mine") is Mine
    monkeypatch.setattr(backends, "_loaded_entry_points", False)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [bad])
    with pytest.raises(GeneratorError, match="entry point 'broken' \\(pkg2:X.*no module named pkg2"):
        backends.available()


def test_onnxruntime_and_transformers_agree_greedily(fp32):
    ids = token_ids(24, fp32.spec.vocab_size, 3)
    answers = {}
    for name in ("onnxruntime", "transformers"):
        engine, cls = backends.open_engine(fp32, name, threads=1)
        chat = Chat(fp32, engine, sampling={"enable_top_k_sampling": False, "enable_top_p_sampling": False})
        answers[name] = list(chat.gen.stream(ids, 12))
        assert cls.name == name
    assert len(answers["onnxruntime"]) == 12  # no early EOS: twelve tokens compared
    assert answers["onnxruntime"] == answers["transformers"]


def test_valid_config_applies(fp32, tmp_path):
    path = write(tmp_path, "llm_backend: onnxruntime\nboost_model_name: llama\nbatch_size: 1\ntop_k: 5\n"
                           "do_sample: true\nmax_decode_length: 3\nrepetition_penalty: 1.1\n")
    cfg = load_config(path)
    engine, cls = backends.open_engine(fp32, None, cfg, path, threads=1)
    from generator.runtime.boost_config import sampling_settings

    chat = Chat(fp32, engine, sampling=sampling_settings(cfg), seed=0)
    s = chat.gen.sampler.cfg
    assert (s.top_k, s.enable_top_k_sampling, s.repetition_penalty, s.enable_repetition_penalty) == (5, True, 1.1, True)
    assert cls.name == "onnxruntime" and cfg.max_decode_length == 3


@pytest.mark.parametrize("text, match", [
    ("top_k: 5\ntopk: 3\n", "topk: unknown key"),
    ("top_p: 1.5\n", "top_p: Input should be less than or equal to 1"),
    ("max_decode_length: many\n", "max_decode_length: Input should be a valid integer"),
    ("- a\n", "must be a mapping"),
    ("top_k: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than"),
    ("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b]\n",
     "a: unknown key"),
])
def test_bad_config_names_the_key_and_file(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(GeneratorError, match=match) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("text, match", [
    ("batch_size: 2\n", "batch_size 2: backend 'onnxruntime' lacks batching"),
    ("block_size: 16\n", "block_size: backend 'onnxruntime' lacks a paged KV cache"),
    ("extend_method: PI\n", "extend_method PI: the bundle was built with none"),
    ("boost_model_name: qwen\n", "boost_model_name 'qwen' is not this bundle's model"),
    ("llm_backend: BuildIn\n", "llm_backend: --backend 'BuildIn' is not a known backend; available: onnxruntime"),
])
def test_unsupported_config_is_refused(fp32, tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(GeneratorError, match=match):
        backends.open_engine(fp32, None, load_config(path), path, threads=1)


def test_cli_backend_and_config(fp32, tmp_path, capsys):
    assert main(["run", str(fp32.dir), "--backend", "nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not a known backend" in err and "onnxruntime, onnxruntime-fused, transformers" in err
    path = write(tmp_path, "batch_size: 2\n")
    assert main(["run", str(fp32.dir), "--config", str(path), "--prompt", "hi"]) == 2
    assert "lacks batching" in capsys.readouterr().err
    assert main(["run", str(fp32.dir), "--backend", "transformers", "--numerics", "fast", "--prompt", "hi"]) == 2
    assert "does not support --numerics fast" in capsys.readouterr().err
    path = write(tmp_path, "max_decode_length: 2\ndo_sample: false\n")
    assert main(["run", str(fp32.dir), "--config", str(path), "--prompt", "hi", "--threads", "1"]) == 0
    assert "input token num" in capsys.readouterr().err


def test_transformers_backend_through_run_and_serve(fp32, tmp_path, capsys):
    assert main(["run", str(fp32.dir), "--backend", "transformers", "--kvcache_path", str(tmp_path / "kv"),
                 "--prompt", "hi"]) == 2
    assert "'transformers' lacks a saved KV cache" in capsys.readouterr().err
    assert not (tmp_path / "kv").exists()
    assert main(["run", str(fp32.dir), "--backend", "transformers", "--prompt", "hi", "--max_new_tokens", "2",
                 "--threads", "1"]) == 0
    assert "input token num" in capsys.readouterr().err
    from generator.serve.service import ChatService

    path = write(tmp_path, "llm_backend: transformers\nmax_decode_length: 4\n")
    service = ChatService(fp32.dir, config=str(path), threads=1, log=lambda msg: None)
    assert service.backend.name == "transformers" and service.max_tokens == 4
    assert service.engine.numerics == "fp32"
