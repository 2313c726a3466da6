"""The one mapping of what a request can fail with onto a client's error (textgen/errors.py)."""

from __future__ import annotations

import pytest

from textgen.errors import (
    EngineOverloaded,
    EngineUnavailable,
    OpenAIError,
    client_error,
    finish_error,
    stream_error,
)
from textgen.params import ParamError
from textgen.scheduler import FinishEvent, Status


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            ParamError("top_p", "top_p must be in (0, 1], got 1.5"),
            (400, "top_p must be in (0, 1], got 1.5", "top_p", "invalid_request_error", None),
        ),
        (
            EngineOverloaded("256 requests are waiting (limit 256)"),
            (
                429,
                "server is at capacity: 256 requests are waiting (limit 256); retry later",
                None,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
        ),
        (
            EngineUnavailable("the engine thread died"),
            (
                503,
                "the engine is unavailable: the engine thread died",
                None,
                "service_unavailable_error",
                None,
            ),
        ),
        (
            OpenAIError(404, "no such model", "model", code="model_not_found"),
            (404, "no such model", "model", "invalid_request_error", "model_not_found"),
        ),
    ],
)
def test_each_request_error_maps_to_one_client_error(exc, expected):
    err = client_error(exc)
    assert (err.status, str(err), err.param, err.type, err.code) == expected


def test_an_error_no_request_causes_is_not_mapped():
    with pytest.raises(TypeError):
        client_error(RuntimeError("a bug"))


def _finish(status: Status, error: str | None = None, param: str | None = None) -> FinishEvent:
    return FinishEvent(status, "", 1, 0, error, param=param)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (_finish(Status.FINISHED_LENGTH), None),
        (_finish(Status.FINISHED_EOS), None),
        (_finish(Status.CANCELLED), None),
        (
            _finish(Status.FAILED, "guided_regex: the grammar failed", "guided_regex"),
            (400, "guided_regex: the grammar failed", "guided_regex", "invalid_request_error"),
        ),
        (
            _finish(Status.FAILED, "generation failed: boom"),
            (500, "generation failed: boom", None, "server_error"),
        ),
    ],
)
def test_a_failed_finish_is_the_requests_error_or_the_servers(event, expected):
    err = finish_error(event)
    assert (err if err is None else (err.status, str(err), err.param, err.type)) == expected


def test_an_error_after_the_stream_started():
    err = stream_error(RuntimeError("boom"))
    assert (err.status, str(err), err.type) == (500, "generation failed: boom", "server_error")
