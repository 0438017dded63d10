"""Board fidelity: run scripts, shell quoting, the local override, --kvcache_path files, runner parity.

Run scripts are executed for real: on the "board" path with a stand-in for ax-llm's main binary
(it records its argv and talks to the tokenizer server the script provides), and on the local path
(AXGEN_LOCAL=1) with the real runner. Expected flag values come from the checkpoint's config.json and
the contract's file names, expected token ids from transformers' apply_chat_template.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tokenizer_fixtures as tf
from generator.runtime import kvcache
from generator.cli import main as cli_main
from generator.export.bundle import write_scripts
from generator.resolve.chips import get_chip
from generator.contract import Bundle
from generator.runtime.chat import Chat
from generator.runtime.engine import Engine
from models import SMALL_GROUPS, quiet_build, threads

HOSTILE = ("-x Say \"hi\" & it's $(touch PWNED_A) `touch PWNED_B` ${HOME} $HOME \\n; rm -rf /nonexistent | cat\n"
           "second line\twith a tab 'single' \\\" !! * ? ~ {a,b} 你好 😀\n")
EMBED = "model.embed_tokens.weight.bfloat16.bin"
AXCL = ("axcl_x86", "axcl_aarch64")


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    for key in ("AXGEN_LOCAL", "TOKENIZER_URL", "TOKENIZER_HOST", "TOKENIZER_PORT", "KVCACHE_PATH", "AXLLM_MAIN"):
        env.pop(key, None)
    env["AXGEN_PYTHON"] = sys.executable  # board path: python3 for the tokenizer server (with `tokenizers`)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script: Path, *args: str, stdin: str = "", timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group (killed as a whole if it hangs)."""
    proc = subprocess.Popen([str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(**env), cwd=script.parent,
                            start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} hung:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def answers(port: int) -> bool:
    try:
        status, _, _ = tf.request(port, "GET", "/bos_id")
        return status == 200
    except OSError:
        return False


def reference_ids(tokenizer_dir: Path, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False))


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    """The tiny llama built like a board bundle (s8 weights, bf16 state) with small shape groups."""
    out = tmp_path_factory.mktemp("board_tiny") / "b"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                post_weight_type="s8", **SMALL_GROUPS)
    return Bundle(out)


@pytest.fixture(scope="module")
def fake_main(tmp_path_factory) -> Path:
    """A stand-in for ax-llm's main binary: records argv, proves the tokenizer server answers."""
    path = tmp_path_factory.mktemp("fake_main") / "main_fake"
    path.write_text(f"""#!{sys.executable}
import json, os, sys, urllib.request
url = sys.argv[sys.argv.index("--url_tokenizer_model") + 1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
uid = json.loads(opener.open(url + "/get_uid", timeout=10).read())["uid"]
with open(os.environ["FAKE_MAIN_OUT"], "w", encoding="utf-8") as f:
    json.dump({{"argv": sys.argv[1:], "uid": uid}}, f, ensure_ascii=False)
""")
    path.chmod(0o755)
    return path


def expected_flags(ckpt: Path, bundle_dir: Path, system_prompt: str, url: str, kvcache: str | None,
                   target: str) -> list[str]:
    """The contract's flag list (section 5) from the checkpoint's own config.json."""
    cfg = json.loads((ckpt / "config.json").read_text())
    mt, P = cfg["model_type"], SMALL_GROUPS["prefill_len"]
    flags = ["--system_prompt", system_prompt]
    if kvcache:
        flags += ["--kvcache_path", kvcache]
    flags += ["--template_filename_axmodel", f"{bundle_dir}/{mt}_p{P}_l%d_together.axmodel",
              "--axmodel_num", str(cfg["num_hidden_layers"]), "--tokenizer_type", "2", "--url_tokenizer_model", url,
              "--filename_post_axmodel", f"{bundle_dir}/{mt}_post.axmodel", "--filename_tokens_embed",
              f"{bundle_dir}/{EMBED}", "--tokens_embed_num", str(cfg["vocab_size"]), "--tokens_embed_size",
              str(cfg["hidden_size"]), "--use_mmap_load_embed", "0", "--live_print", "1"]
    if target in AXCL:
        flags += ["--devices", "0"]
    return flags


