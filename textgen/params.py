"""The engine's one internal description of how to generate.

Both wire schemas (`/generate` and `/v1/completions`) convert into
`SamplingParams`; this is the only place the values are checked for what holds
whatever the model, and every check names the parameter, the limit and the
value it got. What the model and the settings bound (token ids in the
vocabulary, TEXTGEN_MAX_LOGPROBS) is checked by textgen/validation.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on one logit_bias value
MAX_STOP_TOKEN_IDS = 64
# Bounds on a constraint, checked before llguidance sees it: its compiler overflows the
# stack on long rule and $ref chains (a crash, not an error), the GBNF converter is pure
# Python, quadratic in the text, and a regex's cost per token grows with its nested
# counted repetitions ((a{300}){300}); a choice list past 2000 strings fails mid-output.
MAX_CONSTRAINT_CHARS = 16_384
MAX_CHOICES = 1000
MAX_REGEX_REPEAT = 4096  # the product of nested {n,m} bounds in a regex
MAX_TEMPERATURE = 100.0  # beyond it every distribution is uniform to float precision
MAX_REPETITION_PENALTY = 100.0
# Below this a temperature is greedy decoding (as vLLM treats it): dividing by it
# would overflow float32 logits.
GREEDY_TEMPERATURE = 1e-5


class ParamError(ValueError):
    """A request parameter is invalid; `param` names it for the client."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_unicode(text: str, param: str) -> None:
    """Rejects text that is not valid Unicode (JSON can carry lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParamError(
            param,
            f"{param} is not valid Unicode: lone surrogate {text[exc.start]!r} "
            f"at character {exc.start}",
        ) from None


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(param, message)


ConstraintKind = Literal["json", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What the output must match (structured output); compiled by textgen/structured.py.

    Equal constraints compile to the same grammar: `kind` and `spec` are the cache key.
    """

    kind: ConstraintKind
    # json: the schema as compact JSON text (its key order kept: properties come out in
    # it); regex: the pattern; choice: a JSON list of the strings; grammar: Lark or GBNF.
    spec: str
    param: str = field(default="", compare=False)  # the wire field it came from, for errors

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> Constraint:
        """A JSON schema given as an object, a boolean or JSON text. The boolean schemas are
        JSON Schema's: `true` allows any JSON value (as `{}` does), `false` allows none
        (a ParamError: no output could match)."""
        if isinstance(schema, str):
            _bounded(schema, param)
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise ParamError(param, f"{param} is not valid JSON: {exc}") from None
        if schema is False:
            raise ParamError(param, f"{param}: the schema false allows no value")
        if schema is True:
            schema = {}  # llguidance takes object schemas only; {} is true's equal
        if not isinstance(schema, dict):
            raise ParamError(
                param,
                f"{param} must be a JSON schema (an object or a boolean), "
                f"got {type(schema).__name__}",
            )
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        except (ValueError, RecursionError) as exc:
            raise ParamError(param, f"{param} is not a valid JSON schema: {exc}") from None
        _bounded(text, param)
        _check_repeats(_schema_patterns(schema), param)
        return cls("json", text, param)

    @classmethod
    def choice(cls, options: list[str], param: str) -> Constraint:
        _require(bool(options), param, f"{param} needs at least one string, got []")
        _require(
            len(options) <= MAX_CHOICES,
            param,
            f"{param} takes at most {MAX_CHOICES} strings, got {len(options)}",
        )
        for option in options:
            _require(bool(option), param, f"{param} strings must be non-empty, got ''")
            check_unicode(option, param)
        return cls("choice", _bounded(json.dumps(options, ensure_ascii=False), param), param)

    @classmethod
    def text(cls, kind: Literal["regex", "grammar"], text: str, param: str) -> Constraint:
        _require(bool(text), param, f"{param} must be non-empty, got ''")
        check_unicode(text, param)
        _bounded(text, param)
        # A Lark grammar's regexes sit between slashes: each one is bounded too.
        regexes = [text] if kind == "regex" else re.findall(r"/((?:\\.|[^/\n])+)/", text)
        _check_repeats(regexes, param)
        return cls(kind, text, param)


def _bounded(text: str, param: str) -> str:
    _require(
        len(text) <= MAX_CONSTRAINT_CHARS,
        param,
        f"{param} may be at most {MAX_CONSTRAINT_CHARS} characters, got {len(text)}",
    )
    return text


def _check_repeats(patterns: list[str], param: str) -> None:
    for pattern in patterns:
        repeat = regex_repeat(pattern)
        _require(
            repeat <= MAX_REGEX_REPEAT,
            param,
            f"{param}: its nested counted repetitions allow {repeat} repeats, more than "
            f"{MAX_REGEX_REPEAT}",
        )


