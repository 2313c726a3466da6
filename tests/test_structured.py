"""Structured output in-process: compiling constraints, the cache, masks in the sampler.

The tiny random model, float32. Through the HTTP door: tests/test_structured_http.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import threading
import time

import jsonschema
import llguidance
import pytest
import torch

from tests.conftest import ROOT, make_engine, run
from textgen import structured
from textgen.config import Settings
from textgen.models import gpt2_tokenizer
from textgen.params import Constraint, ParamError, SamplingParams, one_constraint
from textgen.sampling import _mask_out, _masked_copy
from textgen.scheduler import FinishEvent, Status, TokenEvent
from textgen.structured import (
    CompilerBusy,
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    MaskBuilder,
    unpack_bits_numpy,
    unpack_bits_torch,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def eng(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def compiler():
    c = GrammarCompiler(gpt2_tokenizer(), 50257, cache_size=2)
    yield c
    c.shutdown()


async def _generate(eng, prompt: str, params: SamplingParams):
    """(token ids, finish event) of one request, its constraint compiled as a route does."""
    seq = eng.new_sequence(eng.tokenize(prompt), params, await eng.grammar(params.constraint))
    ids, final = [], None
    async for _, event in eng.stream([seq]):
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
        else:
            final = event
    return ids, final


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint.text("regex", "a(b", "guided_regex"), "guided_regex: at 1(8): invalid regex"),
        (
            Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}, "guided_json"),
            "guided_json: Unsatisfiable schema: minimum (5) is greater than maximum (1)",
        ),
        (Constraint.json_schema({"type": "foo"}, "response_format"), "Invalid type: foo"),
        (Constraint.text("grammar", "start: x", "guided_grammar"), 'unknown name: "x"'),
        (
            Constraint.text("grammar", "root ::= foo", "guided_grammar"),
            "guided_grammar: not a valid GBNF grammar: Rule 'foo' not found",
        ),
    ],
)
def test_a_constraint_that_does_not_compile_names_its_field(compiler, constraint, message):
    with pytest.raises(GrammarError) as err:
        compiler.compile_blocking(constraint)
    assert err.value.param == constraint.param
    assert str(err.value).startswith(constraint.param + ": ")
    assert message in str(err.value)


def test_grammars_are_cached_by_constraint_in_a_bounded_lru(compiler):
    a = Constraint.json_schema(PERSON, "guided_json")
    same = Constraint.json_schema(json.dumps(PERSON), "response_format")  # text or object
    b = Constraint.text("regex", "[0-9]{3}", "guided_regex")
    c = Constraint.choice(["yes", "no"], "guided_choice")
    first = compiler.compile_blocking(a)
    assert compiler.compile_blocking(same) is first
    compiler.compile_blocking(b)
    assert compiler.compile_blocking(a) is first  # a is now the most recent
    compiler.compile_blocking(c)  # evicts b, the least recently used
    assert len(compiler) == 2
    assert compiler.compile_blocking(a) is first


def test_a_cached_error_names_the_field_of_each_request_that_hits_it(compiler):
    for param in ("guided_regex", "regex"):
        with pytest.raises(GrammarError) as err:
            compiler.compile_blocking(Constraint.text("regex", "(x", param))
        assert err.value.param == param
        assert str(err.value).startswith(param + ": at 1(8): invalid regex")


def test_a_compile_past_the_time_limit_is_an_error_and_the_engine_serves_on(
    tiny_model, tokenizer, monkeypatch
):
    """A compile that takes 3 s (made slow here) against a 0.2 s limit: the request gets
    the error, and the engine decodes another request while the compile still runs."""
    real = structured.grammar_text
    compiled = threading.Event()

    def slow(constraint):
        time.sleep(3)
        compiled.set()
        return real(constraint)

    monkeypatch.setattr(structured, "grammar_text", slow)
    eng = make_engine(tiny_model, tokenizer, grammar_compile_seconds=0.2)
    try:
        constraint = Constraint.json_schema({"type": "array"}, "response_format")

        async def both():
            compiling = asyncio.ensure_future(eng.grammar(constraint))
            ids, final = await _generate(eng, "Hello", SamplingParams(max_new_tokens=5))
            assert not compiled.is_set()  # the engine did not wait for the compile
            with pytest.raises(GrammarError) as err:
                await compiling
            return ids, final, err.value

        ids, final, error = run(both())
        assert final.status is Status.FINISHED_LENGTH and len(ids) == 5
        assert error.param == "response_format"
        assert str(error) == (
            "response_format: the grammar did not compile within 0.2 s "
            "(TEXTGEN_GRAMMAR_COMPILE_SECONDS)"
        )
        assert not compiled.is_set()  # the 400 came at the limit, not after the compile
        assert eng.health() is None
    finally:
        eng.shutdown()


def test_more_than_one_constraint_is_refused():
    regex = Constraint.text("regex", "a", "guided_regex")
    choice = Constraint.choice(["a"], "guided_choice")
    assert one_constraint({"guided_regex": regex, "guided_json": None}) is regex
    with pytest.raises(ParamError) as err:
        one_constraint({"guided_regex": regex, "guided_choice": choice})
    assert err.value.param == "guided_choice"
    assert str(err.value) == "set at most one output constraint, got 2: guided_regex, guided_choice"


@pytest.mark.parametrize("do_sample", [False, True])
def test_json_output_validates_and_stops_when_the_value_is_whole(eng, do_sample):
    constraint = Constraint.json_schema(PERSON, "guided_json")
    for k in range(6):
        params = SamplingParams(
            max_new_tokens=200, do_sample=do_sample, seed=k, constraint=constraint
        )
        ids, final = run(_generate(eng, f"Person {k}:", params))
        assert final.status in (Status.FINISHED_STOP, Status.FINISHED_EOS), final
        jsonschema.validate(json.loads(final.text), PERSON)
        assert eng.eos_token_id not in ids[:-1]


def test_choice_and_regex_outputs_match(eng):
    choice = Constraint.choice(["red", "green", 'say "blue"'], "guided_choice")
    regex = Constraint.text("regex", r"[A-Z][a-z]{2,6}-[0-9]{2}", "guided_regex")
    for k in range(4):
        params = SamplingParams(max_new_tokens=50, do_sample=True, seed=k, constraint=choice)
        _, final = run(_generate(eng, f"Colour {k}:", params))
        assert final.status is Status.FINISHED_STOP
        assert final.text in ("red", "green", 'say "blue"')
        params = SamplingParams(max_new_tokens=50, do_sample=k % 2 == 1, seed=k, constraint=regex)
        _, final = run(_generate(eng, f"Code {k}:", params))
        assert final.status in (Status.FINISHED_STOP, Status.FINISHED_EOS)
        assert re.fullmatch(r"[A-Z][a-z]{2,6}-[0-9]{2}", final.text), final.text


def test_max_tokens_mid_structure_ends_by_length(eng):
    constraint = Constraint.json_schema(PERSON, "guided_json")
    ids, final = run(_generate(eng, "Hi", SamplingParams(max_new_tokens=3, constraint=constraint)))
    assert final.status is Status.FINISHED_LENGTH and len(ids) == 3
    assert final.text.startswith('{"name":"')


def test_the_mask_holds_against_logit_bias_and_penalties(eng):
    """A bias of +100 on a token the grammar forbids, penalties on every row: the grammar
    still decides; a bias on an allowed token is still obeyed."""
    digits = Constraint.text("regex", "[0-9]{4}", "guided_regex")
    x = eng.tokenize("x")[0]
    seven = eng.tokenize("7")[0]
    params = SamplingParams(
        max_new_tokens=10,
        constraint=digits,
        logit_bias=((x, 100.0), (seven, 50.0)),
        repetition_penalty=1.3,
        presence_penalty=1.0,
    )
    _, final = run(_generate(eng, "Number:", params))
    assert final.status is Status.FINISHED_STOP
    assert final.text == "7777"


def test_free_rows_batched_with_constrained_ones_keep_their_greedy_tokens(eng):
    free = SamplingParams(max_new_tokens=24)
    constraint = Constraint.json_schema(PERSON, "guided_json")

    async def together():
        grammar = await eng.grammar(constraint)
        seqs = [
            eng.new_sequence(eng.tokenize("The river"), free),
            eng.new_sequence(
                eng.tokenize("Name:"), SamplingParams(200, constraint=constraint), grammar
            ),
            eng.new_sequence(eng.tokenize("Once upon"), free),
            eng.new_sequence(
                eng.tokenize("Pick:"),
                SamplingParams(200, do_sample=True, seed=3, constraint=constraint),
                grammar,
            ),
        ]
        ids: list[list[int]] = [[] for _ in seqs]
        async for i, event in eng.stream(seqs):
            if isinstance(event, TokenEvent):
                ids[i].append(event.token_id)
        return ids

    ids = run(together())
    alone = [run(_generate(eng, p, free))[0] for p in ("The river", "Once upon")]
    assert [ids[0], ids[2]] == alone


def test_n_constrained_sequences_each_advance_their_own_matcher(eng):
    constraint = Constraint.choice(["alpha", "beta", "gamma delta"], "guided_choice")

    async def many():
        grammar = await eng.grammar(constraint)
        seqs = [
            eng.new_sequence(
                eng.tokenize("Word:"),
                SamplingParams(20, do_sample=True, seed=s, constraint=constraint),
                grammar,
            )
            for s in range(6)
        ]
        finals = {}
        async for i, event in eng.stream(seqs):
            if isinstance(event, FinishEvent):
                finals[i] = event
        return [finals[i] for i in range(len(seqs))]

    finals = run(many())
    assert all(f.status is Status.FINISHED_STOP for f in finals)
    assert {f.text for f in finals} <= {"alpha", "beta", "gamma delta"}


def test_a_sequence_needs_its_compiled_constraint(eng):
    params = SamplingParams(constraint=Constraint.text("regex", "a", "regex"))
    with pytest.raises(ValueError, match="needs its compiled constraint"):
        eng.new_sequence(eng.tokenize("x"), params)


def test_compiles_run_off_the_event_loop(eng):
    """Two requests for one new constraint: one compile, both get it."""
    constraint = Constraint.text("regex", "[a-f]{2,9}", "guided_regex")

    async def both():
        return await asyncio.gather(eng.grammar(constraint), eng.grammar(constraint))

    first, second = run(both())
    assert first is second


def test_both_mask_unpackings_agree_bit_for_bit():
    """The CPU path (numpy) and the accelerator path (torch shifts, run here on the CPU):
    token 32 w + j is bit j of word w, the sign bit included, the tail past V dropped."""
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (5, 1571), dtype=torch.int32, generator=generator)
    bits[0, 0] = 1 | (1 << 31) - (1 << 32)  # tokens 0 and 31 only, in the first word
    numpy_way = unpack_bits_numpy(bits, 50257)
    torch_way = unpack_bits_torch(bits, 50257)
    assert numpy_way.shape == torch_way.shape == (5, 50257)
    assert torch.equal(numpy_way, torch_way)
    assert numpy_way[0, :32].nonzero().flatten().tolist() == [0, 31]
    expected = [(int(bits[2, t // 32]) >> (t % 32)) & 1 for t in range(0, 50257, 997)]
    assert numpy_way[2, ::997].int().tolist() == expected


def test_masking_out_sets_exactly_the_forbidden_tokens_on_either_path():
    """numpy's masked copy (contiguous float32 on the CPU) and masked_fill_ (the rest)."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50257, generator=generator)
    forbidden = torch.rand(3, 50257, generator=generator) < 0.7
    fast = logits.clone()
    _mask_out(fast, forbidden)
    slow = logits.clone().T.contiguous().T  # not contiguous: the torch path
    _mask_out(slow, forbidden)
    expected = logits.masked_fill(forbidden, float("-inf"))
    assert torch.equal(fast, expected) and torch.equal(slow, expected)


