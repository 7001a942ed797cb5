"""`gptneo serve`: keep a model loaded behind an OpenAI-compatible HTTP API.

Thin: merge the flags with the settings, bind the socket (a busy port fails before the
model loads), load the model, start the scheduler and run the app (gptneo_cli.server)
under uvicorn. fastapi, uvicorn and torch are imported inside the command only, so
`gptneo --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..options import config_from, option
from ..settings import Settings, load_settings
from .help import examples
from .loading import ModelOptions, import_torch, load_model
from .options import DebugOpt, loading_options, max_running_option

if TYPE_CHECKING:
    from ..conversation import ChatTemplate

SERVER_PANEL = "Server"
#: New requests' prompt tokens prefilled per step, in chunks: a burst of short prompts
#: starts in one step instead of four, while a long prompt still gets one chunk a step.
SERVE_PREFILL_CHUNKS = 4


def register(app: typer.Typer) -> None:
    app.command(
        "serve",
        epilog=examples(
            ("Serve the demo model on http://127.0.0.1:8000", "gptneo serve --model tiny"),
            ("Open to the network, with a key", "gptneo serve --host 0.0.0.0 --api-key SECRET"),
        ),
    )(serve)


@loading_options(quantize=True)
def serve(
    loading: dict[str, Any] | None = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            rich_help_panel=SERVER_PANEL,
            help="Address to bind; 0.0.0.0 opens it to the network.",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port",
            "-p",
            min=0,
            max=65535,
            rich_help_panel=SERVER_PANEL,
            help="Port (0 picks a free one).",
        ),
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            rich_help_panel=SERVER_PANEL,
            show_default=False,
            help="Clients must send Authorization: Bearer KEY on /v1/*, /tokenize and "
            "/detokenize. (env GPTNEO_API_KEY)",
        ),
    ] = None,
    max_running: Annotated[int, max_running_option(SERVER_PANEL)] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            min=0,
            max=100000,
            rich_help_panel=SERVER_PANEL,
            help="Requests waiting for a row; beyond it: 429 with Retry-After.",
        ),
    ] = 64,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            min=1,
            max=8192,
            rich_help_panel=SERVER_PANEL,
            help="Prompt tokens per prefill chunk: a long prompt gets one chunk a step, which "
            "bounds how long it delays the running streams; new short prompts share up to 4 "
            "chunks' worth a step.",
        ),
    ] = 128,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            rich_help_panel=SERVER_PANEL,
            show_default=False,
            help="Allow browsers from this origin (repeatable). No CORS headers otherwise.",
        ),
    ] = None,
    max_body: Annotated[
        int,
        typer.Option(
            "--max-body-kb",
            min=1,
            rich_help_panel=SERVER_PANEL,
            help="Largest request body in KiB (413 beyond).",
        ),
    ] = 4096,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            min=0,
            rich_help_panel=SERVER_PANEL,
            help="On Ctrl-C/SIGTERM: seconds running requests get to finish.",
        ),
    ] = 10.0,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            rich_help_panel=SERVER_PANEL,
            show_default=False,
            help="How /v1/chat/completions lays out messages: default (User:/Assistant:), "
            "human-ai, qa, or a JSON/TOML file with user_prefix, assistant_prefix and "
            "system. (default: the chat settings user_prefix, assistant_prefix, system)",
        ),
    ] = None,
    prompt_lookup: Annotated[
        int | None,
        typer.Option(
            "--prompt-lookup",
            metavar=option("prompt_lookup").type_label(),
            show_default=False,
            rich_help_panel=SERVER_PANEL,
            help="Speculative decoding for requests that do not set prompt_lookup: each row "
            "drafts tokens copied from where its last N tokens occurred before in its own "
            "text, verified in the decode step. (default: 0, off)",
        ),
    ] = None,
    draft_tokens: Annotated[
        int | None,
        typer.Option(
            "--draft-tokens",
            metavar=option("draft_tokens").type_label(),
            show_default=False,
            rich_help_panel=SERVER_PANEL,
            help="Tokens drafted per step with --prompt-lookup or --draft-model, for "
            "requests that do not set draft_tokens. (default: 5)",
        ),
    ] = None,
    draft_model: Annotated[
        str | None,
        typer.Option(
            "--draft-model",
            metavar="NAME",
            show_default=False,
            rich_help_panel=SERVER_PANEL,
            help="Speculative decoding with a draft model, loaded at start: any GPT-Neo with "
            "the same tokenizer (name or folder), or self-int8 (this model's own int8 copy). "
            "Requests that set neither prompt_lookup nor draft_model draft with it; each row "
            "keeps its own draft cache.",
        ),
    ] = None,
    log_prompts: Annotated[
        bool,
        typer.Option(
            "--log-prompts",
            rich_help_panel=SERVER_PANEL,
            help="Put the prompt text in the per-request log lines (off: never logged).",
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming)."""
    settings = load_settings()
    options = ModelOptions.merge(settings, **(loading or {}))
    key = settings.get("api_key", api_key) or os.environ.get("GPTNEO_API_KEY") or None
    template = chat_template_of(settings, chat_template)
    drafting = drafting_defaults(prompt_lookup, draft_tokens, draft_model)
    from ..server.run import bind, make_server, url

    try:
        sock = bind(host, port)
    except OSError as exc:
        from ..errors import GPTNeoError

        raise GPTNeoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if host in ("0.0.0.0", "::") and not key:
        print(
            f"Warning: listening on {host} without --api-key: anyone who can reach this "
            "machine can use the model",
            file=sys.stderr,
        )
    from ..threads import passive_openmp_waits

    passive_openmp_waits()  # the model runs on the scheduler's thread
    import_torch()
    loaded = load_model(options, "auto", fast=True, long_running=True)  # a classifier: its head
    if draft_model is not None:
        from .loading import load_draft

        load_draft(loaded, config_from(drafting))  # a bad draft fails before serving
    from ..api import make_scheduler
    from ..server.app import ServeOptions, create_app, stderr_log

    scheduler = make_scheduler(
        loaded.model,
        loaded.tokenizer,
        max_running=max_running,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        prefill_budget=SERVE_PREFILL_CHUNKS * prefill_chunk,
    )
    app = create_app(
        loaded.model,
        loaded.tokenizer,
        scheduler,
        ServeOptions(
            model_name=options.model,
            api_key=key,
            max_body_bytes=max_body * 1024,
            cors_origins=list(cors_origin or []),
            log_prompts=log_prompts,
            shutdown_timeout=shutdown_timeout,
            chat_template=template,
            log=stderr_log,
            aliases=_aliases(options.model),
            drafting=drafting,
        ),
    )

    def ready() -> None:
        print(
            f"gptneo serve: {url(sock)} (model {options.model}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )

    def stop_running() -> None:
        """At the first signal: requests get the grace period, then are cancelled."""
        threading.Thread(target=scheduler.close, args=(shutdown_timeout,), daemon=True).start()

    server = make_server(app, shutdown_timeout, ready, on_exit=stop_running)
    server.run(sockets=[sock])
    scheduler.close(0)


def drafting_defaults(
    prompt_lookup: int | None, draft_tokens: int | None, draft_model: str | None = None
) -> dict[str, Any]:
    """--prompt-lookup / --draft-tokens / --draft-model, checked as generate checks them
    (an OptionError naming the flag)."""
    given = {
        "prompt_lookup": prompt_lookup,
        "draft_tokens": draft_tokens,
        "draft_model": draft_model,
    }
    out = {name: option(name).check(value) for name, value in given.items() if value is not None}
    config_from(out)  # --prompt-lookup with --draft-model: "use one"
    return out


def chat_template_of(settings: Settings, flag: str | None) -> ChatTemplate:
    """--chat-template (or the chat_template setting), else the chat command's settings
    (serve and batch render chat requests with it)."""
    from ..conversation import ChatTemplate, load_chat_template

    spec = settings.get("chat_template", flag)
    if spec:
        try:
            return load_chat_template(spec)
        except ValueError as exc:
            raise ValueError(f"--chat-template: {exc}") from None
    return ChatTemplate(
        user_prefix=settings.get("user_prefix") or "User:",
        assistant_prefix=settings.get("assistant_prefix") or "Assistant:",
        system=settings.get("system") or "",
    )


def _aliases(name: str) -> list[str]:
    """Names clients may send as `model`: the alias and the repo id it stands for."""
    from ..hub import ALIASES

    lowered = name.strip().lower()
    out = [ALIASES[lowered]] if lowered in ALIASES else []
    out += [alias for alias, repo in ALIASES.items() if repo == name.strip()]
    return out
