"""Bundle: write everything a board (and our local runner) needs into out/<model>_<chip>/.

The build goes to a temporary sibling directory (`staged`) and is renamed into place (`publish`)
only when complete (graphs, post, embedding table, tokenizer, scripts, checks, and last the
manifest), so a failed or interrupted build never leaves a bundle that looks complete. The
pipeline (generator/pipeline.py) calls these in order, verification between writing and publishing.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import platform
import secrets
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import ValidationError

from ..contract import (EMBED_FILE, FORMAT_VERSION, MANIFEST, POST_CONFIG, TOKENIZER_HOST, TOKENIZER_PORT, Manifest,
                        layer_axmodel_name, layer_data_name, layer_graph_name, post_stem, tokenizer_dir_name,
                        tokenizer_script_name)
from ..errors import GeneratorError
from ..limits import validation_text
from ..inputs.checkpoint import recipe_chat_template, sha256_file
from ..interrupt import signals_held, sigterm_unwinds
from ..names import inside
from ..paths import PROJECT_ROOT, TEMPLATES_DIR, TOKENIZER_SERVER
from ..progress import Progress
from ..resolve.resolved import Resolved
from ..inputs.gptq import provenance
from .graphs import layer_graph, post_graph, store_layer, store_post
from .onnx_graph import WeightsFile
from .parallel import Workers
from .quant import to_bf16_bits
from .vision import vision_entry, write_vision
from .weights import WeightSource

RUN_TARGETS = {  # run script flavours (contract section 5); "board" is named after the chip as the user typed it
    "board": (None, "main_ax650", None),
    "axcl_x86": ("AXCL x86_64 host", "main_axcl_x86", "0"),
    "axcl_aarch64": ("AXCL aarch64 host", "main_axcl_aarch64", "0"),
}


def template_env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), undefined=StrictUndefined, keep_trailing_newline=True,
                      autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))  # every value that reaches a shell
    env.filters["c"] = lambda v: "".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in str(v))  # comments
    return env


def dest(root: Path, *parts: str) -> Path:
    """Where a bundle file goes: root/parts, refused with a GeneratorError unless it stays inside root.
    Every file the bundle writer (and the verification report) writes gets its path here."""
    return inside(root, Path(root).joinpath(*parts), "bundle file")


def write_text(path: Path, text: str, executable: bool = False):
    path.write_text(text, encoding="utf-8")
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def tool_versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    from .. import __version__

    return {"axgen": __version__, "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__, "numpy": np.__version__}


def recipe_sha256(recipe) -> str:
    """sha256 of the flattened recipe (its `extends` parents merged in), so a parent's edit shows too."""
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


_JOB: tuple | None = None  # (spec, opts, source, groups, tmp) of the running write_graphs, for forked workers


def build_layer(i: int):
    """Layer i: its weights file and one graph per shape group, into the build folder (in-process or
    in a worker forked by write_graphs, which inherits _JOB)."""
    spec, opts, src, groups, tmp = _JOB
    mt, P = spec.model_type, opts.prefill_len  # file names: generator/contract.py
    wf = WeightsFile(dest(tmp, layer_data_name(mt, P, i)))
    try:
        inits, refs = store_layer(wf, spec, opts, i, src.layer(i))
    finally:
        wf.close()
    for group in groups:
        onnx.save_model(layer_graph(spec, opts, i, group, refs, inits), dest(tmp, layer_graph_name(mt, P, i, group.index)))
    return i


def write_embed(embed: np.ndarray, scale: float, path: Path, rows: int = 8192):
    """The board's embedding table (bf16 bits) in row blocks, so no second table-sized temporary; the board
    reads rows of it, and embedding scales (Gemma, MiniCPM) are applied here."""
    with open(path, "wb") as f:
        for r in range(0, embed.shape[0], rows):
            block = embed[r:r + rows]
            to_bf16_bits(block if scale == 1.0 else block * np.float32(scale)).tofile(f)


