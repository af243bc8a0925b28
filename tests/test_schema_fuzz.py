"""schemathesis against the server's own OpenAPI schema: every operation, with and without an API key.

Held for every generated request: no 5xx, every response (status, content type, body) as the schema
documents it, and no stack trace or server path in any body. One check is left out on purpose:
"schema-valid data is accepted". A generation request can be valid by the schema and still be refused,
because what refuses it depends on the loaded model (the prompt's token count plus max_tokens against
the context) or on the order of the messages (the last one must be the user's), which JSON Schema
cannot say; those refusals are tested by name in test_server.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import positive_data_acceptance

from qlora_llm.config import load_config
from qlora_llm.server.app import create_app

KEY = "St-Key-9041"
EXAMPLES = 25  # per operation and mode; fixed (derandomized) so CI runs the same requests every time
LEAKS = re.compile(r"Traceback|File \"|\bline \d+, in\b|/tmp/|/home/|/root/|/usr/|site-packages|\.py\b")


def _no_leak(ctx, response, case):
    text = response.text
    assert not LEAKS.search(text), f"a stack trace or server path in the body: {text[:300]}"
    assert KEY.lower() not in text.lower(), "the API key is in the body"


def _fuzz(app, headers: dict[str, str]) -> tuple[dict[str, int], dict[int, int], list[str]]:
    """Every operation in both modes; returns (requests sent by operation, count by status, failures)."""
    # The schema itself is fetched with the key (it takes one when set); the requests may go without.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})
    sent, statuses, failures = {}, {}, []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                response = case.call_and_validate(
                    headers=headers,
                    excluded_checks=[positive_data_acceptance],
                    additional_checks=[_no_leak],
                )
                sent[case.operation.label] = sent.get(case.operation.label, 0) + 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Unsatisfiable:  # nothing to break: a GET without parameters has no negative case
                continue
            except Exception as err:  # noqa: BLE001 - collected, so one run reports every operation
                failures.append(f"{operation.label} ({mode.value}): {str(err)[:2000]}")
    return sent, statuses, failures


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, KEY], ids=["no-key-configured", "key-configured"])
def test_every_operation_holds_its_schema_under_generated_requests(generator, tiny_mistral, key):
    cfg = load_config(None, ["model.device=cpu", "serve.max_new_tokens_limit=16", "serve.max_queue=1000"])
    app = create_app(cfg, tiny_mistral, api_key=key, generator=generator)
    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        schema = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        limits = schema["components"]["schemas"]["GenerateRequest"]["properties"]["max_new_tokens"]
        assert (limits["minimum"], limits["maximum"]) == (1, 16)  # the server's own limit, documented
        results = {}
        for name, headers in [("with the key", {"Authorization": f"Bearer {KEY}"}), ("without", {})]:
            results[name] = _fuzz(app, headers)
    failures = [f for _, _, fs in results.values() for f in fs]
    assert not failures, "\n\n".join(failures)
    for name, (sent, statuses, _) in results.items():
        print(f"{name}: {sum(sent.values())} requests {sent}, by status {dict(sorted(statuses.items()))}")
        assert len(sent) == 6 and sum(sent.values()) > 6 * EXAMPLES  # every operation, none skipped
        assert not [s for s in statuses if s >= 500]
    without = results["without"][1]
    if key is not None:  # everything but /health refused; /health answers
        assert set(without) <= {200, 401} and without.get(401, 0) > 3 * EXAMPLES
    else:
        assert results["with the key"][1] == without or 200 in without


def test_a_load_error_on_health_names_no_server_path(tiny_mistral, tmp_path):
    folder = tmp_path / "secret-place" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    app = create_app(load_config(None, ["model.device=cpu"]), folder)
    with TestClient(app) as client:
        for _ in range(600):
            body = client.get("/health").json()
            if body["status"] != "loading":
                break
            time.sleep(0.05)
    assert body["status"] == "error" and body["error"]
    assert str(tmp_path) not in body["error"] and "secret-place" not in body["error"], body["error"]
    assert not re.search(r"\b[A-Z]\w*Error:", body["error"]), body["error"]
    assert Path(folder).name in body["error"] or "config.json" in body["error"]
