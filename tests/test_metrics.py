"""GET /metrics (memcli.server.metrics): a running server's counters move with an inject, an ask
and an OpenAI chat, in Prometheus' text format as prometheus-client's own parser reads it; the
route is behind the same access rules as the API (over TCP only with the bearer token); labels
name route templates, never the path a client sent."""

from __future__ import annotations

import socket

import httpx
import pytest

from memcli.loading.checkpoints import BUNDLED

from .helpers import assert_clean_log, env_for_server, metric_samples as samples, start_server, tiny_note, upload

pytestmark = pytest.mark.skipif(not (BUNDLED["memcli-tiny"] / "model.safetensors").is_file(),
                                reason="memcli-tiny not shipped")
TOKEN = "s3cret-metrics"


def value(found: dict, name: str, **labels) -> float:
    """The one sample of `name` with (at least) these labels; 0 when there is none (a counter not
    yet counted has no series)."""
    matching = [s for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) <= 1, matching
    return matching[0].value if matching else 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_count_an_inject_an_ask_and_a_chat_behind_the_token(tmp_path):
    from memcli.app import facts
    from memcli.server.client import Client, ServerError
    from memcli.wire import AskRequest, InjectParams, InjectReport

    note = tmp_path / "facts.txt"
    note.write_text(facts.note_text(tiny_note()))
    port = free_port()
    running = start_server(tmp_path, "--keep-alive", "-1", "--port", str(port),
                           env=env_for_server(MEMCLI_TOKEN=TOKEN))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with Client() as client:
            before = samples(client.http.get("/metrics").text)  # the owner-only socket needs no token
            assert value(before, "memcli_loaded_models") == 0
            assert value(before, "memcli_inject_chunks_total") == 0

            events = list(client.inject(InjectParams("notes", model="memcli-tiny", model_explicit=True), [upload(note)]))
            report = events[-1]
            assert isinstance(report, InjectReport) and report.chunks >= 1 and report.tokens > 0
            answer = client.ask(AskRequest("notes", tiny_note()[0].question))
            chunks = list(client.chat("notes", [{"role": "user", "content": tiny_note()[1].question}]))
            assert chunks and chunks[-1]["usage"]["completion_tokens"] >= 1
            with pytest.raises(ServerError):  # a pool that is not there: counted under the route's template
                client.pool_info("no-such-pool-xyz")
            [loaded] = client.ps()["models"]

        # over TCP: refused without the token (and that refusal is counted), read with it
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        response = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        after = samples(response.text)

        # requests by endpoint (the route's template) and status
        assert value(after, "memcli_requests_total", endpoint="/api/inject", status="200") == 1
        assert value(after, "memcli_requests_total", endpoint="/api/ask", status="200") == 1
        assert value(after, "memcli_requests_total", endpoint="/v1/chat/completions", status="200") == 1
        assert value(after, "memcli_requests_total", endpoint="/api/pools/{name:path}", status="404") == 1
        assert value(after, "memcli_requests_total", endpoint="/metrics", status="401") == 2
        assert value(after, "memcli_requests_total", endpoint="/metrics", status="200") >= 1
        labels = {v for s in after["memcli_requests_total"] for v in s.labels.values()}
        assert not any("no-such-pool" in v for v in labels)  # never the raw path

        # answers' timings, from the wire Answer: one observation per answering endpoint
        assert value(after, "memcli_time_to_first_token_seconds_count", endpoint="/api/ask") == 1
        assert value(after, "memcli_time_to_first_token_seconds_count", endpoint="/v1/chat/completions") == 1
        ask_ttft = value(after, "memcli_time_to_first_token_seconds_sum", endpoint="/api/ask")
        assert ask_ttft == pytest.approx(answer.seconds_to_first_token, abs=1e-3)  # the wire's rounding
        decoded = value(after, "memcli_decode_tokens_per_second_count", endpoint="/api/ask")
        assert decoded == (1 if answer.decode_tokens_per_second is not None else 0)

        # the inject's report
        assert value(after, "memcli_injects_total", outcome="done") == 1
        assert value(after, "memcli_inject_chunks_total") == report.chunks
        assert value(after, "memcli_inject_tokens_total") == report.tokens
        assert value(after, "memcli_inject_tokens_per_second_count") == 1

        # the device's queue, the model's load, what is kept loaded
        assert value(after, "memcli_device_queue_wait_seconds_count") >= 3  # inject, ask, chat: a turn each at least
        assert value(after, "memcli_device_queue_depth") == 0
        assert value(after, "memcli_model_load_seconds_count") == 1  # memcli-tiny, once
        assert value(after, "memcli_loaded_models") == 1
        assert value(after, "memcli_model_weights_bytes", model=loaded["model"]) == loaded["weights_bytes"] > 0
        assert value(after, "memcli_pool_states") == 1
        assert value(after, "memcli_pool_state_bytes", pool="notes") > 0
        assert value(after, "memcli_pool_state_version", pool="notes") == answer.pool_version
        assert value(after, "memcli_pool_memory_budget_bytes") > 0
    finally:
        running.stop()
    assert_clean_log(running.log)


def test_each_server_counts_in_its_own_registry():
    """Two servers in one process (as the tests make) never share counts, and neither touches
    prometheus-client's global default registry."""
    from prometheus_client import REGISTRY
    from starlette.testclient import TestClient

    from memcli.app.settings import load_settings
    from memcli.server.http import Server
    from memcli.server.resident import Resident

    residents = [Resident(load_settings(device="cpu")) for _ in range(2)]
    try:
        one, two = (TestClient(Server(resident).app()) for resident in residents)
        assert one.get("/api/health").status_code == 200
        assert one.get("/api/nothing/here").status_code == 404
        first, second = samples(one.get("/metrics").text), samples(two.get("/metrics").text)
        assert value(first, "memcli_requests_total", endpoint="/api/health", status="200") == 1
        assert value(first, "memcli_requests_total", endpoint="other", status="404") == 1
        assert value(second, "memcli_requests_total", endpoint="/api/health", status="200") == 0
        openmetrics = one.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")  # the scraper asked for OpenMetrics: it gets it
        assert REGISTRY.get_sample_value("memcli_requests_total", {"endpoint": "/api/health", "status": "200"}) is None
    finally:
        for resident in residents:
            resident.close()
