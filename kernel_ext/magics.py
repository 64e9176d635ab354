"""`%%chat`, `%models` and `%usage`: the service from a notebook cell, with the kernel's own Hub token.

Every failure (not in a Hub, service unreachable, refused) is one printed line, never a traceback: a cell that
calls a magic is a user's experiment, and the line says what to fix.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from contextlib import contextmanager

import openai
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import Markdown, display

from .discovery import ServiceNotFound, find_service
from .service_api import InferenceClient, InferenceError

PREFIX = "kernel_ext: "
USAGE_DAYS = 30


def openai_client(location=None) -> openai.OpenAI:
    """The real OpenAI SDK pointed at the service (`<service>/v1`), with the kernel's token."""
    base_url, token = location or find_service()
    return openai.OpenAI(base_url=base_url + "v1", api_key=token)


@contextmanager
def one_line_errors():
    """Print what went wrong in one line instead of a traceback."""
    try:
        yield
    except (ServiceNotFound, InferenceError, openai.OpenAIError) as e:
        print(PREFIX + _message(e))


def _message(error: Exception) -> str:
    """The service's own message from an OpenAI SDK error (its envelope), else the exception's first line."""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and body.get("message"):  # the SDK unwraps {"error": {...}}
        text = str(body["message"])
    else:
        text = str(error) or type(error).__name__
    return text.splitlines()[0] if text else type(error).__name__


@magics_class
class InferenceMagics(Magics):
    """The magics `load_ipython_extension` registers; the service is located once per call."""

    def _client(self) -> InferenceClient:
        return InferenceClient(*find_service())

    @line_magic
    def models(self, line: str = "") -> None:
        """List the models you may call: name and task."""
        with one_line_errors():
            models = self._client().models()
            if not models:
                print("No models you may call.")
            width = max((len(m["id"]) for m in models), default=0)
            for m in models:
                print(f"{m['id']:<{width}}  {m.get('task', '')}")

    @line_magic
    def usage(self, line: str = "") -> None:
        """Your use of the last 30 days by model, and what is left of your quota."""
        with one_line_errors():
            client = self._client()
            report = client.usage(group_by="model", bucket="day")
            by_model: dict[str, dict[str, int]] = defaultdict(lambda: {"requests": 0, "total_tokens": 0})
            for row in report["rows"]:
                for count in ("requests", "total_tokens"):
                    by_model[row["group"] or "(none)"][count] += row[count]
            print(f"Usage since {report['since'][:10]} (last {USAGE_DAYS} days):")
            for model, counts in sorted(by_model.items()):
                print(f"  {model}: {counts['requests']} requests, {counts['total_tokens']} tokens")
            if not by_model:
                print("  nothing yet")
            for name, window in client.quota()["limits"].items():
                left = "unlimited" if window["limit"] is None else f"{window['remaining']} of {window['limit']} left"
                print(f"{name.replace('_', ' ')}: {window['used']} used, {left}")

    @magic_arguments()
    @argument("--model", "-m", help="A model you may call (default: the first chat model of %%models).")
    @argument("--system", "-s", help="A system message.")
    @argument("--max-tokens", type=int, help="The most tokens the answer may have.")
    @cell_magic
    def chat(self, line: str, cell: str) -> None:
        """Send the cell to a chat model; the answer streams into the output as Markdown."""
        args = _options(self.chat, line)
        with one_line_errors():
            location = find_service()
            model = args.model or _first_chat_model(InferenceClient(*location))
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": cell})
            extra = {"max_tokens": args.max_tokens} if args.max_tokens else {}
            stream = openai_client(location).chat.completions.create(
                model=model, messages=messages, stream=True, **extra
            )
            handle = display(Markdown(""), display_id=True)
            text = ""
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    text += piece
                    handle.update(Markdown(text))


def _options(magic, line: str):
    """The magic's options, quotes taken off as a shell does: IPython's own split keeps them, so
    `--system "Be brief."` would send the quotes to the model."""
    try:
        argv = shlex.split(line)
    except ValueError as e:  # an unclosed quote
        raise UsageError(f"{e}: {line}") from None
    return magic.parser.parse_args(argv)


def _first_chat_model(client: InferenceClient) -> str:
    for model in client.models():
        if model.get("task") == "chat":
            return model["id"]
    raise InferenceError("No chat model you may call: see %models, or ask an administrator.")
