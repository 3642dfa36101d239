"""NATS input: `mizzen.accesslog.<proxy>` through a JetStream durable consumer on a private nats-server. The
logsink restarts mid-stream while lines keep being published: nothing lost, nothing doubled. Bad lines go
to the dead-letter subject with their reasons."""

from __future__ import annotations

import asyncio
import hashlib

import nats
import orjson
import pytest

from mizzen.services.mesh.bus import ACCESSLOG_PREFIX
from tests.logsink_data.receiver import Receiver
from tests.logsink_data.service import LogsinkProc
from tests.test_logsink_file import A_PROXY, B_PROXY, pair, settle

pytestmark = pytest.mark.timeout(180)


def span_id(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


async def test_restart_mid_stream_nothing_lost_nothing_doubled(tmp_path, nats_server):
    url = nats_server.meta["url"]
    recv = await Receiver().start()
    sink = LogsinkProc(tmp_path, ["--nats", url, "--otlp-endpoint", recv.endpoint, "--join-window", "0.3"])
    nc = await nats.connect(url)
    js = nc.jetstream()
    written: list[bytes] = []
    try:
        await sink.start()  # creates the stream and the durable consumer
        n = 0
        for chunk in range(12):
            if chunk == 4:
                await sink.stop()
                assert sink.proc.popen.returncode == 0, sink.log_text()
            if chunk == 8:
                await sink.start()
            pairs = [pair(n + k) for k in range(25)]
            n += 25
            servers = [s for _, s in pairs]
            clients = [c for c, _ in pairs]
            # server lines one per message, client lines as NDJSON batches of 5
            for s in servers:
                await js.publish(ACCESSLOG_PREFIX + B_PROXY, s)
            for i in range(0, len(clients), 5):
                await js.publish(ACCESSLOG_PREFIX + A_PROXY, b"\n".join(clients[i:i + 5]) + b"\n")
            written += servers + clients
            await asyncio.sleep(0.05)
        await settle(recv, len(written), quiet=1.5)
        spans = recv.spans()
        ids = [s.span_id for s in spans]
        assert len(ids) == len(set(ids)), "a line was exported twice"
        assert sorted(ids) == sorted(span_id(x) for x in written), "a line was lost"
        # the subject names the sidecar: its identity is the span's resource
        assert {(s.service, s.kind) for s in spans} == {("front.shop", 3), ("cart.shop", 2)}
        by_id = {s.span_id: s for s in spans}
        assert sum(1 for s in spans if s.kind == 2 and s.parent_span_id in by_id) >= 280
        m = await sink.metrics()
        # the second run read exactly what was published after the first one stopped: 8 chunks of 50 lines
        assert m['mizzen_logsink_lines_total{input="nats"}'] == 400
        await sink.stop()
        # every message was acked: the durable consumer has nothing pending
        info = await js.consumer_info("MIZZEN_ACCESSLOG", "mizzen-logsink")
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await sink.stop()
        await nc.close()
        await recv.stop()


async def test_dead_letters_on_a_subject(tmp_path, nats_server):
    url = nats_server.meta["url"]
    recv = await Receiver().start()
    sink = LogsinkProc(tmp_path, ["--nats", url, "--otlp-endpoint", recv.endpoint, "--join-window", "0.1",
                                  "--dead-letter-subject", "mizzen.deadletter.accesslog"])
    nc = await nats.connect(url)
    got: list[dict] = []

    async def on_dead(msg):
        got.append(orjson.loads(msg.data))

    await nc.subscribe("mizzen.deadletter.accesslog", cb=on_dead)
    try:
        await sink.start()
        js = nc.jetstream()
        good = pair(1)[0]
        await js.publish(ACCESSLOG_PREFIX + A_PROXY, b'{"start_time": "later"}\n' + good + b"\nnot json\n")
        await recv.wait_spans(1)
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.1)
        assert [(d["kind"], d["proxy"], d["input"]) for d in got] == [("bad_value", A_PROXY, "nats"),
                                                                      ("not_json", A_PROXY, "nats")]
        assert got[0]["reason"].startswith("start_time:") and got[0]["line"] == '{"start_time": "later"}'
        assert [s.span_id for s in recv.spans()] == [span_id(good)]
    finally:
        await sink.stop()
        await nc.close()
        await recv.stop()
