"""Client-side load balancing: one client spreading calls over several servers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import free_port, png_bytes, start_server, wait_serving
from prometheus_client.parser import text_string_to_metric_families

from imago.client import TextOptions
from imago.client.api import ImagoClient
from imago.client.balancing import channel_target

CALLS = 12
READY = grpc.ChannelConnectivity.READY
CONNECTING = grpc.ChannelConnectivity.CONNECTING


# Target parsing (pure logic)


def test_a_single_target_is_passed_to_grpc_unchanged():
    assert channel_target("imago.example:50051").uri == "imago.example:50051"


def test_a_target_with_a_grpc_scheme_is_passed_unchanged_even_with_commas():
    target = "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert channel_target(target).uri == target
    assert channel_target("dns:///imago-headless.ml.svc:50051").uri.startswith("dns:///")


def test_a_comma_separated_list_becomes_one_address_list():
    assert (
        channel_target("127.0.0.1:5001, 127.0.0.2:5002").uri == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    )


def test_a_sequence_of_targets_becomes_one_address_list():
    assert channel_target(["127.0.0.1:5001", "127.0.0.2:5002"]).uri == (
        "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    )


def test_host_names_in_a_list_are_resolved_and_the_first_is_the_tls_authority():
    resolved = channel_target(["localhost:5001", "127.0.0.2:5002"])
    assert resolved.uri == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    assert ("grpc.default_authority", "localhost:5001") in resolved.options()


def test_bracketed_ipv6_addresses_make_an_ipv6_list():
    assert channel_target("[::1]:5001,[::1]:5002").uri == "ipv6:[::1]:5001,[::1]:5002"


def test_every_channel_asks_for_round_robin():
    assert ("grpc.lb_policy_name", "round_robin") in channel_target("h:1").options()


@pytest.mark.parametrize(
    ("target", "uri"),
    [
        ("localhost", "localhost:50051"),
        ("10.0.0.7", "10.0.0.7:50051"),
        ("[::1]", "[::1]:50051"),
        ("::1", "[::1]:50051"),
        ("localhost:7000", "localhost:7000"),
    ],
)
def test_a_single_target_without_a_port_gets_imagos_port_not_grpcs_443(target, uri):
    assert channel_target(target).uri == uri


@pytest.mark.parametrize(
    ("targets", "named"),
    [
        ("127.0.0.1:5001,", "127.0.0.1:5001,"),
        ("127.0.0.1:5001,server-b", "server-b"),
        ("127.0.0.1:5001,127.0.0.2:99999", "127.0.0.2:99999"),
        ("127.0.0.1:5001,::1:5002", "::1:5002"),
        ("127.0.0.1:5001,[::1]:5002", "mix IPv4 and IPv6"),
        ("127.0.0.1:5001,no-such-host.invalid:5002", "no-such-host.invalid:5002"),
    ],
)
def test_a_malformed_target_list_is_refused_naming_the_entry(targets, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        channel_target(targets)


def test_the_cli_reports_a_malformed_target_list_as_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "imago.client.cli", "--target", "127.0.0.1:1,bad", "health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "target 'bad' is not HOST:PORT" in done.stderr


# Two real servers


@pytest.fixture(scope="module")
def two_servers(model_cache, tmp_path_factory):
    """Two tiny servers, each with its own /metrics port, started together."""
    logs = tmp_path_factory.mktemp("balancing")
    ports = [free_port(), free_port()]
    servers = [
        start_server(model_cache, logs, "--metrics-port", str(port), wait=False) for port in ports
    ]
    try:
        for server in servers:
            wait_serving(server.target, server.process, server.log_path)
        yield list(zip(servers, ports, strict=True))
    finally:
        for server in servers:
            server.stop()


def captions_answered(metrics_port: int) -> float:
    """Caption RPCs the server at ``metrics_port`` finished with OK."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "imago_requests_total"
                and labels.get("method") == "Caption"
                and labels.get("code") == "OK"
            ):
                total += sample.value
    return total


def test_calls_from_one_client_reach_both_servers(two_servers):
    before = [captions_answered(port) for _, port in two_servers]
    targets = [server.target for server, _ in two_servers]
    with ImagoClient(targets, timeout=60) as client:
        for _ in range(CALLS):
            client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3))
    # A call is counted when its server finishes it, a moment after the reply.
    deadline = time.monotonic() + 10
    while True:
        after = [captions_answered(port) for _, port in two_servers]
        counted = [end - start for start, end in zip(before, after, strict=True)]
        if sum(counted) >= CALLS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(counted) == CALLS
    # round_robin alternates over ready servers; the first calls may find one
    # connection still opening, so allow some imbalance but not none at all.
    assert min(counted) >= CALLS // 4, counted


def test_calls_keep_succeeding_on_the_other_server_when_one_is_unreachable(two_servers):
    (server, port), _ = two_servers
    dead = f"127.0.0.1:{free_port()}"
    with ImagoClient([server.target, dead], timeout=60) as client:
        for _ in range(4):
            assert client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)).captions


def test_a_dns_name_target_is_balanced_with_round_robin(two_servers):
    (server, _), _ = two_servers
    port = server.target.rsplit(":", 1)[1]
    with ImagoClient(f"dns:///localhost:{port}", timeout=60) as client:
        assert client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)).captions


def test_the_cli_accepts_a_comma_separated_target_list(two_servers):
    targets = ",".join(server.target for server, _ in two_servers)
    done = subprocess.run(
        [sys.executable, "-m", "imago.client.cli", "--target", targets, "health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout


# Connection age


def test_a_server_with_a_connection_age_asks_clients_to_reconnect(model_cache, tmp_path):
    server = start_server(model_cache, tmp_path, "--max-connection-age-s", "1")
    try:
        states: list[grpc.ChannelConnectivity] = []
        changed = threading.Event()

        def record(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            changed.set()

        with ImagoClient(server.target, timeout=60) as client:
            client._channel.subscribe(record, try_to_connect=False)
            assert client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)).captions
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and states.count(READY) < 2:
                changed.wait(0.2)
                changed.clear()
            # The server sent GOAWAY after a second: round_robin opened a new
            # connection (going through CONNECTING to READY again) and calls
            # go on over it.
            first_ready = states.index(READY)
            assert CONNECTING in states[first_ready:] and states.count(READY) >= 2, states
            assert client.caption(png_bytes(), generation=TextOptions(max_new_tokens=3)).captions
    finally:
        assert server.stop() == 0, server.log()
