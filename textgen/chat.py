"""Chat messages to one prompt string, through a Jinja chat template.

GPT-2 has no chat template and is not instruction-tuned. The default is the one
transformers shipped for GPT-2 (`default_chat_template`, removed in v4.43): every
message's content followed by `<|endoftext|>`, roles ignored. A server-wide template
(`TEXTGEN_CHAT_TEMPLATE`, a Jinja file) replaces it, and so does a request's own
`chat_template` when the server trusts them (`TEXTGEN_TRUST_REQUEST_CHAT_TEMPLATE`,
off by default, as in vLLM): a template is a program, and the sandbox below bounds
what it can reach, not how long it runs or what it allocates, so a request's template
renders in a child process with a deadline and a memory cap (textgen/chat_sandbox.py).

Templates render in Jinja's immutable sandbox, as transformers does, with `range`,
`*` and `**` bounded and the output cut off at `max_chars`; any error is a
ChatTemplateError (the client's 400), never a crash.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError  # a TemplateError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
)
MAX_TEMPLATE_CHARS = 16_384  # a request's own template
MAX_RANGE = 10_000  # items one `range` may yield
MAX_PRODUCT = 1 << 20  # elements or characters one `*` may make


class ChatTemplateError(ValueError):
    """The template is invalid or failed to render; the message says where."""


class TemplateMemoryError(ChatTemplateError):
    """Rendering ran out of memory (in textgen/chat_sandbox.py: past the child's cap)."""


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            ints = isinstance(left, int) and isinstance(right, int)
            if ints and (abs(right) > 64 or left.bit_length() > 4096):
                raise SecurityError("`**` operands are above the limits (exponent 64)")
            return operator.pow(left, right)
        for seq, times in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
            if sized and len(seq) * times > MAX_PRODUCT:
                raise SecurityError(f"`*` would make {len(seq) * times} items")
        return operator.mul(left, right)


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise SecurityError(f"range of {len(r)} items is above the limit of {MAX_RANGE}")
    return r


def _raise(message: str) -> None:
    raise TemplateError(message)


_ENV = _Environment(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["range"] = _bounded_range
_ENV.globals["raise_exception"] = _raise  # what Hugging Face templates call on bad input


class ChatTemplate:
    """A compiled template and the special tokens it may use."""

    def __init__(self, source: str, eos_token: str | None, bos_token: str | None) -> None:
        try:
            self._template = _ENV.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat_template does not compile: {exc}") from None
        self.source = source
        self._tokens = {"eos_token": eos_token or "", "bos_token": bos_token or ""}

    @classmethod
    def for_server(cls, path: str | None, tokenizer: Any) -> ChatTemplate:
        """The server's template: the file at `path` (TEXTGEN_CHAT_TEMPLATE), else the
        tokenizer's own, else GPT-2's default."""
        if path is not None:
            source = Path(path).read_text()
        else:
            source = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        return cls(source, tokenizer.eos_token, tokenizer.bos_token)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The names the template may read besides messages: eos_token, bos_token."""
        return dict(self._tokens)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        max_chars: int = 1 << 20,
        kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text; raises ChatTemplateError past `max_chars` or on any error.
        `kwargs` (a request's chat_template_kwargs) may not replace the names set here."""
        kwargs = kwargs or {}
        names = {"messages", "add_generation_prompt", *self._tokens}
        clash = sorted(names & set(kwargs))
        if clash:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(clash)}")
        context = {
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            **self._tokens,
        }
        parts, size = [], 0
        try:
            for part in self._template.generate(context):
                size += len(part)
                if size > max_chars:
                    raise ChatTemplateError(
                        f"the chat template's output passes the limit of {max_chars} characters"
                    )
                parts.append(part)
        except ChatTemplateError:
            raise
        except MemoryError:
            raise TemplateMemoryError("chat_template ran out of memory while rendering") from None
        except Exception as exc:  # a template can raise anything (filters, format, memory)
            detail = str(exc) if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
            raise ChatTemplateError(f"chat_template failed to render: {detail}") from None
        return "".join(parts)
