"""Schemathesis fuzzes every operation /openapi.json describes, on a live server, open and with an API key:
no answer is a 5xx, every status is documented, and every answer (streamed events too) matches its
documented content type and schema; data the schema forbids is refused. Derandomized: the same cases every
run. PDSERVE_FUZZ_EXAMPLES raises the examples per operation to fuzz harder locally."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from pdserve.api.app import create_app
from pdserve.config import EngineConfig, RequestLimits
from pdserve.live.thread import serving
from pdserve.workers.local_client import LocalClient

pytestmark = pytest.mark.e2e

KEY = "fuzz-key"
MAX_EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "40"))
# A 32-token context and small limits keep every generation short: at most 4 choices of at most 32 tokens.
MAX_MODEL_LEN = 32
LIMITS = RequestLimits(max_n=4, max_stop_strings=4, max_stop_string_chars=16, max_stop_token_ids=8)
OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/admin/migrate"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS]
CASES += [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]  # the others: nothing to negate
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_backend():
    backend = LocalClient(EngineConfig(num_kv_blocks=64, max_model_len=MAX_MODEL_LEN))
    yield backend
    backend.engine_thread.stop()


@pytest.fixture(scope="module", params=[None, KEY], ids=["open", "api-key"])
def api(request, fuzz_backend):
    """(schema, headers) of a live server, open or requiring an API key (which the cases then send)."""
    with serving(create_app(fuzz_backend, api_key=request.param, limits=LIMITS)) as srv:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        yield schema, {"Authorization": f"Bearer {request.param}"} if request.param else {}


def test_every_operation_is_fuzzed(api):
    schema, _ = api
    assert {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()} == set(OPERATIONS)


def test_the_schema_states_the_limits(api, fuzz_backend):
    schema, _ = api
    defs = schema.raw_schema["components"]["schemas"]
    cmpl, chat = defs["CompletionRequest"], defs["ChatCompletionRequest"]
    props = cmpl["properties"]
    assert cmpl["additionalProperties"] is False and chat["additionalProperties"] is False
    assert props["model"]["enum"] == [fuzz_backend.info.model_id]
    assert props["n"]["minimum"] == 1 and props["n"]["maximum"] == LIMITS.max_n
    assert props["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert props["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0}
    assert props["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": MAX_MODEL_LEN}
    assert props["logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 5}
    assert chat["properties"]["top_logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 20}
    one_stop, stops = props["stop"]["anyOf"][:2]
    assert one_stop["maxLength"] == stops["items"]["maxLength"] == LIMITS.max_stop_string_chars
    assert stops["maxItems"] == LIMITS.max_stop_strings
    assert props["stop_token_ids"]["anyOf"][0]["maxItems"] == LIMITS.max_stop_token_ids
    token_ids = props["prompt"]["anyOf"][2]["items"]
    assert token_ids["minimum"] == 0 and token_ids["exclusiveMaximum"] == fuzz_backend.info.vocab_size
    assert defs["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    # what pdserve takes only as a no-op is stated so; and the cross-field rules as if/then
    assert props["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 0}
    assert props["suffix"]["anyOf"][0] == {"type": "string", "maxLength": 0}
    assert chat["properties"]["tools"]["anyOf"][0] == {"type": "array", "maxItems": 0}
    assert chat["properties"]["tool_choice"]["anyOf"][0] == {"enum": ["none", "auto"]}
    assert defs["ContentPart"]["properties"]["type"]["const"] == "text"
    rules = {r["if"]["required"][0]: r["then"] for r in cmpl["allOf"] + chat["allOf"]}
    assert rules["stream_options"]["properties"]["stream"] == {"const": True}
    assert rules["top_logprobs"]["properties"]["logprobs"] == {"const": True}
    assert rules["logprobs"]["properties"]["echo"] == {"const": False}


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_fuzz(api, method, path, mode):
    schema, headers = api
    checks = CHECKS + ([negative_data_rejection] if mode.is_negative else [])

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    def run(case):
        case.call_and_validate(headers=headers, checks=checks, timeout=60)

    run()


MSGS = [{"role": "user", "content": "hi"}]
USAGE = {"stream_options": {"include_usage": True}}
RICH = [  # what random cases rarely reach: streams and logprobs, answered 200
    ("/v1/completions", {"prompt": ["hi", "there"], "n": 2, "logprobs": 2, "echo": False, "stream": True, **USAGE}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 0, "return_token_ids": True}),
    ("/v1/chat/completions", {"messages": MSGS, "n": 2, "logprobs": True, "top_logprobs": 3, "stream": True, **USAGE}),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 1, "return_token_ids": True}),
]


@pytest.mark.parametrize(("path", "body"), RICH, ids=[f"{p} stream={b.get('stream', False)}" for p, b in RICH])
def test_streams_and_logprobs_match_the_schema(api, fuzz_backend, path, body):
    schema, headers = api
    body = {"model": fuzz_backend.info.model_id, "max_tokens": 4, **body}
    case = schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
    assert response.status_code == 200