def build_post(_: int = 0):
    """The post graph (final norm + lm_head) and the board's embedding table (in-process or in a worker)."""
    spec, opts, src, _groups, tmp = _JOB
    mt = spec.model_type
    embed = src.embed_tokens()
    write_embed(embed, spec.embedding_scale, dest(tmp, EMBED_FILE))
    if not spec.tie_word_embeddings:  # an untied head is read with the embedding table freed
        del embed
        embed = None
    head = src.lm_head(embed)
    del embed
    wf = WeightsFile(dest(tmp, f"{post_stem(mt)}.data"))
    try:
        inits, refs = store_post(wf, spec, opts, src.final_norm(), head)
    finally:
        wf.close()
    del head
    onnx.save_model(post_graph(spec, opts, refs, inits), dest(tmp, f"{post_stem(mt)}.onnx"))


def write_graphs(ctx: Resolved, tmp: Path, progress: Progress, parallel: int = 1) -> dict[str, Any]:
    """The decoder layers, then the post graph and the embedding table; with `parallel` > 1 all of them by
    forked worker processes (export/parallel.py), the post graph, the longest piece, queued first."""
    global _JOB
    spec, opts = ctx.spec, ctx.opts
    src = WeightSource(ctx.ckpt, ctx.recipe, spec)
    groups = opts.groups()
    mt, P = spec.model_type, opts.prefill_len  # file names: generator/contract.py
    _JOB = (spec, opts, src, groups, tmp)
    try:
        with Workers(parallel, "the decoder layers and the post graph") as workers:
            post = [workers.submit(build_post, 0)] if parallel > 1 else []
            layers = [workers.submit(build_layer, i) for i in range(spec.num_hidden_layers)]
            with progress.task("building llm decode layers", spec.num_hidden_layers) as step:
                workers.wait(layers, step)
            with progress.task("building llm post layer", 1) as step:
                workers.wait(post or [workers.submit(build_post, 0)], step)
    finally:
        _JOB = None
    return {  # the templates as data for other tools (the board's axmodel template is printf's %d)
        "layer_template": layer_graph_name(mt, P, "%d", "{group}"),
        "layer_data_template": layer_data_name(mt, P, "%d"),
        "axmodel_template": layer_axmodel_name(mt, P, "%d"),
        "post": f"{post_stem(mt)}.onnx",
        "post_axmodel": f"{post_stem(mt)}.axmodel",
        "embed": EMBED_FILE,
        "groups": [g.model_dump() for g in groups],
    }


def write_tokenizer(ctx: Resolved, tmp: Path, vision: dict[str, Any] | None = None) -> dict[str, str]:
    tok_dir = dest(tmp, tokenizer_dir_name(ctx.model))
    tok_dir.mkdir()
    ctx.ckpt.check_tokenizer()
    files = ctx.ckpt.tokenizer_files()
    try:  # what transformers itself uses (it may rebuild tokenizer.json from vocab/merges)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(ctx.ckpt.dir).save_pretrained(tok_dir)
    except Exception:  # a tokenizer transformers cannot load without remote code: ship the files
        for f in files:
            shutil.copy2(f, dest(tok_dir, f.name))
    chat = ctx.recipe.chat
    eos = list(dict.fromkeys(ctx.spec.eos_token_ids))
    gen_cfg = ctx.ckpt.dir / "generation_config.json"
    if gen_cfg.is_file():
        shutil.copy2(gen_cfg, dest(tok_dir, gen_cfg.name))
        extra = json.loads(gen_cfg.read_text()).get("eos_token_id")
        for e in extra if isinstance(extra, list) else [extra]:
            if isinstance(e, int) and e not in eos:
                eos.append(e)
    chat_fallback = recipe_chat_template(tok_dir, ctx.recipe, ctx.variant)  # a base model's GGUF has no template
    eos += [e for e in (chat_fallback or {}).get("eos_ids", []) if e not in eos]
    ax = {"bos_id": ctx.spec.bos_token_id if ctx.spec.bos_token_id is not None else -1,
          "eos_id": eos[0] if eos else -1, "eos_ids": eos, "system_prompt": ctx.system_prompt,
          "img_start_token": chat.img_start_token, "img_context_token": chat.img_context_token,
          "img_end_token": chat.img_end_token, "img_token_num": chat.img_token_num}
    if vision is not None:  # the image tokens and their count at this build's --image_size
        ax.update(img_start_token=vision["img_start_token"], img_context_token=vision["img_context_token"],
                  img_end_token=vision["img_end_token"], img_token_num=vision["tokens"],
                  img_text_separator=vision["img_text_separator"])
    write_text(dest(tok_dir, "ax_tokenizer.json"), json.dumps(ax, indent=2, ensure_ascii=False) + "\n")
    script = tokenizer_script_name(ctx.model)
    shutil.copy2(TOKENIZER_SERVER, dest(tmp, script))
    dest(tmp, script).chmod(0o755)
    return {"dir": tok_dir.name, "server": script, **({"chat_template": chat_fallback} if chat_fallback else {})}