def render_scripts(bundle: Bundle, target_dir: Path, ckpt: Path, system_prompt: str, recipe_name: str,
                   chip: str = "AX650") -> list[str]:
    """The bundle's run scripts rendered again, into target_dir, with another system prompt / recipe name."""
    g = bundle.manifest.graphs.model_dump()
    ctx = SimpleNamespace(model=bundle.model, recipe=SimpleNamespace(name=recipe_name), chip=get_chip(chip),
                          system_prompt=system_prompt, spec=bundle.spec, opts=bundle.opts,
                          ckpt=SimpleNamespace(dir=ckpt))
    files = {"axmodel_template": g["axmodel_template"], "post_axmodel": g["post_axmodel"], "embed": g["embed"]}
    return write_scripts(ctx, target_dir, files, bundle.manifest.tokenizer.model_dump(exclude_unset=True))


@pytest.fixture(scope="module")
def hostile(tiny_llama, tmp_path_factory) -> Path:
    """The tiny bundle (with room for a long system prompt) in a directory with a space, its scripts
    rendered again with a system prompt and recipe name full of shell syntax."""
    out = tmp_path_factory.mktemp("hostile") / "bundle with space"
    quiet_build(input_path=str(tiny_llama), output_path=str(out), weight_type="s8", hidden_state_type="bf16",
                post_weight_type="s8", **dict(SMALL_GROUPS, kv_cache_len=256, last_kv_cache_len=[16, 64, 192]))
    render_scripts(Bundle(out), out, Path(tiny_llama), HOSTILE, "evil\ntouch PWNED_C # `touch PWNED_D`")
    return out


@pytest.fixture(scope="module")
def tiny_server(tiny, tmp_path_factory):
    server = tf.ServerProcess(tiny.tokenizer_server, [], tmp_path_factory.mktemp("tiny_server"))
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------
# run scripts on the board path
# ------------------------------------------------------------------------------------------------


def test_every_chip_gets_its_launchers_with_the_contract_flags(tiny, tiny_llama, tiny_server, fake_main, tmp_path):
    """AX650: ax650 + both AXCL hosts (with --devices); AX620E/AX630C: ax630c. Each passes exactly the
    contract's flags with the bundle's values, and uses a tokenizer server that already answers."""
    assert sorted(tiny.manifest.scripts) == sorted([f"run_{tiny.model}_{t}.sh" for t in ("ax650", *AXCL)] +
                                                      ["build_ax650.sh"])
    ax630c = tmp_path / "ax630c"
    ax630c.mkdir()
    assert render_scripts(tiny, ax630c, Path(tiny_llama), tiny.system_prompt, "llama", chip="AX630C")[0] == \
        f"run_{tiny.model}_ax630c.sh"
    extra = ["--extra", "it's $(x)"]
    for target in ("ax650", *AXCL, "ax630c"):
        script = (ax630c if target == "ax630c" else tiny.dir) / f"run_{tiny.model}_{target}.sh"
        record = tmp_path / f"{target}.json"
        kv = tmp_path / f"kv {target}"
        proc = run_script(script, *extra, AXLLM_MAIN=fake_main, FAKE_MAIN_OUT=record, TOKENIZER_PORT=tiny_server.port,
                          KVCACHE_PATH=kv)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(record.read_text())
        url = f"http://127.0.0.1:{tiny_server.port}"
        assert got["argv"] == expected_flags(Path(tiny_llama), script.parent, tiny.system_prompt, url, str(kv),
                                             target) + extra
        assert kv.is_dir()  # ax-llm cannot save into a missing directory
        assert tiny_server.alive()  # a server the script did not start is left running
    # KVCACHE_PATH= (empty) leaves the flag out, for runtimes older than --kvcache_path
    record = tmp_path / "nokv.json"
    proc = run_script(tiny.dir / f"run_{tiny.model}_ax650.sh", AXLLM_MAIN=fake_main, FAKE_MAIN_OUT=record,
                      TOKENIZER_PORT=tiny_server.port, KVCACHE_PATH="")
    assert proc.returncode == 0, proc.stderr
    assert "--kvcache_path" not in json.loads(record.read_text())["argv"]


