"""The model zoo (generator/zoo/) on a local Ray instance with tiny checkpoints: one build succeeds, one
fails in its Ray task (weights that do not match their config), one fails before building (a flag the
chip refuses); the index shows each, and a rerun skips the finished bundle. Bad zoo files and an
unreachable RAY_ADDRESS give clear errors before any build."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from generator.errors import GeneratorError

pytestmark = pytest.mark.xdist_group("zoo")  # one Ray session for the module, in one worker


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from generator.zoo import engine

    started = not ray.is_initialized()
    where = engine.start(num_cpus=2)
    yield where
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    """The tiny llama, and a copy whose config.json says a wider MLP than its weights have."""
    broken = tmp_path_factory.mktemp("zoo_inputs") / "broken-llama"
    shutil.copytree(tiny_llama, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 2 * cfg["intermediate_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    return tiny_llama, broken


SMALL = "{prefill_len: 16, kv_cache_len: 96, last_kv_cache_len: [16, 32, 64], group_size: 16}"


def zoo_file(tmp_path: Path, out: Path, good: Path, broken: Path) -> Path:
    path = tmp_path / "zoo.yaml"
    path.write_text(f"output_root: {out}\nchips: [AX650]\nweight_types: [s8]\nmodels:\n"
                    f"  - input: {good}\n    name: tiny-good\n    options: {SMALL}\n"
                    f"  - input: {broken}\n    name: tiny-broken\n    options: {SMALL}\n"
                    f"  - input: {good}\n    name: tiny-bad-flag\n    options: {{kv_cache_len: 99999}}\n")
    return path


def run(path, console_text: list[str] | None = None):
    from generator.zoo import run_zoo

    buf = io.StringIO()
    out = run_zoo(path, console=Console(file=buf, width=200))
    if console_text is not None:
        console_text.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def first_run(ray_session, checkpoints, tmp_path_factory):
    good, broken = checkpoints
    tmp = tmp_path_factory.mktemp("zoo_run")
    path = zoo_file(tmp, tmp / "zoo", good, broken)
    return path, tmp / "zoo", run(path)["results"]


def test_zoo_builds_and_reports_a_failure_without_stopping(first_run):
    path, out, first = first_run
    assert first["tiny-good_ax650_s8"]["status"] == "built", first
    broken = first["tiny-broken_ax650_s8"]
    assert broken["status"] == "failed" and broken["error"].startswith("error:"), broken  # the build's own line
    bad_flag = first["tiny-bad-flag_ax650_s8"]
    assert bad_flag["status"] == "failed" and "--kv_cache_len 99999" in bad_flag["error"]
    assert not (out / "tiny-broken_ax650_s8").exists()  # a failed build leaves no bundle
    assert (out / ".zoo" / "tiny-broken_ax650_s8.log").read_text().strip()  # its log, for the details

    index = (out / "index.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in index.splitlines() if line.startswith("| tiny-")}
    assert "| built |" in rows["tiny-good_ax650_s8"] and "| failed |" in rows["tiny-broken_ax650_s8"]
    assert "1 built, 0 up to date (skipped), 2 failed" in index
    assert f"**tiny-broken_ax650_s8**: {broken['error']}" in index and "predicted" in index
    html = (out / "index.html").read_text()
    assert html.count('<tr class="failed">') == 2 and html.count('<tr class="built">') == 1
    doc = json.loads((out / "index.json").read_text())
    good_row = next(r for r in doc["bundles"] if r["bundle"] == "tiny-good_ax650_s8")
    assert good_row["size_mib"] > 0 and good_row["build_seconds"] > 0
    try:
        import generator.predict  # noqa: F401  (the cost model, where this checkout has it)
    except ImportError:
        assert good_row["predicted"] is None
    else:
        assert good_row["predicted"]["decode_tok_s"] > 0 and f"| {good_row['predicted']['decode_tok_s']} |" in \
            rows["tiny-good_ax650_s8"]


def test_a_rerun_skips_the_finished_bundle_and_retries_the_failed(first_run):
    path, out, _ = first_run
    manifest = out / "tiny-good_ax650_s8" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    log: list[str] = []
    second = run(path, log)["results"]
    assert second["tiny-good_ax650_s8"]["status"] == "skipped"
    assert manifest.stat().st_mtime_ns == before  # not rebuilt
    assert "tiny-good_ax650_s8: up to date, skipped" in log[0]
    assert second["tiny-broken_ax650_s8"]["status"] == "failed"  # failures are retried, and fail again
    assert "1 up to date (skipped)" in (out / "index.md").read_text()


def test_up_to_date_means_same_arguments_inputs_and_manifest(first_run, checkpoints, tmp_path):
    from generator.zoo.plan import State, job_key, resolve_job, stale_reason
    from generator.zoo.schema import expand, read_zoo

    path, out, _ = first_run
    job = expand(read_zoo(path), path, tmp_path)[0]
    state = State(out)
    r = resolve_job(job)
    assert stale_reason(job, r, job_key(job, r, state), state) is None
    changed = job.model_copy(update={"flags": job.flags.model_copy(update={"kv_cache_len": 128})})
    r2 = resolve_job(changed)
    assert stale_reason(changed, r2, job_key(changed, r2, state), state) == "inputs or build arguments changed"
    key = job_key(job, r, state)
    key["inputs"] = {**key["inputs"], str(Path(job.input) / "config.json"): "0" * 64}  # an edited input
    assert stale_reason(job, r, key, state) == "inputs or build arguments changed"
    stamp = state.stamp_path(job)
    saved = stamp.read_text()
    try:
        stamp.write_text(saved.replace('"manifest_sha256": "', '"manifest_sha256": "0'))  # rebuilt by someone else
        assert stale_reason(job, r, job_key(job, r, state), state) == "its manifest is not the one this zoo recorded"
    finally:
        stamp.write_text(saved)


@pytest.mark.parametrize("body, words", [
    ("models:\n  - variant: no-such-model\n", ["models[0]", "unknown variant 'no-such-model'"]),
    ("models:\n  - variant: smollm2-135m-instruct\n  - variant: smollm2-135m-instruct\n    name: x\n    chips: [AX999]\n",
     ["models[1]", "Unknown chip 'AX999'"]),
    ("models: [unclosed\n", ["not valid YAML", "line 2"]),
    ("models:\n  - variant: smollm2-135m-instruct\n    weight_types: [s3]\n", ["models.0.weight_types.0"]),
    ("models:\n  - variant: smollm2-135m-instruct\n    options: {kv_cache_len: 0}\n", ["kv_cache_len", ">= 1"]),
    ("models: []\n", ["models"]),
    ("- a list\n", ["expected a mapping"]),
])
def test_bad_zoo_files_fail_before_ray_starts(body, words, tmp_path, monkeypatch):
    from generator.zoo import engine

    monkeypatch.setattr(engine, "start", lambda *a, **k: pytest.fail("Ray started for a bad zoo file"))
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(GeneratorError) as err:
        run(path)
    text = str(err.value)
    assert text.startswith(f"Zoo file {path}") and all(w in text for w in words), text


def test_unreachable_ray_address_is_a_clear_error(monkeypatch):
    ray = pytest.importorskip("ray")
    from generator.zoo import engine

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init reached for a closed port"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(GeneratorError, match=r"RAY_ADDRESS=127\.0\.0\.1:1: cannot connect .*Unset RAY_ADDRESS"):
        engine.start()
