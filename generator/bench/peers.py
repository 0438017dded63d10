"""Peers in `make bench`'s table (`--peers`, `make bench-peers`): llama.cpp (llama-cpp-python) at the
given quantization types, and onnxruntime-genai at int8 / int4, on the same prompt ids, each measured in
its own process like our contenders, with its KLD against the same fp32 reference.

The peers live in their own folder, never the project venv: `make bench-peers` installs them with
`pip install --target .cache/peers/site` (onnxruntime-genai uses the project's onnxruntime; its model
builder needs onnx-ir). llama.cpp re-quantizes the reference GGUF (accuracy/peers.py); onnxruntime-genai's
builder converts the reference's Hugging Face folder. Their files go under <out>/peers/, made once. A
missing peer is one row with a note, not a failure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..paths import PROJECT_ROOT

PEERS_SITE = PROJECT_ROOT / ".cache" / "peers" / "site"
GENAI = {"int8": "s8", "int4": "s4"}


def bits_of(peer: str) -> str:
    """The weight type a peer is compared with: Q8_*/int8 -> s8, Q4_*/int4 -> s4 (others: their own name)."""
    p = peer.upper()
    if p.startswith("Q8") or p == "INT8":
        return "s8"
    if p.startswith("Q4") or p == "INT4":
        return "s4"
    return peer


def missing_note(what: str) -> str:
    site = PEERS_SITE.relative_to(PROJECT_ROOT) if PEERS_SITE.is_relative_to(PROJECT_ROOT) else PEERS_SITE
    return f"{what} not installed: `make bench-peers` installs it into {site} (never needed by the tests)"


def run_peers(args, bundles: dict, first, ids: list[int], acc: dict, work: Path, root: Path, console) -> list[dict]:
    """One row per --peers entry: measured, or a note saying why not."""
    from . import child_env, run_child, score

    rows = []
    a = acc.get(next(iter(bundles))) if acc else None  # one reference: the bundles share their checkpoint
    base = {"ids": ids, "tokens": args.tokens, "runs": args.runs, "threads": args.threads,
            "accuracy": {"ids": a["ids"], "spans": a["spans"]} if a else None}
    for n, peer in enumerate(args.peers):
        genai = peer.lower() in GENAI
        label = f"onnxruntime-genai {peer.lower()}" if genai else f"llama.cpp {peer.upper()}"
        row = {"label": label, "kind": "genai" if genai else "llama.cpp", "weight_type": bits_of(peer), "peer": True}
        console.print(f"running {label} ...")
        try:
            path = genai_path(first, peer.lower(), root, console) if genai else llama_path(first, peer, root, work, args)
        except PeerMissing as exc:
            rows.append(dict(row, note=str(exc)))
            continue
        logits = work / f"p{n}.npy"
        res = run_child(dict(base, kind=row["kind"], path=str(path), logits=str(logits)), work, f"p{n}", peers=True)
        if "missing" in res:
            res = {"note": missing_note(label.split()[0])}
        if a:
            score(res, logits, a)
        res["file_mib"] = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir())) / 2**20
        rows.append({**row, "path": str(path), **res})
    return rows


class PeerMissing(Exception):
    pass


def llama_path(first, peer: str, root: Path, work: Path, args) -> Path:
    from ..accuracy.run import reference_path
    from . import run_child

    source = Path(reference_path(first))
    if source.suffix != ".gguf" or not source.is_file():
        raise PeerMissing(f"llama.cpp re-quantizes the reference GGUF; {first.dir.name}'s reference is {source.name}")
    res = run_child({"kind": "llama.cpp-quantize", "source": str(source), "qtype": peer, "root": str(root),
                     "threads": args.threads}, work, "quantize", peers=True)
    if "missing" in res:
        raise PeerMissing(missing_note("llama-cpp-python"))
    if "error" in res:
        raise PeerMissing(res["error"])
    return Path(res["path"])


def genai_path(first, precision: str, root: Path, console) -> Path:
    from ..accuracy.peers import genai_build
    from ..accuracy.run import reference_path
    from ..errors import GeneratorError
    from ..inputs.checkpoint import open_input
    from . import child_env

    env = child_env(peers=True)
    probe = subprocess.run([sys.executable, "-c", "import onnxruntime_genai, onnx_ir"], capture_output=True, env=env)
    if probe.returncode != 0:
        raise PeerMissing(missing_note("onnxruntime-genai"))
    if first.manifest.synthetic:
        raise PeerMissing("synthetic bundle: onnxruntime-genai's builder needs a real checkpoint")
    hf_dir = open_input(reference_path(first)).dir
    try:
        return genai_build(Path(hf_dir), precision, root, env, log=console.print)
    except GeneratorError as exc:
        raise PeerMissing(str(exc)) from None