def test_hostile_values_reach_the_board_binary_verbatim(hostile, tiny_llama, fake_main, tmp_path):
    """Quotes, $(...), backticks, newlines in the system prompt and recipe name: passed verbatim,
    never executed. The script starts the tokenizer server (nothing answers) and stops it on exit, and
    moves aside a kvcache made for another system prompt (ax-llm would use it as it is)."""
    script = hostile / next(p.name for p in hostile.glob("run_*_ax650.sh"))
    port = tf.free_port()
    record = tmp_path / "argv.json"
    kv = tmp_path / "kv"
    kv.mkdir()
    (kv / "config.json").write_text(json.dumps({"system_prompt": "something else", "precompute_len": 3}))
    proc = run_script(script, AXLLM_MAIN=fake_main, FAKE_MAIN_OUT=record, TOKENIZER_PORT=port, KVCACHE_PATH=kv)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == expected_flags(Path(tiny_llama), hostile, HOSTILE, f"http://127.0.0.1:{port}", str(kv),
                                         "ax650")
    assert got["uid"]  # the server the script started answered the board's first call
    assert not answers(port)  # and was stopped when the script exited
    assert not (kv / "config.json").exists() and (kv / "config.json.stale").is_file()
    for where in (hostile, tmp_path, Path.cwd()):
        assert not list(where.glob("PWNED*")), "a value was executed by the shell"
    text = script.read_text()
    assert "\ntouch PWNED_C" not in text  # the recipe name in a comment cannot end the comment
    # the same prompt in a matching cache is kept
    (kv / "config.json").write_text(json.dumps({"system_prompt": HOSTILE, "precompute_len": 3}))
    proc = run_script(script, AXLLM_MAIN=fake_main, FAKE_MAIN_OUT=record, TOKENIZER_PORT=port, KVCACHE_PATH=kv)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((kv / "config.json").read_text())["system_prompt"] == HOSTILE


def test_script_refuses_another_models_tokenizer_server(tiny, fake_main, tmp_path):
    other = tf.copy_tokenizer_files(tiny.tokenizer_dir, tmp_path / "other_tokenizer")
    shutil.copy2(tiny.tokenizer_dir / "ax_tokenizer.json", other)
    server = tf.ServerProcess(tiny.tokenizer_server, ["--tokenizer_dir", str(other)], tmp_path)
    try:
        record = tmp_path / "argv.json"
        proc = run_script(tiny.dir / f"run_{tiny.model}_ax650.sh", AXLLM_MAIN=fake_main, FAKE_MAIN_OUT=record,
                          TOKENIZER_PORT=server.port, KVCACHE_PATH="")
        assert proc.returncode == 1
        assert "serves other_tokenizer" in proc.stderr and "TOKENIZER_PORT" in proc.stderr
        assert not record.exists() and server.alive()
    finally:
        server.stop()


def test_local_override_gets_the_hostile_prompt_verbatim(hostile, tmp_path):
    """AXGEN_LOCAL=1: the local runner gets the same flags; the prompt it cached is the script's, byte for byte."""
    script = hostile / next(p.name for p in hostile.glob("run_*_ax650.sh"))
    kv = tmp_path / "kv"
    proc = run_script(script, "--prompt", "Hello", "--max_new_tokens", "3", AXGEN_LOCAL=1, KVCACHE_PATH=kv,
                      TOKENIZER_PORT=tf.free_port())  # the script starts its server there: a launcher's port
    assert proc.returncode == 0, proc.stderr
    assert json.loads((kv / "config.json").read_text(encoding="utf-8"))["system_prompt"] == HOSTILE
    assert not list(hostile.glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))


# ------------------------------------------------------------------------------------------------
# SmolLM2 through its run script with the local override
# ------------------------------------------------------------------------------------------------


def parse_turns(stderr: str) -> list[dict]:
    turns = [{"prefilled": int(m.group(1)), "reused": int(m.group(2)), "before": int(m.group(3))}
             for m in re.finditer(r"input token num : (\d+), reused from the cache: (\d+) \(cached before the turn: "
                                  r"(\d+)\)", stderr)]
    ttft = re.findall(r"ttft: ([\d.]+) ms", stderr)
    speed = re.findall(r"avg ([\d.]+) token/s", stderr)
    assert len(ttft) == len(speed) == len(turns), stderr
    return turns


