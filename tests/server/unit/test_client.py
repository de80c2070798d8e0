"""The Python clients against a small fake PixArt servicer (not the real server): messages, metadata, timeouts,
errors, streams and subscribe, with the sync and the asyncio client put through the same cases."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time

import grpc
import pytest
from grpc_status import rpc_status

from protos.pixart.v1 import pixart_pb2 as pb
from protos.pixart.v1 import pixart_pb2_grpc as pb_grpc
from server.client import AsyncClient, Client, PixArtError, make_request
from server.core import records

pytestmark = pytest.mark.timeout(60)

KEY = "secret"
VIOLATIONS = [("prompt", "must not be empty"), ("num_images", "must be 1..8")]
# request id -> the states Status reports, one per poll (the last one repeats)
SCRIPTS = {
    "done": [pb.IN_QUEUE, pb.IN_PROGRESS, pb.COMPLETED],
    "failed": [pb.IN_QUEUE, pb.FAILED],
    "canceled": [pb.IN_PROGRESS, pb.CANCELED],
}


class FakePixArt(pb_grpc.PixArtServicer):
    """Answers every method from a script and records what each call brought: message, key and deadline."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object, str | None]] = []
        self.deadlines: list[float | None] = []
        self.polls: dict[str, int] = {}
        self.cancelled = threading.Event()

    def _record(self, method: str, message: object, context: grpc.aio.ServicerContext) -> None:
        key = dict(context.invocation_metadata()).get("authorization")
        self.seen.append((method, message, key))
        self.deadlines.append(context.time_remaining())

    async def Generate(self, request, context):
        self._record("Generate", request, context)
        if request.prompt == "bad":
            await context.abort_with_status(rpc_status.to_status(records.bad_request_status(VIOLATIONS)))
        return pb.GenerateResult(seed=7, prompt=request.prompt)

    async def GenerateStream(self, request, context):
        self._record("GenerateStream", request, context)
        yield pb.GenerateEvent(request_id="s1", queued=pb.QueuePosition(position=0))
        yield pb.GenerateEvent(request_id="s1", progress=pb.Progress(step=1, total_steps=2))
        if request.prompt == "error event":  # as the server does: the error event, then the call ends with it
            status = records.bad_request_status(VIOLATIONS)
            yield pb.GenerateEvent(request_id="s1", error=status)
            await context.abort_with_status(rpc_status.to_status(status))
        elif request.prompt == "broken":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine gone")
        elif request.prompt == "endless":
            try:
                while True:
                    await asyncio.sleep(0.01)
                    yield pb.GenerateEvent(request_id="s1", progress=pb.Progress(step=1, total_steps=2))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        else:
            yield pb.GenerateEvent(request_id="s1", result=pb.GenerateResult(seed=7, prompt=request.prompt))

    async def Submit(self, request, context):
        self._record("Submit", request, context)
        return pb.SubmitResponse(request_id=request.request.prompt, queue_position=0)

    async def Status(self, request, context):
        self._record("Status", request, context)
        script = SCRIPTS.get(request.request_id)
        if script is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id}")
        n = self.polls[request.request_id] = self.polls.get(request.request_id, -1) + 1
        state = script[min(n, len(script) - 1)]
        status = pb.StatusResponse(request_id=request.request_id, state=state)
        if state == pb.FAILED:
            status.error.CopyFrom(records.error_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"))
        return status

    async def Result(self, request, context):
        self._record("Result", request, context)
        return pb.GenerateResult(request_id=request.request_id, seed=11)

    async def Cancel(self, request, context):
        self._record("Cancel", request, context)
        return pb.CancelResponse(request_id=request.request_id, outcome=pb.CANCELLATION_REQUESTED,
                                 state=pb.IN_PROGRESS)


@pytest.fixture(scope="module")
def served():
    """The fake on 127.0.0.1, port 0, served by grpc.aio on an event loop of its own thread."""
    servicer, loop, ready, box = FakePixArt(), asyncio.new_event_loop(), threading.Event(), {}

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_PixArtServicer_to_server(servicer, server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        box["stop"] = asyncio.Event()
        await server.start()
        ready.set()
        await box["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield servicer, f"127.0.0.1:{box['port']}"
    loop.call_soon_threadsafe(box["stop"].set)
    thread.join(10)
    assert not thread.is_alive()
    loop.close()


@pytest.fixture
def fake(served) -> FakePixArt:
    servicer, _ = served
    servicer.seen.clear()
    servicer.deadlines.clear()
    servicer.polls.clear()
    servicer.cancelled.clear()
    return servicer


class Blocking:
    """The sync client as the cases use it: a stream comes back as the list of its events."""

    def __init__(self, *args, **options) -> None:
        self.client = Client(*args, **options)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        return lambda *args, **kw: _listed(method(*args, **kw))

    def stream_first(self, n: int, *args, **kw) -> list[pb.GenerateEvent]:
        events = self.client.stream(*args, **kw)
        taken = [next(events) for _ in range(n)]
        events.close()
        return taken

    def close(self) -> None:
        self.client.close()


def _listed(result):
    return list(result) if inspect.isgenerator(result) else result


class Awaited:
    """The asyncio client driven on an event loop of its own, each call awaited to its end."""

    def __init__(self, *args, **options) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(self._open(*args, **options))

    @staticmethod
    async def _open(*args, **options) -> AsyncClient:
        return AsyncClient(*args, **options)

    def __getattr__(self, name: str):
        method = getattr(self.client, name)

        def call(*args, **kw):
            result = method(*args, **kw)
            return self.loop.run_until_complete(_collect(result) if inspect.isasyncgen(result) else result)

        return call

    def stream_first(self, n: int, *args, **kw) -> list[pb.GenerateEvent]:
        async def take() -> list[pb.GenerateEvent]:
            events = self.client.stream(*args, **kw)
            taken = [await anext(events) for _ in range(n)]
            await events.aclose()
            return taken

        return self.loop.run_until_complete(take())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


async def _collect(events) -> list:
    return [event async for event in events]


KINDS = {"sync": Blocking, "async": Awaited}


@pytest.fixture(params=list(KINDS))
def connect(request, served):
    """Opens clients of one kind (sync or async) to the fake, all closed after the test."""
    _, address = served
    opened = []

    def connect(key: str | None = KEY, **options):
        client = KINDS[request.param](address, key, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def calls(fake: FakePixArt) -> list[str]:
    return [method for method, _, _ in fake.seen]


def run_every_call(client) -> list:
    return [
        client.generate("a cat", image_size="square", style="Anime", scheduler="SA-SOLVER", output_format="jpeg",
                        seed=3, num_images=2),
        client.generate(make_request("a dog", image_size=(640, 480))),
        client.stream("a bird"),
        client.submit("done", webhook_url="https://example.com/hook", guidance_scale=2.5),
        client.status("done", logs=True),
        client.result("done"),
        client.cancel("done"),
    ]


def test_every_call_sends_its_message_and_the_key(connect, fake):
    answers = run_every_call(connect(timeout=30))
    assert calls(fake) == ["Generate", "Generate", "GenerateStream", "Submit", "Status", "Result", "Cancel"]
    assert all(key == f"Key {KEY}" for _, _, key in fake.seen)
    generate = fake.seen[0][1]
    assert (generate.prompt, generate.image_size_preset, generate.style, generate.scheduler) == (
        "a cat", pb.SQUARE, pb.STYLE_ANIME, pb.SA_SOLVER)
    assert (generate.output_format, generate.seed, generate.num_images) == (pb.JPEG, 3, 2)
    assert not generate.HasField("guidance_scale")  # left out: the server's default applies
    assert fake.seen[1][1] == make_request("a dog", image_size=(640, 480))
    assert fake.seen[3][1] == pb.SubmitRequest(request=make_request("done", guidance_scale=2.5),
                                               webhook_url="https://example.com/hook")
    assert fake.seen[4][1] == pb.StatusRequest(request_id="done", logs=True)
    assert fake.seen[5][1] == fake.seen[6][1] == pb.RequestRef(request_id="done")
    generated, _, streamed, request_id, status, result, cancel = answers
    assert generated == pb.GenerateResult(seed=7, prompt="a cat")
    assert [e.WhichOneof("event") for e in streamed] == ["queued", "progress", "result"]
    assert request_id == "done" and status.state == pb.IN_QUEUE and result.seed == 11
    assert cancel.outcome == pb.CANCELLATION_REQUESTED


def test_both_clients_send_the_same_messages(served, fake):
    _, address = served
    sent = {}
    for kind, make in KINDS.items():
        fake.seen.clear()
        fake.polls.clear()
        client = make(address, KEY, timeout=30)
        try:
            run_every_call(client)
            client.subscribe("done", poll_interval=0.001)
        finally:
            client.close()
        sent[kind] = list(fake.seen)
    assert sent["sync"] == sent["async"] and len(sent["sync"]) == 11


def test_without_a_key_no_authorization_is_sent(connect, fake):
    connect(key=None).result("done")
    assert fake.seen == [("Result", pb.RequestRef(request_id="done"), None)]


def test_a_calls_timeout_overrides_the_clients(connect, fake):
    client = connect(timeout=30)
    client.result("done")
    client.result("done", timeout=5)
    client.stream("a bird", timeout=5)
    # deadlines travel rounded up a little
    assert 20 < fake.deadlines[0] < 31 and 0 < fake.deadlines[1] < 6 and 0 < fake.deadlines[2] < 6
    connect().result("done")
    assert fake.deadlines[3] is None  # no timeout anywhere: no deadline


def test_a_refusal_is_raised_with_its_code_and_field_violations(connect, fake):
    client = connect()
    with pytest.raises(PixArtError) as refused:
        client.generate("bad")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.violations == VIOLATIONS
    assert refused.value.message.startswith("invalid request: prompt: must not be empty")
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    with pytest.raises(PixArtError) as missing:
        client.status("nobody")
    assert (missing.value.code, missing.value.message, missing.value.violations) == (
        grpc.StatusCode.NOT_FOUND, "no request nobody", [])


def test_a_stream_yields_an_error_event_instead_of_raising(connect, fake):
    events = connect().stream("error event")
    assert [e.WhichOneof("event") for e in events] == ["queued", "progress", "error"]
    assert records.violations_from_status(events[-1].error) == VIOLATIONS


def test_a_stream_that_fails_before_its_last_event_raises(connect, fake):
    with pytest.raises(PixArtError) as failed:
        connect().stream("broken")
    assert (failed.value.code, failed.value.message) == (grpc.StatusCode.UNAVAILABLE, "engine gone")


def test_leaving_a_stream_cancels_the_call(connect, fake):
    events = connect().stream_first(2, "endless")
    assert [e.WhichOneof("event") for e in events] == ["queued", "progress"]
    assert fake.cancelled.wait(5)


def test_subscribe_polls_until_the_request_ends_then_returns_its_result(connect, fake):
    updates = []
    result = connect().subscribe("done", on_update=updates.append, with_logs=True, poll_interval=0.001,
                                 webhook_url="https://example.com/hook", seed=4)
    assert result == pb.GenerateResult(request_id="done", seed=11)
    assert [u.state for u in updates] == [pb.IN_QUEUE, pb.IN_PROGRESS, pb.COMPLETED]
    assert calls(fake) == ["Submit", "Status", "Status", "Status", "Result"]
    assert fake.seen[0][1] == pb.SubmitRequest(request=make_request("done", seed=4),
                                               webhook_url="https://example.com/hook")
    assert all(message.logs for method, message, _ in fake.seen if method == "Status")


def test_subscribe_raises_the_error_of_a_failed_request(connect, fake):
    with pytest.raises(PixArtError) as failed:
        connect().subscribe("failed", poll_interval=0.001)
    assert (failed.value.code, failed.value.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory")
    assert calls(fake) == ["Submit", "Status", "Status"]  # no Result asked for


def test_subscribe_raises_for_a_canceled_request(connect, fake):
    started = time.monotonic()
    with pytest.raises(PixArtError) as canceled:
        connect().subscribe("canceled", poll_interval=0.001)
    assert (canceled.value.code, canceled.value.message) == (grpc.StatusCode.CANCELLED,
                                                             "request canceled was CANCELED")
    assert calls(fake) == ["Submit", "Status", "Status"] and time.monotonic() - started < 5