def test_a_row_with_fewer_tokens_allowed_than_top_k_is_drawn_from_its_candidates():
    """A grammar leaves a row few finite tokens: the -inf candidates past them are not
    ties with the k-th, so the row is not drawn again over the sorted vocabulary (a sort
    of every row, every step), and the draw is the same."""
    from textgen.sampling import Sampler

    sampler = Sampler(2, 50257, torch.device("cpu"), 50256)
    x = torch.full((2, 50257), float("-inf"))
    x[0, [5, 70, 900]] = torch.tensor([1.0, 2.0, 0.5])  # 3 allowed, top_k 50
    x[1] = torch.randn(50257, generator=torch.Generator().manual_seed(3))  # free
    seqs = [_sampled(top_k=50, seed=s) for s in (1, 2)]
    width = sampler._width(seqs[0].params)
    u = torch.tensor([0.3, 0.6])
    tokens, wanted = sampler._draw_group(x, torch.ones(2), u, seqs, width)
    assert wanted is None  # its candidates were enough for every row
    whole, _ = sampler._draw_group(x, torch.ones(2), u, seqs, 50257)  # the redraw's way
    assert tokens.tolist() == whole.tolist() and tokens[0].item() in (5, 70, 900)


def _sampled(**params):
    from textgen.scheduler import Sequence

    sp = SamplingParams(do_sample=True, **params)
    return Sequence([1], sp, gpt2_tokenizer(), None)