def write_scripts(ctx: Resolved, tmp: Path, files: dict, tok: dict, vision: dict | None = None,
                  entry: dict | None = None) -> list[str]:
    """run_<model>_<target>.sh for each of the chip's run targets (contract section 5), then the build script.

    Every value from the recipe, the checkpoint or the user reaches the shell through the `q` filter
    (shlex.quote); values shown in comments go through `c` (control characters, newlines included,
    become spaces, so nothing can end the comment)."""
    env = template_env()
    spec, opts = ctx.spec, ctx.opts
    chip = ctx.chip.label  # the name the user typed (AX630C stays AX630C); Pulsar2's --chip is pulsar2_chip
    common = dict(model=ctx.model, recipe=ctx.recipe.name, chip=chip, chip_lower=chip.lower(),
                  system_prompt=ctx.system_prompt, num_layers=spec.num_hidden_layers, vocab_size=spec.vocab_size,
                  hidden_size=spec.hidden_size, layer_template=files["axmodel_template"], post_file=files["post_axmodel"],
                  embed_file=files["embed"], tokenizer_script=tok["server"], tokenizer_dir=tok["dir"],
                  tokenizer_host=TOKENIZER_HOST, tokenizer_port=TOKENIZER_PORT, use_mmap_load_embed=0,
                  python=sys.executable, project_root=str(PROJECT_ROOT),
                  vision_axmodel=vision["graph"].removesuffix(".onnx") + ".axmodel" if vision else None,
                  image_size=vision["image_size"] if vision else None,
                  resampler_axmodel=vision["resampler_graph"].removesuffix(".onnx") + ".axmodel"
                  if vision and vision.get("resampler_graph") else None,
                  # mRoPE families (Qwen2.5-VL): the board computes image positions from the start token
                  vision_start_token_id=entry.get("img_start_token_id") if entry and entry.get("image_grid") else None)
    written = []
    for target in ctx.chip.run_scripts:
        title, binary, devices = RUN_TARGETS[target]
        target = chip.lower() if target == "board" else target
        name = f"run_{ctx.model}_{target}.sh"
        text = env.get_template("run.sh.j2").render(**common, target=target, chip_title=title or chip,
                                                     main_binary=binary, devices=devices, script_name=name)
        write_text(dest(tmp, name), text, executable=True)
        written.append(name)
    name = f"build_{chip.lower()}.sh"
    text = env.get_template("build.sh.j2").render(
        model=ctx.model, chip=chip, chip_lower=chip.lower(), input_path=str(ctx.ckpt.dir.resolve()),
        hidden_state_type=opts.hidden_state_type, weight_type=opts.weight_type, post_weight_type=opts.post_weight_type,
        kv_cache_len=opts.kv_cache_len, prefill_len=opts.prefill_len, last_kv_cache_len=opts.last_kv_cache_len,
        post_topk=opts.post_topk, pulsar2_chip=ctx.chip.pulsar2_chip, embed_file=files["embed"])
    write_text(dest(tmp, name), text, executable=True)
    written.append(name)
    write_text(dest(tmp, "README.md"), env.get_template("bundle_README.md.j2").render(**common, scripts=written))
    return written