@pytest.mark.xdist_group("smollm2")
def test_smollm2_run_script_two_turns_with_cached_system_prompt(smollm2_bundle, tmp_path):
    """Two runs of the AX650 launcher with AXGEN_LOCAL=1, each a two-turn conversation on stdin: the
    first prefills the system prompt and saves it, the second loads it. Same answers both times, and
    the same as the in-process runner with the in-process tokenizer (HTTP tokenizer parity)."""
    out, manifest = smollm2_bundle
    script = out / f"run_{manifest['model']}_ax650.sh"
    kv = tmp_path / "kvcache"
    port = tf.free_port()
    questions = ["What is the capital of France?", "¿Y la de España? 谢谢 😀"]
    stdin = "\n".join(questions) + "\nq\nnever asked\n"
    system = manifest["system_prompt"]
    system_ids = reference_ids(out / manifest["tokenizer"]["dir"], [{"role": "system", "content": system}], False)
    n = len(system_ids)
    runs = []
    for attempt in range(2):
        proc = run_script(script, "--max_new_tokens", "12", stdin=stdin, AXGEN_LOCAL=1, KVCACHE_PATH=kv,
                          TOKENIZER_PORT=port)
        assert proc.returncode == 0, proc.stderr
        assert not answers(port)  # the script stopped the server it started
        runs.append(proc)
        assert f"precompute_len: {n}\n" in proc.stderr
        if attempt == 0:
            assert "generate kvcache to path" in proc.stderr
        else:
            assert f"load kvcache from path: {kv} success, precompute_len: {n}" in proc.stderr
        turns = parse_turns(proc.stderr)
        assert len(turns) == 2  # "q" ended the session: the third line was never answered
        assert turns[0]["before"] == turns[0]["reused"] == n  # only the user turn is prefilled
        # the first turn stays cached: system prompt, question and (up to re-tokenization) the answer
        assert turns[1]["before"] > n + turns[0]["prefilled"] and turns[1]["reused"] >= n + turns[0]["prefilled"]
    assert runs[0].stdout == runs[1].stdout  # loaded cache == fresh prefill
    replies = [r.strip() for r in runs[0].stdout.split("prompt >> ") if r.strip()]
    assert len(replies) == 2 and all(replies), runs[0].stdout
    meta = json.loads((kv / "config.json").read_text())
    assert meta["system_prompt"] == system and meta["precompute_len"] == n and meta["axgen"]["token_ids"] == system_ids

    # the in-process runner with the in-process tokenizer, same turns
    bundle = Bundle(out)
    chat = Chat(bundle, Engine(bundle, threads=threads()))
    chat.reset()
    local = ["".join(chat.turn(q, 12)).strip() for q in questions]
    assert local == replies


@pytest.mark.xdist_group("smollm2")
def test_smollm2_bundle_tokenizer_server_speaks_both_protocols(smollm2_bundle, tmp_path):
    """The server file in the bundle is the tested template, byte for byte (tests/test_tokenizer_server.py:
    protocols, load, bad input), and with the bundle's own tokenizer folder it renders what transformers
    renders: stateless and uid protocols, multi-turn with last_reply, Unicode."""
    from transformers import AutoTokenizer

    out, manifest = smollm2_bundle
    script = out / manifest["tokenizer"]["server"]
    assert script.read_bytes() == tf.SERVER_SCRIPT.read_bytes()
    hf = AutoTokenizer.from_pretrained(out / manifest["tokenizer"]["dir"])
    ids = lambda msgs, gen: list(hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True,  # noqa: E731
                                                        return_dict=False))
    system = [{"role": "system", "content": manifest["system_prompt"]}]
    server = tf.ServerProcess(script, [], tmp_path)  # default --tokenizer_dir: the bundle's folder
    try:
        with tf.Connection(server.port) as conn:
            text = "你好 😀 “quotes” café"
            stateless = conn.post("/encode", {"text": text})["token_ids"]
            assert stateless == ids(system + [{"role": "user", "content": text}], True)
            uid = conn.get("/get_uid")["uid"]
            assert conn.post("/reset", {"uid": uid})["token_ids"] == ids(system, False)
            first = conn.post("/encode", {"uid": uid, "text": text})
            history = system + [{"role": "user", "content": text}, {"role": "assistant", "content": "Bonjour 👋"},
                                {"role": "user", "content": "Et après ?"}]
            second = conn.post("/encode", {"uid": uid, "text": "Et après ?", "last_reply": "Bonjour 👋"})
            assert first["token_ids"] == ids(history[:2], True) and second["token_ids"] == ids(history, True)
            held = ids(history[:3], False)
            assert second["diff"] == second["token_ids"][len(held):] and not second["prefix_mismatch"]
            assert conn.post("/decode", {"uid": uid, "token_ids": hf.encode(text, add_special_tokens=False)})["text"] \
                == text
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# --kvcache_path files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chat(tiny):
    return Chat(tiny, Engine(tiny, threads=threads()))