def test_the_masked_copy_equals_a_copy_then_a_mask():
    """One pass (numpy's where, float32 on the CPU; masked_fill elsewhere), the input kept."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50257, generator=generator)
    forbidden = torch.rand(3, 50257, generator=generator) < 0.7
    kept = logits.clone()
    expected = logits.masked_fill(forbidden, float("-inf"))
    for x in (logits, logits.double()):
        copied = _masked_copy(x, forbidden)
        assert copied.dtype == x.dtype and torch.equal(copied, expected.to(x.dtype))
    assert torch.equal(logits, kept)


def test_masks_filled_in_turn_equal_the_batched_fill(compiler):
    """Threads 0 (the engine thread, one matcher after another) and a pool: same bits."""
    grammar = compiler.compile_blocking(Constraint.json_schema(PERSON, "guided_json"))
    tokenizer = gpt2_tokenizer()
    prefixes = ['{"name":"Al', '{"name":"Bo","age":4', '{"name":"","age":1,"role":"']
    matchers = []
    for prefix in prefixes:
        matcher = grammar.matcher()
        assert all(matcher.advance(t) for t in tokenizer.encode(prefix))
        matchers.append(matcher)
    serial = MaskBuilder(50257, 4, threads=0).fill(matchers).clone()
    pooled = MaskBuilder(50257, 4, threads=2).fill(matchers).clone()
    assert torch.equal(serial, pooled)
    assert len({tuple(row.tolist()) for row in serial}) == 3  # three different states


@pytest.mark.parametrize(("raw", "threads"), [("", None), ("0", 0), ("3", 3)])
def test_grammar_settings_from_the_environment(monkeypatch, raw, threads):
    monkeypatch.setenv("TEXTGEN_GRAMMAR_THREADS", raw)
    monkeypatch.setenv("TEXTGEN_GRAMMAR_COMPILE_SECONDS", "2.5")
    monkeypatch.setenv("TEXTGEN_GRAMMAR_CACHE_SIZE", "7")
    settings = Settings.from_env()
    assert settings.grammar_threads == threads
    assert settings.grammar_compile_seconds == 2.5
    assert settings.grammar_cache_size == 7


def test_a_matcher_in_an_error_state_fails_its_sequence(eng, compiler):
    """Its mask allows only EOS and llguidance's consume accepts that EOS: the engine must
    still fail the sequence, never end it as if the output matched."""
    broken = llguidance.LLMatcher(compiler.tokenizer, "start: x", log_level=0)  # unknown x
    assert broken.is_error()
    matcher = GrammarMatcher(broken)
    assert not matcher.advance(eng.eos_token_id)
    assert "unknown name" in matcher.error

    constraint = Constraint.text("regex", "[0-9]{3}", "guided_regex")

    async def with_a_broken_matcher():
        grammar = await eng.grammar(constraint)
        params = SamplingParams(max_new_tokens=10, constraint=constraint)
        seq = eng.new_sequence(eng.tokenize("Digits:"), params, grammar)
        seq.grammar = GrammarMatcher(broken.deep_copy())
        return [e async for _, e in eng.stream([seq])]

    events = run(with_a_broken_matcher())
    assert [type(e) for e in events] == [FinishEvent]
    assert events[0].status is Status.FAILED
    # The request's constraint failed, not the engine: its field is named, for a 4xx.
    assert events[0].param == "guided_regex"
    assert events[0].error.startswith(
        "guided_regex: the output constraint failed after 0 generated tokens: "
    )
    assert "unknown name" in events[0].error
    assert eng.health() is None


@pytest.mark.parametrize(
    ("pattern", "repeats"),
    [
        ("(?:a{300}){300}", 90_000),
        ("[a-z]{200}", 200),
        (r"\d{3}-\d{4}", 4),
        ("a*", 1),
        (r"[a-z0-9._%+-]{1,64}@[a-z0-9.-]{1,255}\.[a-z]{2,63}", 255),  # in sequence: the max
        # What Python's parser can't read as llguidance does: every count multiplied.
        (r"(?:\p{L}{300}){300}", 90_000),
        ("(?:a{ 300 }){ 300 }", 90_000),
        ("(?:a{300}){300}+", 90_000),
        ("a{4294967295}", 4_294_967_295),
        ("(?:" * 600 + "(?:a{300}){300}" + ")" * 600, 90_000),
        ("(b|" * 340 + "a" + ")" * 340, 1),  # nesting past the recursion limit: no 500
    ],
)
def test_regex_repeats_are_read_as_llguidance_reads_them(pattern, repeats):
    from textgen.params import regex_repeat

    assert regex_repeat(pattern) == repeats


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (
            lambda: Constraint.text("grammar", "start: /(a{300}){300}/", "guided_grammar"),
            "guided_grammar",
        ),
        (
            lambda: Constraint.json_schema(
                {
                    "type": "object",
                    "properties": {"s": {"type": "string", "pattern": "(a{300}){300}"}},
                },
                "guided_json",
            ),
            "guided_json",
        ),
        (
            lambda: Constraint.json_schema(
                {"type": "object", "patternProperties": {"(a{300}){300}": {"type": "string"}}},
                "guided_json",
            ),
            "guided_json",
        ),
    ],
)
def test_regexes_inside_schemas_and_grammars_are_bounded_too(make, param):
    with pytest.raises(ParamError) as err:
        make()
    assert err.value.param == param
    assert "allow 90000 repeats, more than 4096" in str(err.value)


@pytest.mark.parametrize(
    ("schema", "spec"),
    [(True, "{}"), ("true", "{}"), ({"type": "object"}, '{"type":"object"}')],
)
def test_the_schema_true_is_any_json_value(schema, spec):
    assert Constraint.json_schema(schema, "guided_json").spec == spec


@pytest.mark.parametrize("schema", [False, "false"])
def test_the_schema_false_allows_nothing(schema):
    with pytest.raises(ParamError) as err:
        Constraint.json_schema(schema, "guided_json")
    assert err.value.param == "guided_json"
    assert str(err.value) == "guided_json: the schema false allows no value"


@pytest.mark.parametrize("schema", [1, [], "null", "3"])
def test_a_schema_that_is_neither_object_nor_boolean_is_refused(schema):
    with pytest.raises(ParamError) as err:
        Constraint.json_schema(schema, "guided_json")
    assert str(err.value).startswith(
        "guided_json must be a JSON schema (an object or a boolean), got "
    )


def test_the_schema_true_compiles_and_generates_json(eng):
    constraint = Constraint.json_schema(True, "guided_json")
    params = SamplingParams(max_new_tokens=40, do_sample=True, seed=1, constraint=constraint)
    _, final = run(_generate(eng, "Anything:", params))
    assert final.status in (Status.FINISHED_STOP, Status.FINISHED_LENGTH)
    if final.status is Status.FINISHED_STOP:
        json.loads(final.text)


def test_past_the_waiting_bound_a_new_constraint_is_refused(monkeypatch):
    """Two threads busy, one compile waiting (the bound): a new constraint is refused;
    a cached one, or the waiting one's, is not. With no compile running, nothing is."""
    release = threading.Event()
    real = structured.grammar_text

    def held(constraint):
        release.wait(30)
        return real(constraint)

    monkeypatch.setattr(structured, "grammar_text", held)
    c = GrammarCompiler(gpt2_tokenizer(), 50257, workers=2, max_waiting=1)
    try:
        regexes = [Constraint.text("regex", f"[0-9]{{{k}}}", "regex") for k in (1, 2, 3, 4)]
        futures = [c.submit(r) for r in regexes[:3]]
        with pytest.raises(CompilerBusy) as err:
            c.submit(regexes[3])
        assert str(err.value) == (
            "new output constraints waiting to compile: 1 of 1 allowed "
            "(TEXTGEN_MAX_GRAMMAR_COMPILES_WAITING)"
        )
        assert c.submit(regexes[2]) is futures[2]  # the waiting one's: joins it
        release.set()
        for future in futures:
            future.result(30)
        assert c.compile_blocking(regexes[3]).constraint == regexes[3]
    finally:
        release.set()
        c.shutdown()


