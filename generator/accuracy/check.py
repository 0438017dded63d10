"""The accuracy section of `-c 2` (verify/checks.py run_checks): the first `check_tokens` tokens
(data/accuracy.yaml) of the evaluation text, teacher-forced through the bundle in board numerics vs
the reference the checks already loaded. Informational: no limit, it never fails a check; the
figures go in the check summary, report/accuracy.json and report/accuracy.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..contract import Bundle
from .report import summary_line, write_reports
from .run import EVALUATION_TEXT, bundle_logits, model_logits, read_text, score, settings, text_ids, window_for, windows

KEYS = ("kld_mean", "kld_p99", "top1_agreement", "ppl", "ppl_ref", "n_tokens")


def check_reference(bundle: Bundle, model) -> dict[str, Any]:
    """In the checks' reference phase: the tokens, windows and the reference's logits."""
    ids = text_ids(bundle, read_text(None), int(settings()["check_tokens"]))
    spans = windows(len(ids), window_for(bundle))
    return {"ids": ids, "spans": spans, "logits": model_logits(model, ids, spans)}


def check_accuracy(bundle: Bundle, ref: dict[str, Any], console, numerics: str = "board") -> dict[str, Any]:
    """After the runner's checks: the bundle's figures, printed, written to report/, returned for the summary."""
    ids, spans = ref["ids"], ref["spans"]
    values, top_ids = bundle_logits(bundle, ids, spans, numerics=numerics, threads=2)
    targets = np.concatenate([ids[s + 1:e + 1] for s, e in spans])
    result = score(bundle, Path(bundle.dir).name, numerics, ref["logits"], values, top_ids, targets)
    result.info.update(reference="the checks' reference", windows=len(spans), window=window_for(bundle))
    write_reports({"results": [result], "settings": {"numerics": numerics, "max_tokens": len(targets),
                                                     "reference_embedding": "fp32"}}, EVALUATION_TEXT.name,
                  bundle.model)
    console.print(f"accuracy vs fp32 ({EVALUATION_TEXT.name}, {numerics} numerics): {summary_line(result)}",
                  highlight=False)
    out = {k: result.metrics[k] for k in KEYS}
    if result.info.get("note"):
        out["note"] = result.info["note"]
    return out