def fresh_rows(bundle: Bundle, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    engine = Engine(bundle, threads=threads())
    engine.prefill(ids)
    return engine.k_cache[:, :len(ids)].copy(), engine.v_cache[:, :len(ids)].copy()


def test_kvcache_files_round_trip(tiny, tiny_chat, tmp_path):
    logs = []
    path = tmp_path / "kv"
    system_ids = reference_ids(tiny.tokenizer_dir, [{"role": "system", "content": tiny.system_prompt}], False)
    n = kvcache.restore_or_prefill(tiny_chat, path, logs.append)
    assert n == len(system_ids) and logs[-1] == f"generate kvcache to path: {path}"
    L, kv = tiny.spec.num_hidden_layers, tiny.spec.num_key_value_heads * tiny.spec.head_dim
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json"] + [f"{c}_cache_{i}.bin" for c in "kv" for i in range(L)])
    k_ref, v_ref = fresh_rows(tiny, system_ids)
    for i in range(L):  # raw bf16 rows, [precompute_len, kv_dim], no header
        for name, ref in (("k", k_ref), ("v", v_ref)):
            raw = (path / f"{name}_cache_{i}.bin").read_bytes()
            assert len(raw) == n * kv * 2
            np.testing.assert_array_equal(np.frombuffer(raw, "<u2").reshape(n, kv), ref[i])
    meta = json.loads((path / "config.json").read_text())
    assert meta["system_prompt"] == tiny.system_prompt and meta["precompute_len"] == n
    assert meta["axgen"]["token_ids"] == system_ids and meta["axgen"]["dtype"] == "bf16"

    # a new engine loads it and continues exactly like the one that prefilled
    turn = "Hello there, 你好"
    expected = "".join(tiny_chat.turn(turn, 6))
    expected_ids = list(tiny_chat.engine.cached_ids)
    other = Chat(tiny, Engine(tiny, threads=threads(), history="board"))
    logs.clear()
    assert kvcache.restore_or_prefill(other, path, logs.append) == n
    assert logs == [f"load kvcache from path: {path} success, precompute_len: {n}"]
    assert other.engine.precompute_len == n and other.engine.cached_ids == system_ids
    np.testing.assert_array_equal(other.engine.k_cache[:, :n], k_ref)
    assert "".join(other.turn(turn, 6)) == expected and other.engine.cached_ids == expected_ids


def _tamper_bytes(path: Path):
    f = path / "k_cache_0.bin"
    data = bytearray(f.read_bytes())
    data[5] ^= 0x40
    f.write_bytes(bytes(data))


def _truncate(path: Path):
    f = path / "v_cache_1.bin"
    f.write_bytes(f.read_bytes()[:-2])


def _board_made(path: Path):
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({k: meta[k] for k in ("system_prompt", "precompute_len")}))


def _other_tokens(path: Path):
    meta = json.loads((path / "config.json").read_text())
    meta["axgen"]["token_ids"][-1] += 1
    (path / "config.json").write_text(json.dumps(meta))


def _missing_layer(path: Path):
    (path / "v_cache_0.bin").unlink()


TAMPER = {"changed bytes": (_tamper_bytes, "changed after they were saved"),
          "truncated file": (_truncate, "v_cache_1.bin has"),
          "made by the board": (_board_made, "no 'axgen' section"),
          "other tokenization": (_other_tokens, "renders the system prompt differently"),
          "missing layer": (_missing_layer, "v_cache_0.bin is missing")}