def file_listing(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def check_output_folder(out_dir: Path, ckpt_dir: Path):
    """A build replaces its output folder as a whole, so that folder must be new, empty, or an earlier
    bundle (it has a manifest.json), and must not hold the input checkpoint."""
    where = f"The output folder '{out_dir}' (--output_path / make OUTPUT=)"
    if not out_dir.name:
        raise GeneratorError(f"{where} names no folder; give a new folder for the bundle, e.g. out/my-model_ax650.")
    if out_dir.exists() and not out_dir.is_dir():
        raise GeneratorError(f"{where} is an existing file; expected a folder for the bundle.")
    ckpt = ckpt_dir.resolve()
    if ckpt == out_dir.resolve() or out_dir.resolve() in ckpt.parents:
        raise GeneratorError(f"{where} contains the input checkpoint '{ckpt_dir}'; a build replaces its output folder "
                             f"as a whole. Choose another folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise GeneratorError(f"{where} exists and is not an axgen bundle (it has files but no {MANIFEST}); a build "
                             f"replaces its output folder as a whole, so it refuses to. Choose a new or empty folder.")


@contextmanager
def folder_lock(folder: Path, blocking: bool = True):
    """An flock on a directory: yields True while held (False when `blocking` is off and another holds it)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def remove_stale(out_dir: Path):
    """Remove the temporary folders of earlier builds of this target that died (SIGKILL, power loss): a running
    build holds a lock on its own temporary folder for as long as it runs, a dead one's lock is free.
    Called with the parent folder locked, so no build is between creating its folder and locking it."""
    for kind in ("tmp", "old"):
        for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            if path.is_symlink() or not path.is_dir():  # not one of ours
                continue
            with folder_lock(path, blocking=False) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged(out_dir: Path, ckpt_dir: Path) -> Iterator[Path]:
    """A new temporary folder `.<name>.tmp-*` next to `out_dir`, locked by this build while it runs, for
    the bundle to be written (and verified) in. Leaving the block removes it unless it was published;
    Ctrl+C and SIGTERM unwind through here, and the next build of the target removes those of builds
    that died."""
    check_output_folder(out_dir, ckpt_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    with sigterm_unwinds(), ExitStack() as stack:
        with folder_lock(parent):
            remove_stale(out_dir)
            tmp = dest(parent, f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            tmp.mkdir()  # the permissions of any new folder (0755 under the usual umask), not mkdtemp's 0700
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)  # a no-op once published
            stack.enter_context(folder_lock(tmp))
        yield tmp


def publish(tmp: Path, final: Path):
    """Replace `final` with the finished `tmp` directory, under the parent folder's lock; a SIGTERM
    between the two renames is handled after both."""
    with folder_lock(final.parent), signals_held():
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_manifest(tmp: Path, manifest: dict[str, Any]):
    """manifest.json, validated against the bundle contract's Manifest (generator/contract.py) first, so a
    build never writes a manifest the runtime would refuse."""
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise GeneratorError(f"internal error: the manifest does not follow the bundle contract: "
                             f"{validation_text(exc)}") from None
    write_text(dest(tmp, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def write_bundle(ctx: Resolved, tmp: Path, progress: Progress, extra: dict[str, Any],
                 image_size: int | None = None, parallel: int = 1) -> dict[str, Any]:
    """Everything into `tmp`, the manifest last (without the file listing: `finish` adds it once the
    verification report is written too). `extra`: manifest entries of the pipeline (synthetic, ...)."""
    started = time.time()
    files = write_graphs(ctx, tmp, progress, parallel)
    write_text(dest(tmp, POST_CONFIG), json.dumps(ctx.recipe.sampling.model_dump(), indent=4) + "\n")
    vision = write_vision(ctx, tmp, progress, image_size)  # None for text-only models
    tok = write_tokenizer(ctx, tmp, vision)
    if vision is not None:
        extra = {**extra, "vision": vision_entry(vision, tmp / tok["dir"])}
    scripts = write_scripts(ctx, tmp, files, tok, vision, extra.get("vision"))
    build_seconds = time.time() - started
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": ctx.model,
        "recipe": {"name": ctx.recipe.name, "file": ctx.recipe_path.name, "sha256": recipe_sha256(ctx.recipe),
                   "variant": ctx.variant},
        "chip": ctx.chip.name,
        "options": ctx.opts.model_dump(),
        "spec": ctx.spec.model_dump(),
        "input": {"source": ctx.ckpt.source, "files": ctx.ckpt.fingerprint(),
                  **provenance(ctx.ckpt.config)},
        "tools": tool_versions(),
        "graphs": files,
        "tokenizer": tok,
        "scripts": scripts,
        "system_prompt": ctx.system_prompt,
        "non_standard_ops": [],
        "build_seconds": round(build_seconds, 2),
        **extra,
    }
    write_manifest(tmp, manifest)
    return manifest


def finish(tmp: Path, manifest: dict[str, Any], checks: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest completed: the verification summary (when verified) and the listing of every file."""
    if checks is not None:
        manifest["checks"] = checks
    manifest["files"] = file_listing(tmp)
    write_manifest(tmp, manifest)
    return manifest
