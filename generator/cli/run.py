"""`python -m generator run`: the board runtime's command line (main_ax650 flags) on the local runner.

Same flags, same flow and the same log lines as ax-llm's ``main_ax650`` / ``main_axcl_*`` (contract
section 5): the system prompt is prefilled once (``precompute_len``), or loaded from / saved to
``--kvcache_path``; then an interactive loop (``q`` exits, ``reset`` starts over, Ctrl+C stops the
answer being generated) or, with ``--prompt``, one answer. ``--tokenizer_type 2
--url_tokenizer_model URL`` talks to the bundle's tokenizer server over HTTP with the uid protocol,
as the board does; without ``--tokenizer_type`` the bundle's tokenizer runs in-process.
Answers go to stdout, ``[I] ...`` log lines (``ttft: <ms> ms``, ``avg <x> token/s``) to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract import TOKENIZER_URL
from ..errors import GeneratorError
from .types import int_at_least

if TYPE_CHECKING:
    from ..contract import Bundle


NUMERICS_HELP = ("board (default): weights on their int grid, fp32 activations, what the board computes; "
                 "fast: int8 activations (onnxruntime's MatMulNBits accuracy level 4), not what the board "
                 "computes, faster on this CPU")


def add_numerics_arg(p: argparse.ArgumentParser):
    """`--numerics board|fast` (run, serve, bench)."""
    p.add_argument("--numerics", choices=["board", "fast"], default="board", help=NUMERICS_HELP)


def numerics_note(numerics: str) -> str:
    """What a speed line adds to name its numerics: nothing for board, the mode for fast."""
    return " (numerics fast: int8 activations, not the board's)" if numerics == "fast" else ""


def add_backend_args(p: argparse.ArgumentParser):
    """`--backend NAME` and `--config boost.yaml` (run, serve; runtime/backends.py, runtime/boost_config.py)."""
    p.add_argument("--backend", default=None, help="what runs the bundle: onnxruntime (default, the bundle's "
                   "graphs), transformers (the source checkpoint in fp32, for side-by-side answers), or one "
                   "installed under the entry-point group axgen.backends")
    p.add_argument("--config", default=None, help="boost.yaml in the seed's shape (llm_backend, top_k, top_p, "
                   "do_sample, repetition_penalty, max_decode_length, ...); flags override it")


def add_run_args(p: argparse.ArgumentParser):
    p.add_argument("bundle", nargs="?", help="bundle directory (default: derived from --template_filename_axmodel)")
    p.add_argument("--prompt", help="answer this one prompt and exit (else interactive: 'q' exits, 'reset' resets)")
    p.add_argument("--system_prompt", help="system prompt (default: the bundle's)")
    p.add_argument("--max_new_tokens", type=int_at_least(1), default=None, help="cap on generated tokens per turn")
    p.add_argument("--threads", type=int_at_least(1), default=2,
                   help="intra-op threads, one pool shared by all sessions (default 2)")
    p.add_argument("--history", choices=["used", "board"], default="used",
                   help="decode with only the cache rows in use (default, same results) or the full static shapes")
    add_numerics_arg(p)
    add_backend_args(p)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("-i", "--image", help="image file for the first turn, vision-language bundles only; resized "
                   "to the vision part's input size as the board does (default: none)")
    board = p.add_argument_group("board runtime flags (main_ax650 / main_axcl_*), same meaning")
    board.add_argument("--template_filename_axmodel",
                       help="<dir>/<type>_p<P>_l%%d_together.axmodel (selects the bundle)")
    board.add_argument("--axmodel_num", type=int, help="number of layers (checked against the bundle)")
    board.add_argument("--filename_post_axmodel", help="<dir>/<type>_post.axmodel (checked against the bundle)")
    board.add_argument("--filename_tokens_embed", help="<dir>/model.embed_tokens.weight.bfloat16.bin")
    board.add_argument("--tokens_embed_num", type=int, help="vocabulary size (checked)")
    board.add_argument("--tokens_embed_size", type=int, help="hidden size (checked)")
    board.add_argument("--tokenizer_type", type=int, default=None,
                       help="2 = HTTP tokenizer server (uid protocol); omit to tokenize in-process")
    board.add_argument("--url_tokenizer_model", help=f"tokenizer server URL (with --tokenizer_type 2; default "
                                                     f"{TOKENIZER_URL})")
    board.add_argument("--use_mmap_load_embed", type=int, default=1, choices=[0, 1],
                       help="1: read embedding rows from the file (mmap), 0: load the table into memory")
    board.add_argument("--live_print", type=int, default=1, choices=[0, 1],
                       help="1: print the answer as it is generated, 0: print it when complete")
    board.add_argument("--filename_image_encoder_axmodedl", help="<dir>/vision_part_<size>.axmodel, the vision "
                       "part, checked against the bundle; the vendor's spelling (default: the bundle's)")
    board.add_argument("--img_width", type=int, help="vision input width, checked (default: the bundle's)")
    board.add_argument("--img_height", type=int, help="vision input height, checked (default: the bundle's)")
    board.add_argument("--vision_start_token_id", type=int, help="the image's start token id (mRoPE families, "
                       "Qwen2.5-VL), checked against the bundle")
    board.add_argument("--filename_vpm_encoder_axmodedl", help="<dir>/vision_part_<size>.axmodel, a two-stage "
                       "vision part's encoder (MiniCPM-V), checked (default: the bundle's)")
    board.add_argument("--filename_vpm_resampler_axmodedl", help="<dir>/vpm_resampler_<size>.axmodel, its "
                       "resampler, checked (default: the bundle's)")
    board.add_argument("--vpm_two_stage", type=int, choices=[0, 1], help="1: the vision part is encoder + "
                       "resampler (checked against the bundle)")
    board.add_argument("--vpm_width", type=int, help="two-stage vision input width, checked (default: the bundle's)")
    board.add_argument("--vpm_height", type=int, help="two-stage vision input height, checked")
    board.add_argument("--kvcache_path", help="directory: load the system prompt's KV cache from here, or prefill "
                                              "and save it here (k_cache_<i>.bin, v_cache_<i>.bin, config.json)")
    board.add_argument("--devices", help="AXCL card ids, e.g. 0 or 0,1 (accepted and checked; the local runner "
                                         "uses the CPU)")


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
    graphs = bundle.manifest.graphs
    expected = {"template_filename_axmodel": graphs.axmodel_template, "filename_post_axmodel": graphs.post_axmodel,
                "filename_tokens_embed": graphs.embed}
    here = bundle.dir.resolve()
    for flag, name in expected.items():
        value = getattr(args, flag)
        if not value or not name:
            continue
        path = Path(value)
        if path.name != name or path.parent.resolve() != here:
            raise GeneratorError(f"--{flag} {value!r} is not this bundle's file: expected {bundle.dir / name}.")
    vision = bundle.manifest.vision
    check_vpm_flags(args, bundle, here)
    if (args.filename_image_encoder_axmodedl or args.img_width or args.img_height
            or args.vision_start_token_id is not None) and vision is None:
        raise GeneratorError(f"bundle {bundle.dir} is text-only: --filename_image_encoder_axmodedl, --img_width, "
                             f"--img_height and --vision_start_token_id need a vision-language bundle.")
    if vision is not None:
        enc = args.filename_image_encoder_axmodedl
        want = vision.graph.removesuffix(".onnx") + ".axmodel"
        if enc and (Path(enc).name != want or Path(enc).parent.resolve() != here):
            raise GeneratorError(f"--filename_image_encoder_axmodedl {enc!r} is not this bundle's vision part: "
                                 f"expected {bundle.dir / want}.")
        start = args.vision_start_token_id
        if start is not None and (vision.image_grid is None or start != vision.img_start_token_id):
            raise GeneratorError(f"--vision_start_token_id {start}: this bundle's vision part "
                                 + (f"starts images with token {vision.img_start_token_id}." if vision.image_grid
                                    else "takes no start token id (only mRoPE families such as Qwen2.5-VL do)."))
        for flag in ("img_width", "img_height"):
            got = getattr(args, flag)
            if got is not None and got != vision.image_size:
                raise GeneratorError(f"--{flag} {got}: this bundle's vision part was built at {vision.image_size} "
                                     f"px (--image_size); rebuild it for another size.")
    if args.tokenizer_type not in (None, 2):
        raise GeneratorError(f"--tokenizer_type {args.tokenizer_type} is not supported by the local runner: use 2 "
                             f"(the bundle's HTTP tokenizer server) or leave it out to tokenize in-process.")
    if args.devices is not None and not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", args.devices):
        raise GeneratorError(f"--devices {args.devices!r} must be card ids separated by commas, e.g. 0 or 0,1.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise GeneratorError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")


def check_vpm_flags(args, bundle: Bundle, here: Path):
    """The vendor's two-stage (MiniCPM-V) vision flags against the bundle's vision entry."""
    vision = bundle.manifest.vision
    given = [f for f in ("filename_vpm_encoder_axmodedl", "filename_vpm_resampler_axmodedl", "vpm_two_stage",
                         "vpm_width", "vpm_height") if getattr(args, f) is not None]
    if not given:
        return
    two = vision is not None and vision.resampler_graph is not None
    if not two:
        what = "text-only" if vision is None else "a one-graph vision part (use --filename_image_encoder_axmodedl)"
        raise GeneratorError(f"bundle {bundle.dir} is {what}: --{given[0]} needs a two-stage vision part "
                             f"(encoder + resampler, e.g. MiniCPM-V).")
    if args.vpm_two_stage == 0:
        raise GeneratorError(f"--vpm_two_stage 0: this bundle's vision part is two graphs (encoder + resampler); "
                             f"pass 1 or leave the flag out.")
    for flag, graph in (("filename_vpm_encoder_axmodedl", vision.graph),
                        ("filename_vpm_resampler_axmodedl", vision.resampler_graph)):
        value, want = getattr(args, flag), graph.removesuffix(".onnx") + ".axmodel"
        if value and (Path(value).name != want or Path(value).parent.resolve() != here):
            raise GeneratorError(f"--{flag} {value!r} is not this bundle's file: expected {bundle.dir / want}.")
    for flag in ("vpm_width", "vpm_height"):
        got = getattr(args, flag)
        if got is not None and got != vision.image_size:
            raise GeneratorError(f"--{flag} {got}: this bundle's vision part was built at {vision.image_size} px "
                                 f"(--image_size); rebuild it for another size.")


def log(msg: str):
    print(f"[I] {msg}", file=sys.stderr, flush=True)


def make_tokenizer(args):
    if args.tokenizer_type != 2:
        return None
    from ..runtime.tokenizer_client import HttpTokenizer

    url = args.url_tokenizer_model or TOKENIZER_URL
    tok = HttpTokenizer(url)
    log(f"connect {url} ok")
    log(f"uid: {tok.uid}")
    log(f"bos_id: {tok.bos_id}, eos_id: {tok.eos_id}")
    return tok


def run(args) -> int:
    from ..contract import Bundle
    from ..runtime.chat import Chat
    from ..runtime.backends import open_engine  # onnxruntime etc.: only for the command that runs a bundle
    from ..runtime.boost_config import load_config, sampling_settings
    from ..runtime.vision import load_image

    bundle = Bundle(bundle_dir(args))
    check_board_flags(args, bundle)
    tokenizer = make_tokenizer(args)
    cfg = load_config(args.config) if getattr(args, "config", None) else None
    engine, _ = open_engine(bundle, getattr(args, "backend", None), cfg, args.config, args.kvcache_path,
                            threads=args.threads,
                            history=args.history, mmap_embed=bool(args.use_mmap_load_embed),
                            shared_pool=True, numerics=args.numerics)  # this process exists to run the bundle
    chat = Chat(bundle, engine, tokenizer, system_prompt=args.system_prompt, seed=args.seed,
                sampling=sampling_settings(cfg) if cfg else None)
    if cfg is not None and args.max_new_tokens is None:
        args.max_new_tokens = cfg.max_decode_length

    from ..runtime.kvcache import start_over as start_over_with

    def start_over() -> int:
        return start_over_with(chat, args.kvcache_path, log)

    image = [load_image(args.image)] if args.image else []  # read before any work: a bad file fails fast
    if image:
        chat.vision()  # a text-only bundle refuses here
    n = start_over()
    log(f"precompute_len: {n}")
    log(f"system_prompt: {chat.system_prompt}")

    def answer(text: str):
        pieces: list[str] = []
        ttft_logged = False
        cached_before = engine.precompute_len
        try:
            images = [image.pop()] if image else None  # the image goes with the first turn
            for piece in chat.turn(text, args.max_new_tokens, images=images):
                pieces.append(piece)
                if not ttft_logged:  # the board logs ttft when the first token is out
                    ttft_logged = True
                    if args.live_print:
                        log(f"ttft: {chat.stats.ttft_ms:.2f} ms")
                if args.live_print:
                    print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl+C stops this answer, as on the board
            chat.last_reply = "".join(pieces)  # the history holds what was generated so far
            if not args.live_print:
                print(chat.last_reply, end="")
            print(flush=True)
            log("stopped")
            return
        if not args.live_print:
            print("".join(pieces), end="")
        print(flush=True)
        st = chat.stats
        if not (ttft_logged and args.live_print):
            log(f"ttft: {st.ttft_ms:.2f} ms")
        log(f"input token num : {st.prefilled}, reused from the cache: {st.prompt_tokens - st.prefilled} "
            f"(cached before the turn: {cached_before})")
        log(f"{'hit eos,' if st.hit_eos else ''}avg {st.decode_tok_s:.2f} token/s{numerics_note(engine.numerics)}")
        log(f"precompute_len:{engine.precompute_len}, remaining:{engine.C - engine.precompute_len}")

    def guarded(text: str):
        """One turn; if the tokenizer server forgot our session (restarted), start a new one."""
        from ..runtime.tokenizer_client import SessionLostError

        try:
            answer(text)
        except SessionLostError as exc:
            log(f"{exc}; new tokenizer session, conversation reset")
            chat.tok.new_session()
            log(f"reset, precompute_len: {start_over()}")
            answer(text)

    if args.prompt is not None:
        guarded(args.prompt)
        return 0
    print('Type "q" to exit, Ctrl+c to stop current running, "reset" to clear the conversation', file=sys.stderr)
    while True:
        try:
            line = input("prompt >> ")
        except EOFError:
            print(file=sys.stderr)
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        command = line.strip()
        if command == "q":
            break
        if command == "reset":
            log(f"reset, precompute_len: {start_over()}")
            continue
        if command:
            guarded(line)
    return 0