def test_no_compile_may_wait_when_the_bound_is_zero(monkeypatch):
    release = threading.Event()
    real = structured.grammar_text
    monkeypatch.setattr(
        structured, "grammar_text", lambda constraint: release.wait(30) and real(constraint)
    )
    c = GrammarCompiler(gpt2_tokenizer(), 50257, workers=1, max_waiting=0)
    try:
        first = c.submit(Constraint.text("regex", "a", "regex"))  # a free thread: taken
        with pytest.raises(CompilerBusy):
            c.submit(Constraint.text("regex", "b", "regex"))
        release.set()
        first.result(30)
        c.compile_blocking(Constraint.text("regex", "b", "regex"))
    finally:
        release.set()
        c.shutdown()


# The deepest constraints MAX_CONSTRAINT_CHARS lets through: llguidance's compiler
# recurses once per link, and needs more stack for them than 1 MiB.
DEEP = {
    "lark": "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(1400)) + 'r1400: "x"\n',
    "ref": json.dumps(
        {
            "$ref": "#/$defs/d0",
            "$defs": {
                f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}}
                for i in range(230)
            }
            | {"d230": {"type": "string"}},
        },
        separators=(",", ":"),
    ),
}
COMPILE_DEEP = textwrap.dedent(
    """
    import sys, threading
    from textgen.models import gpt2_tokenizer
    from textgen.params import Constraint
    from textgen.structured import GrammarCompiler
    lark, ref, plain = sys.stdin.read().split("\\0")
    constraints = [
        Constraint.text("grammar", lark, "guided_grammar"),
        Constraint.json_schema(ref, "guided_json"),
    ]
    compiler = GrammarCompiler(gpt2_tokenizer(), 50257, timeout_s=120)
    compiler.tokenizer  # built on this thread
    if plain == "plain":  # on a thread of the default stack, `ulimit -s`
        thread = threading.Thread(target=lambda: [compiler._build(c) for c in constraints])
        thread.start()
        thread.join()
    else:
        for c in constraints:
            compiler.compile_blocking(c)
    print("compiled", flush=True)
    """
)


def _compile_deep_with_small_stacks(how: str) -> subprocess.CompletedProcess:
    """The deep constraints compiled in a child whose `ulimit -s` is 1 MiB."""
    for text in DEEP.values():
        assert len(text) <= 16_384  # within the bound: a request may send them
    return subprocess.run(
        [
            "bash",
            "-c",
            'ulimit -c 0; ulimit -s 1024; exec "$0" -c "$1"',
            sys.executable,
            COMPILE_DEEP,
        ],
        input="\0".join([DEEP["lark"], DEEP["ref"], how]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_constraints_at_the_bound_compile_whatever_ulimit_s_says():
    """The compile threads have stacks of their own size: with `ulimit -s` at 1 MiB the
    deepest constraints within the bound compile, where a thread of the default stack
    (the control) crashes the process."""
    done = _compile_deep_with_small_stacks("pool")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "compiled"
    control = _compile_deep_with_small_stacks("plain")
    assert control.returncode < 0 and "compiled" not in control.stdout  # SIGSEGV


def test_the_stack_size_comes_back_after_the_compile_threads_start():
    before = threading.stack_size()
    c = GrammarCompiler(gpt2_tokenizer(), 50257)
    try:
        assert threading.stack_size() == before
    finally:
        c.shutdown()