def _schema_patterns(schema: Any) -> list[str]:
    """The regexes of a JSON schema: every `pattern` and `patternProperties` key."""
    found, stack = [], [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                found.append(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                found.extend(k for k in node["patternProperties"] if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")  # {n}, {n,}, {n,m}, spaces allowed
_PLAIN_COUNTS = re.compile(r"(?:[^{]|\{\d+(?:,\d*)?\}|\{(?!\s*\d))*")  # no count with spaces


def regex_repeat(pattern: str) -> int:
    """The largest product of nested counted-repetition bounds ({n}, {n,m}) in a regex,
    as Python's parser reads it. Where it can't read the pattern as llguidance does (a
    syntax Python lacks, spaces inside a count, nesting past its recursion limit, a
    count past its range), the product of every count in the text: an upper bound."""
    import re._constants as constants
    import re._parser as parser

    def walk(items: object) -> int:
        worst = 1
        for op, arg in items:
            if op in (constants.MAX_REPEAT, constants.MIN_REPEAT, constants.POSSESSIVE_REPEAT):
                low, high, inner = arg
                bound = low if high == constants.MAXREPEAT else high
                worst = max(worst, max(bound, 1) * walk(inner))
            elif op == constants.SUBPATTERN:
                worst = max(worst, walk(arg[-1]))
            elif op == constants.ATOMIC_GROUP:
                worst = max(worst, walk(arg))
            elif op == constants.BRANCH:
                worst = max(worst, *(walk(branch) for branch in arg[1]))
        return worst

    if _PLAIN_COUNTS.fullmatch(pattern):
        try:
            return walk(parser.parse(pattern))
        except Exception:  # RecursionError and OverflowError included: the upper bound
            pass
    product = 1
    for low, high in _COUNT.findall(pattern):
        product = min(product * max(int(high or low), 1), 1 << 62)
    return product


def one_constraint(named: dict[str, Constraint | None]) -> Constraint | None:
    """The request's one constraint: ParamError naming them when it sets more than one."""
    given = [name for name, c in named.items() if c is not None]
    if len(given) > 1:
        raise ParamError(
            given[1], f"set at most one output constraint, got {len(given)}: {', '.join(given)}"
        )
    return named[given[0]] if given else None


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 50  # tokens to generate at most; 0: only the prompt runs
    min_new_tokens: int = 0  # EOS is suppressed until this many were generated
    # False: greedy argmax; True: sample from the processed distribution. A temperature
    # below GREEDY_TEMPERATURE makes it False.
    do_sample: bool = False
    temperature: float = 1.0  # divides the logits before top-k / top-p (sampling only)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # nucleus: keep the smallest set whose mass reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # CTRL-style: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    stop: tuple[str, ...] = ()  # stop sequences matched on decoded text
    include_stop_str_in_output: bool = False  # a matched stop sequence ends the text
    stop_token_ids: tuple[int, ...] = ()  # generating one of these stops (its text not shown)
    seed: int | None = None  # seeds the request's own random.Random when sampling
    ignore_eos: bool = False  # keep generating past EOS until max_new_tokens
    logprobs: int | None = None  # None: none; k: chosen token's logprob and k alternatives
    # None: none; k: for every prompt token after the first, its logprob given the tokens
    # before it and the k most likely there (bounded by `max_logprobs`, textgen/validation.py)
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # None: free text; else every token keeps the output a prefix of a match, EOS comes
    # only where the output is a whole match, and the sequence stops once nothing can follow
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        _require(
            self.max_new_tokens >= 0,
            "max_new_tokens",
            f"max_new_tokens must be >= 0, got {self.max_new_tokens}",
        )
        _require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
            f"got {self.min_new_tokens}",
        )
        # With a constraint the grammar decides where the output may end: suppressing EOS
        # where only EOS is allowed would leave no token to choose.
        _require(
            self.constraint is None or self.min_new_tokens == 0,
            "min_new_tokens",
            "min_new_tokens (min_tokens) can't be combined with an output constraint, got "
            f"{self.min_new_tokens}",
        )
        _require(
            self.constraint is None or not self.ignore_eos,
            "ignore_eos",
            "ignore_eos can't be combined with an output constraint",
        )
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            _require(math.isfinite(value), name, f"{name} must be finite, got {value}")
        _require(
            0 < self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {self.temperature}",
        )
        if self.temperature < GREEDY_TEMPERATURE:
            object.__setattr__(self, "do_sample", False)
        _require(self.top_k >= 0, "top_k", f"top_k must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _require(
            math.isfinite(self.min_p) and 0 <= self.min_p <= 1,
            "min_p",
            f"min_p must be in [0, 1], got {self.min_p}",
        )
        _require(
            0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
            f"got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, name, f"{name} must be in [-2, 2], got {value}")
        _require(
            len(self.stop) <= MAX_STOP_SEQUENCES,
            "stop",
            f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}",
        )
        for s in self.stop:
            _require(bool(s), "stop", "stop sequences must be non-empty, got ''")
            check_unicode(s, "stop")
            _require(
                len(s) <= MAX_STOP_CHARS,
                "stop",
                f"a stop sequence has at most {MAX_STOP_CHARS} characters, got {len(s)}",
            )
        _require(
            self.seed is None or 0 <= self.seed < 2**63,
            "seed",
            f"seed must be in [0, 2**63), got {self.seed}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or value >= 0, name, f"{name} must be >= 0, got {value}")
        for token_id, bias in self.logit_bias:
            _require(
                math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                f"got {bias} for token {token_id}",
            )
        _require(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, "
            f"got {len(self.stop_token_ids)}",
        )

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None

    @property
    def sampling_seed(self) -> int | None:
        """The seed that shaped the text: None for greedy decoding."""
        return self.seed if self.do_sample else None

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens seen so far."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
