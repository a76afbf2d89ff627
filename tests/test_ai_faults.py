"""The diagnosis route when the AI service fails: down, slower than the
client's timeout, hanging, answering garbage, answering 500 or dropping the
connection. Every form answers 502 or 504 naming the fault, releases its
connection to the service, and the optimized forms hold no payload
afterwards, even with the cycle collector off."""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import psutil
import pytest
from ai_support import (
    build_clinic,
    bytes_left_behind,
    running_stub,
    stub_control,
    wait_until_idle,
)
from starlette.testclient import TestClient

from benchmarks.serverproc import ServerProcess, free_port, serve_args
from reference_impl import imagegen
from reference_impl.app import create_app
from reference_impl.config import Settings
from reference_impl.server import dataset_locations

pytestmark = pytest.mark.integration

VARIANTS = ("naive", "optimized", "optimized-plus")
ROUTE = "/api/ai/dental-diagnosis"
#: The server's timeout for the AI service; "slow" answers after 5 times it.
AI_TIMEOUT_S = 1.5
MIB = 1024 * 1024

#: (name, stub settings, status, code). A hang and a slow answer look the
#: same to the server; in-process tests run only the slow one.
FAULTS = [
    ("answers_500", {"failMode": "500"}, 502, "ai_error"),
    ("answers_garbage", {"failMode": "garbage"}, 502, "ai_bad_response"),
    ("drops_connection", {"failMode": "disconnect"}, 502, "ai_unavailable"),
    ("hangs", {"failMode": "hang"}, 504, "ai_timeout"),
    ("slower_than_timeout", {"delayS": 5 * AI_TIMEOUT_S}, 504, "ai_timeout"),
]
HEALTHY = {"failMode": "none", "delayS": 0}


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient 1 has four small images, one of them wider than 1024 px."""
    rng = random.Random(5)
    files = [
        imagegen.generate("panoramic", rng, 0.4),
        imagegen.generate("bitewing", rng, 0.3),
        imagegen.generate("periapical", rng, 0.3),
    ]
    return build_clinic(tmp_path_factory.mktemp("faults") / "clinic", [4], files)


@pytest.fixture(scope="module")
def ai_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_stub(tmp_path_factory.mktemp("stub")) as url:
        yield url


@pytest.fixture
def stub(ai_url: str) -> Iterator[str]:
    """The module's stub, healthy again and idle after the test."""
    yield ai_url
    stub_control(ai_url, **HEALTHY)
    assert wait_until_idle(ai_url)["inFlight"] == 0


def app_for(dataset: Path, variant: str, ai_url: str):
    db_url, storage = dataset_locations(dataset)
    settings = Settings.for_variant(
        variant,
        db_url=db_url,
        storage_dir=storage,
        ai_url=ai_url,
        ai_timeout_s=AI_TIMEOUT_S,
    )
    return create_app(settings)


@pytest.fixture(scope="module")
def clients(clinic: Path, ai_url: str) -> Iterator[dict[str, TestClient]]:
    with ExitStack() as stack:
        yield {
            variant: stack.enter_context(TestClient(app_for(clinic, variant, ai_url)))
            for variant in VARIANTS
        }


def diagnose(client: TestClient) -> httpx.Response:
    return client.post(ROUTE, json={"patientId": 1})


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [fault[1:] for fault in FAULTS if fault[0] != "hangs"],
    ids=[fault[0] for fault in FAULTS if fault[0] != "hangs"],
)
def test_fault_is_answered_and_nothing_is_held(
    clients, stub, variant, changes, status, code
):
    client = clients[variant]
    # Warm the pools, compiled queries and imports; under a heavy machine
    # load this first call may itself time out, which changes nothing here.
    diagnose(client)
    stub_control(stub, **changes)
    response, left = bytes_left_behind(lambda: diagnose(client))
    assert_error(response, status, code)
    # The server closed its connection: the stub sees no request in flight.
    assert wait_until_idle(stub)["inFlight"] == 0
    if variant != "naive":
        assert left < MIB


@pytest.mark.parametrize("variant", VARIANTS)
def test_ai_service_down(clinic, variant):
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    with TestClient(app_for(clinic, variant, dead_url)) as client:
        assert_error(diagnose(client), 502, "ai_unavailable")
        response, left = bytes_left_behind(lambda: diagnose(client))
        assert_error(response, 502, "ai_unavailable")
        assert dead_url in response.json()["error"]["message"]
        if variant != "naive":
            assert left < MIB
        assert client.get("/healthz").json()["status"] == "ok"


# -- real server processes under concurrent faults ---------------------------------

CONCURRENT = 2


def burst(base_urls: list[str], count: int) -> list[list[tuple[int, str | None]]]:
    """``count`` concurrent diagnoses on each server at once: for each server,
    the (status, error code) of its answers."""

    def one(base_url: str) -> tuple[int, str | None]:
        # The client's own timeout bounds the test should a server hang.
        response = httpx.post(base_url + ROUTE, json={"patientId": 1}, timeout=30)
        return response.status_code, response.json().get("error", {}).get("code")

    targets = [url for url in base_urls for _ in range(count)]
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        answers = list(pool.map(one, targets))
    return [answers[i * count : (i + 1) * count] for i in range(len(base_urls))]


def connections_to(pid: int, ai_url: str) -> int:
    """Open TCP connections from process ``pid`` to the AI service."""
    port = httpx.URL(ai_url).port
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port
    )


@pytest.fixture
def servers(clinic: Path, stub: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """One ``membench serve`` process per form, started side by side."""
    processes = []
    for variant in VARIANTS:
        port = free_port()
        command = serve_args(
            variant,
            port=port,
            dataset=clinic,
            ai_url=stub,
            extra=["--ai-timeout", str(AI_TIMEOUT_S)],
        )
        log_path = tmp_path / f"{variant}.log"
        processes.append(ServerProcess(command, port=port, log_path=log_path))
    try:
        # Launched from this thread: a server dies with the thread that
        # started it (PR_SET_PDEATHSIG), so no pool threads here.
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.stop()


def test_server_processes_stay_healthy_through_faults(servers, stub):
    urls = [server.base_url for server in servers]
    healthy = [[(200, None)] * CONCURRENT] * len(urls)
    assert burst(urls, CONCURRENT) == healthy
    kept_alive = [connections_to(server.pid, stub) for server in servers]
    for _, changes, status, code in FAULTS:
        stub_control(stub, **HEALTHY)
        stub_control(stub, **changes)
        expected = [[(status, code)] * CONCURRENT] * len(urls)
        assert burst(urls, CONCURRENT) == expected
    # The last faults were timeouts: the servers closed those connections
    # rather than keep them, and kept no more than a healthy load leaves.
    left_open = [connections_to(server.pid, stub) for server in servers]
    assert all(1 <= n <= CONCURRENT for n in kept_alive), kept_alive
    assert left_open == [0] * len(servers), (kept_alive, left_open)
    stub_control(stub, **HEALTHY)
    assert wait_until_idle(stub)["inFlight"] == 0
    assert burst(urls, CONCURRENT) == healthy
    for url in urls:
        assert httpx.get(url + "/healthz", timeout=10).json()["status"] == "ok"
