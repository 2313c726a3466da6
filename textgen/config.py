"""Settings read once from the environment into one typed object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIN_MODEL_LEN = 16  # shorter contexts leave no room for a prompt and its answer
GRAMMAR_THREADS_BESIDE_ACCELERATOR = 4  # mask-filling threads when the model is not on the CPU
DEFAULT_MODEL_TAG = "gpt2:latest"


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_float(
    name: str, default: float, above: float, at_most: float, or_equal: bool = False
) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not (above <= value if or_equal else above < value) or not value <= at_most:
        low = "[" if or_equal else "("
        raise ConfigError(f"{name} must be in {low}{above:g}, {at_most:g}], got {value:g}")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def packed_model_tag(bento_root: Path | None = None) -> str | None:
    """The model tag a built bento packed (from its bento.yaml), or None outside a bento.

    `bentoml build` resolves TEXTGEN_MODEL to one exact tag and packs only that
    model, so a bento (and its image) serves it when TEXTGEN_MODEL is unset.
    Inside a bento this file is <bento>/src/textgen/config.py.
    """
    if bento_root is None:
        source = Path(__file__).resolve().parent.parent  # the directory holding textgen/
        if source.name != "src":
            return None
        bento_root = source.parent
    manifest = bento_root / "bento.yaml"
    if not manifest.is_file():
        return None
    import yaml  # BentoML's own dependency

    info = yaml.safe_load(manifest.read_text()) or {}
    for service in info.get("services") or []:
        models = service.get("models") or []
        if service.get("name") == info.get("entry_service") and len(models) == 1:
            return str(models[0]["tag"])
    return None


def default_slots_per_request(max_batch_size: int) -> int:
    """The batch less a quarter of it (the quarter rounded down): that quarter stays for other
    requests while one request is wide. A batch of 1 to 3 has no quarter to keep, so
    there one request may hold every slot."""
    return max(1, max_batch_size - max_batch_size // 4)


@dataclass(frozen=True)
class Settings:
    model_tag: str = DEFAULT_MODEL_TAG  # model store tag to serve (a bento: the one it packed)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantize: str = "auto"  # auto | none | int8 (dynamic int8 linear layers, CPU only)
    max_batch_size: int = 32  # sequences decoded together in one step (KV cache slots)
    max_model_len: int = 0  # positions per sequence (prompt + new tokens); 0: the model's
    memory_utilization: float = 0.9  # share of the memory left after the weights for the cache
    native_kernels: bool = True  # CPU int8 and bf16: one stream decodes with textgen/csrc's kernels
    # CPU: large blocks come from glibc's heaps, reused, not mapped per use (up to 1 GiB on
    # the main thread, 64 MiB on others: `devices.keep_large_blocks`)
    heap_large_blocks: bool = True
    prefix_caching: bool = True  # a prompt's prefix already in a KV slot is not computed again
    # Decode at bucketed batch sizes and attended lengths over static buffers (padding
    # rows in a scratch slot); None: on CUDA only.
    fixed_shapes: bool | None = None
    cuda_graphs: bool = True  # with fixed shapes on CUDA: each bucket's decode a CUDA graph
    engine_stall_seconds: float = 60.0  # work waiting this long without a step: unhealthy
    max_waiting: int = 256  # sequences queued for a batch row before 429
    max_prefill_tokens: int = 2048  # padded prompt tokens in one prefill step
    max_concurrency: int = 128  # requests in the server at once (BentoML's limiter), then 429
    max_prompt_chars: int = 16_384  # prompt length limit checked before tokenizing
    max_new_tokens_limit: int = 1024  # upper bound on max_new_tokens / max_tokens
    max_n: int = 8  # upper bound on OpenAI `n` (choices per prompt)
    max_prompts: int = 256  # upper bound on prompts in one OpenAI request (lm-eval batches)
    max_logprobs: int = 20  # upper bound on logprobs / top_logprobs / prompt_logprobs
    max_sequences_per_request: int = 64  # prompts x n (best_of) one request may queue
    # KV slots one request holds at once; None: default_slots_per_request(max_batch_size).
    max_slots_per_request: int | None = None
    max_logprob_entries: int = 1 << 18  # (token, logprob) pairs one response may carry
    max_detokenize_tokens: int = 4096  # token ids one /detokenize request may send
    chat_template: str | None = None  # a Jinja file; None: GPT-2's default (textgen/chat.py)
    trust_request_chat_template: bool = False  # whether a request may send its own template
    chat_template_timeout_seconds: float = 2.0  # wall time to render a request's template
    chat_template_memory_mb: int = 256  # address space of the process rendering one
    api_key: str | None = None  # when set, generation routes need `Authorization: Bearer`
    drain_seconds: float = 0.0  # after SIGTERM: /readyz 503 but still serving, then stop
    body_timeout_seconds: float = 30.0  # a request body must arrive whole within this, else 408
    keep_alive_seconds: float = 75.0  # an idle connection is closed after this (textgen/keepalive)
    grammar_compile_seconds: float = 5.0  # a constraint not compiled within this: 400
    grammar_cache_size: int = 64  # compiled constraints kept (LRU)
    # new constraints waiting for a compile thread; past it a new one gets 429
    max_grammar_compiles_waiting: int = 16
    # Threads filling a step's token masks together (llguidance's batched fill); 0: one
    # mask after another on the engine thread; None: 0 when the model runs on the CPU
    # (its threads own the cores), else GRAMMAR_THREADS_BESIDE_ACCELERATOR
    grammar_threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_slots_per_request is None:  # the one place the default is computed
            slots = default_slots_per_request(self.max_batch_size)
            object.__setattr__(self, "max_slots_per_request", slots)

    @classmethod
    def from_env(cls) -> Settings:
        device = os.environ.get("TEXTGEN_DEVICE", "auto").strip().lower() or "auto"
        if not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
            raise ConfigError(f"TEXTGEN_DEVICE must be auto|cpu|cuda|cuda:N|mps, got {device!r}")
        max_batch_size = _env_int("TEXTGEN_MAX_BATCH_SIZE", 32, 1)
        max_model_len = _env_int("TEXTGEN_MAX_MODEL_LEN", 0, 0)
        if 0 < max_model_len < MIN_MODEL_LEN:
            raise ConfigError(
                f"TEXTGEN_MAX_MODEL_LEN must be 0 (the model's context) or >= {MIN_MODEL_LEN}, "
                f"got {max_model_len}"
            )
        return cls(
            model_tag=os.environ.get("TEXTGEN_MODEL", "").strip()
            or packed_model_tag()
            or DEFAULT_MODEL_TAG,
            device=device,
            dtype=_env_choice("TEXTGEN_DTYPE", "auto", ("auto", "float32", "bfloat16", "float16")),
            quantize=_env_choice("TEXTGEN_QUANTIZE", "auto", ("auto", "none", "int8")),
            max_batch_size=max_batch_size,
            max_model_len=max_model_len,
            memory_utilization=_env_float("TEXTGEN_MEMORY_UTILIZATION", 0.9, 0.0, 1.0),
            native_kernels=_env_bool("TEXTGEN_NATIVE_KERNELS", True),
            heap_large_blocks=_env_bool("TEXTGEN_HEAP_LARGE_BLOCKS", True),
            prefix_caching=_env_bool("TEXTGEN_PREFIX_CACHING", True),
            fixed_shapes={"auto": None, "true": True, "false": False}[
                _env_choice("TEXTGEN_FIXED_SHAPES", "auto", ("auto", "true", "false"))
            ],
            cuda_graphs=_env_bool("TEXTGEN_CUDA_GRAPHS", True),
            engine_stall_seconds=_env_float("TEXTGEN_ENGINE_STALL_SECONDS", 60.0, 0.0, 1e9),
            max_waiting=_env_int("TEXTGEN_MAX_WAITING", 256, 0),
            max_prefill_tokens=_env_int("TEXTGEN_MAX_PREFILL_TOKENS", 2048, 1),
            # Four batches' worth: one running, the rest queued, each queued at
            # most three steps' worth of completions behind.
            max_concurrency=_env_int("TEXTGEN_MAX_CONCURRENCY", 4 * max_batch_size, 1),
            max_prompt_chars=_env_int("TEXTGEN_MAX_PROMPT_CHARS", 16_384, 1),
            max_new_tokens_limit=_env_int("TEXTGEN_MAX_NEW_TOKENS", 1024, 1),
            max_n=_env_int("TEXTGEN_MAX_N", 8, 1),
            max_prompts=_env_int("TEXTGEN_MAX_PROMPTS", 256, 1),
            max_logprobs=_env_int("TEXTGEN_MAX_LOGPROBS", 20, 0),
            max_sequences_per_request=_env_int("TEXTGEN_MAX_SEQUENCES_PER_REQUEST", 64, 1),
            max_logprob_entries=_env_int("TEXTGEN_MAX_LOGPROB_ENTRIES", 1 << 18, 1),
            max_detokenize_tokens=_env_int("TEXTGEN_MAX_DETOKENIZE_TOKENS", 4096, 1),
            max_slots_per_request=_env_int("TEXTGEN_MAX_SLOTS_PER_REQUEST", 0, 1) or None,
            chat_template=os.environ.get("TEXTGEN_CHAT_TEMPLATE", "").strip() or None,
            trust_request_chat_template=_env_bool("TEXTGEN_TRUST_REQUEST_CHAT_TEMPLATE", False),
            chat_template_timeout_seconds=_env_float(
                "TEXTGEN_CHAT_TEMPLATE_TIMEOUT_SECONDS", 2.0, 0.0, 3600.0
            ),
            chat_template_memory_mb=_env_int("TEXTGEN_CHAT_TEMPLATE_MEMORY_MB", 256, 64),
            api_key=os.environ.get("TEXTGEN_API_KEY") or None,
            drain_seconds=_env_float("TEXTGEN_DRAIN_SECONDS", 0.0, 0.0, 3600.0, or_equal=True),
            body_timeout_seconds=_env_float("TEXTGEN_BODY_TIMEOUT_SECONDS", 30.0, 0.0, 3600.0),
            keep_alive_seconds=_env_float("TEXTGEN_KEEP_ALIVE_SECONDS", 75.0, 0.0, 86400.0),
            grammar_compile_seconds=_env_float("TEXTGEN_GRAMMAR_COMPILE_SECONDS", 5.0, 0.0, 3600.0),
            grammar_cache_size=_env_int("TEXTGEN_GRAMMAR_CACHE_SIZE", 64, 1),
            max_grammar_compiles_waiting=_env_int("TEXTGEN_MAX_GRAMMAR_COMPILES_WAITING", 16, 0),
            grammar_threads=_env_int("TEXTGEN_GRAMMAR_THREADS", 0, 0)
            if os.environ.get("TEXTGEN_GRAMMAR_THREADS", "").strip()
            else None,  # unset: chosen by the device (the engine)
        )