@pytest.fixture(scope="module")
def good_cache(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "kv"
    chat = Chat(tiny, Engine(tiny, threads=threads()))
    kvcache.restore_or_prefill(chat, path, lambda m: None)
    return path


def assert_rebuilt(bundle: Bundle, chat: Chat, path: Path, logs: list[str], reason: str):
    assert any("not used" in m and reason in m for m in logs), logs
    assert logs[-1] == f"generate kvcache to path: {path}"
    ids = chat.system_ids
    k_ref, v_ref = fresh_rows(bundle, ids)
    np.testing.assert_array_equal(chat.engine.k_cache[:, :len(ids)], k_ref)
    again = []
    kvcache.restore_or_prefill(chat, path, again.append)  # the rebuilt cache is valid
    assert again == [f"load kvcache from path: {path} success, precompute_len: {len(ids)}"]


@pytest.mark.parametrize("case", list(TAMPER))
def test_kvcache_damaged_or_foreign_is_rebuilt(case, tiny, tiny_chat, good_cache, tmp_path):
    tamper, reason = TAMPER[case]
    path = Path(shutil.copytree(good_cache, tmp_path / "kv"))
    tamper(path)
    logs = []
    kvcache.restore_or_prefill(tiny_chat, path, logs.append)
    assert_rebuilt(tiny, tiny_chat, path, logs, reason)


def test_kvcache_for_another_system_prompt_is_rebuilt(tiny, good_cache, tmp_path):
    path = Path(shutil.copytree(good_cache, tmp_path / "kv"))
    chat = Chat(tiny, Engine(tiny, threads=threads()), system_prompt="Answer in French.")
    logs = []
    n = kvcache.restore_or_prefill(chat, path, logs.append)
    assert_rebuilt(tiny, chat, path, logs, "another system prompt")
    meta = json.loads((path / "config.json").read_text())
    assert meta["system_prompt"] == "Answer in French." and meta["precompute_len"] == n
    assert n == len(reference_ids(tiny.tokenizer_dir, [{"role": "system", "content": "Answer in French."}], False))


def test_kvcache_for_another_bundle_is_rebuilt(tiny, tiny_llama, good_cache, tmp_path):
    """Same checkpoint, same shapes and dtype, other weights (s4): the cache is not this bundle's."""
    quiet_build(input_path=str(tiny_llama), output_path=str(tmp_path / "s4"), weight_type="s4",
                hidden_state_type="bf16", post_weight_type="s8", **SMALL_GROUPS)
    other = Bundle(tmp_path / "s4")
    path = Path(shutil.copytree(good_cache, tmp_path / "kv"))
    chat = Chat(other, Engine(other, threads=threads()))
    logs = []
    kvcache.restore_or_prefill(chat, path, logs.append)
    assert_rebuilt(other, chat, path, logs, "another bundle")


def test_kvcache_save_failure_is_logged_and_the_run_goes_on(tiny, tiny_chat, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    logs = []
    n = kvcache.restore_or_prefill(tiny_chat, blocker / "kv", logs.append)
    assert n == tiny_chat.engine.precompute_len > 0
    assert logs[-1].startswith(f"save kvcache to {blocker / 'kv'} failed")


# ------------------------------------------------------------------------------------------------
# the runner's command line: board flags, interactive commands, HTTP tokenizer
# ------------------------------------------------------------------------------------------------


def cli(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    if argv and argv[0] == "run":
        argv = [*argv, "--threads", str(threads())]
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse refuses a bad flag value (bounded numeric types) with exit status 2
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_board_flags_are_checked_against_the_bundle(tiny, capsys):
    d = tiny.dir
    g = tiny.manifest.graphs.model_dump()
    cases = [
        (["--axmodel_num", "7"], "--axmodel_num 7"),
        (["--tokens_embed_num", "5"], "--tokens_embed_num 5"),
        (["--tokens_embed_size", "3"], "--tokens_embed_size 3"),
        (["--template_filename_axmodel", str(d / "x_l%d.axmodel")], "--template_filename_axmodel"),
        (["--template_filename_axmodel", str(d / "no_index.axmodel")], "must contain %d"),
        (["--filename_post_axmodel", str(d.parent / g["post_axmodel"])], "--filename_post_axmodel"),
        (["--tokenizer_type", "1"], "--tokenizer_type 1"),
        (["--devices", "0;reboot"], "--devices"),
        (["--max_new_tokens", "0"], "--max_new_tokens"),
    ]
    for flags, needle in cases:
        code, out, err = cli(["run", str(d), "--prompt", "hi", *flags], capsys)
        assert code == 2 and needle in " ".join(err.split()), (flags, err)
        assert out == ""
    # the board's own file flags select the bundle without a positional argument
    code, out, err = cli(["run", "--template_filename_axmodel", str(d / g["axmodel_template"]),
                          "--filename_post_axmodel", str(d / g["post_axmodel"]), "--filename_tokens_embed",
                          str(d / g["embed"]), "--devices", "0,1", "--prompt", "hi", "--max_new_tokens", "2"], capsys)
    assert code == 0, err


def test_mmap_live_print_and_log_lines(tiny, capsys):
    base = ["run", str(tiny.dir), "--prompt", "Hello 你好", "--max_new_tokens", "6"]
    outs = []
    for flags in (["--use_mmap_load_embed", "1", "--live_print", "1"],
                  ["--use_mmap_load_embed", "0", "--live_print", "0"]):
        code, out, err = cli(base + flags, capsys)
        assert code == 0, err
        assert re.search(r"\[I\] ttft: [\d.]+ ms", err) and re.search(r"avg [\d.]+ token/s", err)
        assert "precompute_len:" in err and "remaining:" in err
        outs.append(out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_interactive_q_and_reset_with_kvcache(tiny, capsys, monkeypatch, tmp_path):
    """'reset' starts over from the saved system prompt cache (the answer repeats); 'q' exits."""
    kv = tmp_path / "kv"
    code, out, err = cli(["run", str(tiny.dir), "--kvcache_path", str(kv), "--max_new_tokens", "5"], capsys,
                         stdin="Hi there\nreset\nHi there\nAnd then?\nq\nnot read\n", monkeypatch=monkeypatch)
    assert code == 0, err
    replies = out.split("prompt >> ")[1:]
    assert len(replies) == 5  # three answers, reset (no answer) and q
    assert replies[0] == replies[2] and replies[1] == ""
    assert err.count("generate kvcache to path") == 1 and err.count("load kvcache from path") == 1
    turns = parse_turns(err)
    assert turns[0]["before"] == turns[1]["before"]  # after reset only the system prompt is cached
    assert turns[2]["before"] > turns[1]["before"]


def test_http_tokenizer_matches_in_process_tokenizer(tiny, tiny_server):
    """--tokenizer_type 2: the uid protocol over HTTP gives the same token stream and text as the
    in-process tokenizer, turn after turn."""
    from generator.runtime.tokenizer_client import HttpTokenizer

    chats = [Chat(tiny, Engine(tiny, threads=threads())), Chat(tiny, Engine(tiny, threads=threads()),
                                                       HttpTokenizer(f"http://127.0.0.1:{tiny_server.port}"))]
    transcripts = []
    for chat in chats:
        n = chat.reset()
        texts = ["".join(chat.turn(q, 6)) for q in ("Hello 你好", "Emoji 😀")]
        transcripts.append((n, texts, list(chat.engine.cached_ids)))
    assert transcripts[0] == transcripts[1]
    n, texts, ids = transcripts[0]
    assert n == len(reference_ids(tiny.tokenizer_dir, [{"role": "system", "content": tiny.system_prompt}], False))
    assert len(ids) > n + 2 * 6


def test_http_tokenizer_flags_in_the_runner(tiny, tiny_server, capsys):
    base = ["run", str(tiny.dir), "--prompt", "Hello 你好", "--max_new_tokens", "6"]
    code, local_out, err = cli(base, capsys)
    assert code == 0, err
    code, http_out, err = cli(base + ["--tokenizer_type", "2", "--url_tokenizer_model",
                                      f"http://127.0.0.1:{tiny_server.port}"], capsys)
    assert code == 0, err
    assert http_out == local_out and f"connect http://127.0.0.1:{tiny_server.port} ok" in err
    with tf.unused_port() as port:
        code, _, err = cli(base + ["--tokenizer_type", "2", "--url_tokenizer_model", f"http://127.0.0.1:{port}"], capsys)
    assert code == 2 and "is not answering" in err


def test_runner_recovers_when_the_tokenizer_server_restarts(tiny, capsys, monkeypatch, tmp_path):
    """The server forgot our uid (restarted between two turns): new session, conversation reset, the
    turn is answered instead of failing."""
    server = tf.ServerProcess(tiny.tokenizer_server, [], tmp_path)
    calls = []

    class Stdin(io.StringIO):
        def readline(self, *args):
            calls.append(1)
            if len(calls) == 2:  # before the second question
                server.stop()
                restarted.append(tf.ServerProcess(tiny.tokenizer_server, [], tmp_path, port=server.port))
            return super().readline(*args)

    restarted = []
    monkeypatch.setattr(sys, "stdin", Stdin("Hello\nHello\nq\n"))
    try:
        code = cli_main(["run", str(tiny.dir), "--tokenizer_type", "2", "--url_tokenizer_model",
                         f"http://127.0.0.1:{server.port}", "--max_new_tokens", "4", "--threads", str(threads())])
        out, err = capsys.readouterr()
    finally:
        for s in [server, *restarted]:
            s.stop()
    assert code == 0, err
    assert "Invalid uid" in err and "new tokenizer session, conversation reset" in err
    replies = out.split("prompt >> ")[1:]
    assert replies[0] == replies[1] and replies[0].strip()  # after the reset the same question, the same answer


def test_ctrl_c_stops_the_answer_not_the_session(tiny, capsys, monkeypatch):
    real_turn = Chat.turn
    seen = []

    def turn(self, text, max_new_tokens=None, images=None):
        seen.append(text)
        if len(seen) == 1:  # Ctrl+C while the first answer is being printed
            yield "partial"
            raise KeyboardInterrupt
        yield from real_turn(self, text, max_new_tokens, images)

    monkeypatch.setattr(Chat, "turn", turn)
    code, out, err = cli(["run", str(tiny.dir), "--max_new_tokens", "3"], capsys, stdin="one\ntwo\nq\n",
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert seen == ["one", "two"] and "[I] stopped" in err and "partial" in out
    assert err.count("input token num") == 1 and "avg" in err  # the second question was answered in full


# ------------------------------------------------------------------------------------------------
# the bundle contract (generator/contract.py): file names, manifest validation, port, mask
# ------------------------------------------------------------------------------------------------
def test_contract_file_names_match_the_manifest_templates_and_the_files(tiny):
    from generator import contract

    g = tiny.manifest.graphs
    for i in range(tiny.spec.num_hidden_layers):
        for group in tiny.groups:
            name = tiny.manifest.layer_graph(i, group.index)
            assert name == g.layer_template.replace("%d", str(i)).replace("{group}", str(group.index))
            assert (tiny.dir / name).is_file()
        assert (tiny.dir / tiny.manifest.layer_data(i)).is_file()
        assert contract.layer_axmodel_name(tiny.spec.model_type, tiny.opts.prefill_len, i) == g.axmodel_template % i
    assert g.embed == contract.EMBED_FILE and (tiny.dir / g.embed).is_file()
    assert tiny.tokenizer_dir.name == contract.tokenizer_dir_name(tiny.model)
    assert tiny.tokenizer_server.name == contract.tokenizer_script_name(tiny.model)


def test_a_broken_or_older_manifest_is_refused_naming_file_and_field(tiny, tmp_path):
    from generator.errors import GeneratorError

    good = json.loads((tiny.dir / "manifest.json").read_text())
    cases = {
        "older": ({**good, "format_version": 0}, "format_version 0"),
        "missing": ({k: v for k, v in good.items() if k != "graphs"}, "graphs"),
        "wrong type": ({**good, "options": {**good["options"], "kv_cache_len": "many"}}, "options.kv_cache_len"),
        "unknown weight type": ({**good, "options": {**good["options"], "weight_type": "s3"}}, "options.weight_type"),
        "bad group": ({**good, "graphs": {**good["graphs"], "groups": [{"index": 0}]}}, "graphs.groups.0"),
        "not an object": ([], "JSON object"),
        "unknown key": ({**good, "surprise": 1}, "surprise"),
    }
    for case, (data, needle) in cases.items():
        d = tmp_path / case.replace(" ", "_")
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(GeneratorError) as err:
            Bundle(d)
        assert str(d / "manifest.json") in str(err.value) and needle in str(err.value), (case, str(err.value))
        assert "rebuild" in str(err.value).lower()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "manifest.json").write_text("{not json")
    with pytest.raises(GeneratorError, match="unreadable bundle manifest"):
        Bundle(tmp_path / "unreadable")


def test_tokenizer_port_is_one_fact(tiny):
    """The standalone tokenizer server (which imports nothing of the package) defaults to the contract's
    port, and so do the run scripts and the HTTP client."""
    import inspect

    from generator import contract
    from generator.runtime.chat import load_script
    from generator.runtime.tokenizer_client import HttpTokenizer

    server = load_script(tiny.tokenizer_server, "port_check")
    assert server.DEFAULT_PORT == contract.TOKENIZER_PORT
    script = (tiny.dir / f"run_{tiny.model}_ax650.sh").read_text()
    assert f"DEFAULT_TOKENIZER_PORT={contract.TOKENIZER_PORT}\n" in script
    assert inspect.signature(HttpTokenizer).parameters["url"].default == contract.TOKENIZER_URL


@pytest.mark.parametrize("hidden", ["bf16", "fp16", "fp32"])
def test_board_mask_opens_the_cached_rows_and_the_causal_new_tokens(hidden):
    from generator.contract import MASK_VALUE, board_mask, from_storage

    tokens, rows, cached = 3, 5, 2
    got = from_storage(board_mask(hidden, tokens, rows, cached), hidden)[0]
    assert got.shape == (tokens, rows + tokens)
    for t in range(tokens):
        open_cols = set(range(cached)) | {rows + j for j in range(t + 1)}
        for col in range(rows + tokens):
            assert got[t, col] == (0.0 if col in open_cols else MASK_VALUE[hidden]), (t, col)
    decode = from_storage(board_mask(hidden, 1, 1, 0), hidden)[0, 0]  # position 0: one masked dummy row
    assert decode.tolist() == [MASK_VALUE[hidden], 0.0]
