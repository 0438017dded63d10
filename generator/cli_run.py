"""`python -m generator run`: the board runtime's command line (main_ax650 flags) on the local runner."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import GeneratorError
from .runner import Bundle, Chat, Engine


def add_run_args(p: argparse.ArgumentParser):
    p.add_argument("bundle", nargs="?", help="bundle directory (default: derived from --template_filename_axmodel)")
    p.add_argument("--prompt", help="answer this one prompt and exit (else interactive: 'q' exits, 'reset' resets)")
    p.add_argument("--system_prompt", help="system prompt (default: the bundle's)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="cap on generated tokens per turn")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, one pool shared by all sessions (default 2)")
    p.add_argument("--history", choices=["used", "board"], default="used",
                   help="decode with only the cache rows in use (default, same results) or the full static shapes")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    board = p.add_argument_group("board runtime flags (main_ax650 / main_axcl_*), same meaning")
    board.add_argument("--template_filename_axmodel")
    board.add_argument("--axmodel_num", type=int)
    board.add_argument("--filename_post_axmodel")
    board.add_argument("--filename_tokens_embed")
    board.add_argument("--tokens_embed_num", type=int)
    board.add_argument("--tokens_embed_size", type=int)
    board.add_argument("--tokenizer_type", type=int, default=None, help="2 = HTTP tokenizer server")
    board.add_argument("--url_tokenizer_model", help="tokenizer server URL (with --tokenizer_type 2)")
    board.add_argument("--use_mmap_load_embed", type=int, default=1)
    board.add_argument("--live_print", type=int, default=1)
    board.add_argument("--kvcache_path", help="save/load the system-prompt KV cache here")
    board.add_argument("--devices", help="AXCL card ids (accepted; the local runner uses the CPU)")


def bundle_dir(args) -> Path:
    if args.bundle:
        return Path(args.bundle)
    for flag in ("template_filename_axmodel", "filename_post_axmodel", "filename_tokens_embed"):
        value = getattr(args, flag)
        if value:
            return Path(value).parent
    raise GeneratorError("run: give the bundle directory, or the board flags (--template_filename_axmodel ...).")


def check_board_flags(args, bundle: Bundle):
    s = bundle.spec
    for flag, want in (("axmodel_num", s.num_hidden_layers), ("tokens_embed_num", s.vocab_size),
                       ("tokens_embed_size", s.hidden_size)):
        got = getattr(args, flag)
        if got is not None and got != want:
            raise GeneratorError(f"--{flag} {got} does not match the bundle {bundle.dir} ({want}).")
    tpl = args.template_filename_axmodel
    if tpl and "%d" not in tpl:
        raise GeneratorError(f"--template_filename_axmodel {tpl!r} must contain %d (the layer index).")


def log(msg: str):
    print(f"[I] {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    bundle = Bundle(bundle_dir(args))
    check_board_flags(args, bundle)
    tokenizer = None
    if args.tokenizer_type == 2:
        from .tokenizer_client import HttpTokenizer

        tokenizer = HttpTokenizer(args.url_tokenizer_model or "http://127.0.0.1:12345")
    engine = Engine(bundle, threads=args.threads, history=args.history, mmap_embed=bool(args.use_mmap_load_embed))
    chat = Chat(bundle, engine, tokenizer, system_prompt=args.system_prompt, seed=args.seed)
    if args.kvcache_path:
        from .kvcache import restore_or_prefill

        n = restore_or_prefill(chat, Path(args.kvcache_path), log)
    else:
        n = chat.reset()
    log(f"precompute_len: {n}")
    log(f"system_prompt: {chat.system_prompt}")

    def answer(text: str):
        pieces = []
        for piece in chat.turn(text, args.max_new_tokens):
            pieces.append(piece)
            if args.live_print:
                print(piece, end="", flush=True)
        if not args.live_print:
            print("".join(pieces), end="")
        print(flush=True)
        st = chat.stats
        log(f"ttft: {st.ttft_ms:.2f} ms")
        log(f"{'hit eos,' if st.hit_eos else ''}avg {st.decode_tok_s:.2f} token/s")
        log(f"precompute_len:{engine.precompute_len}, remaining:{engine.C - engine.precompute_len}")

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print('Type "q" to exit, "reset" to clear the conversation', file=sys.stderr)
    while True:
        try:
            line = input("prompt >> ")
        except EOFError:
            break
        if line.strip() == "q":
            break
        if line.strip() == "reset":
            log(f"reset, precompute_len: {chat.reset()}")
            continue
        if line.strip():
            answer(line)
    return 0
