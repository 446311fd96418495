"""The worker protocol (ondemand/protocol.py): every message survives encode -> decode, and every
kind of malformed line is refused with one ProtocolError that says what was wrong."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ondemand import errors
from ondemand import protocol as p
from ondemand.daemon import api
from ondemand.daemon.process import ExitKind, WorkerProcess, make_spawn
from ondemand.errors import ProtocolError

MESSAGES: list[p.Message] = [
    p.Load(model="iic/emotion2vec_plus_large", revision="master", cache_dir="", device="auto",
           dtype="float32"),
    p.Infer(batch="b1", granularity="utterance",
            items=(p.InferItem(job="j1", key="a.wav", audio="/spool/j1.npy"),
                   p.InferItem(job="j2", key="", audio="/spool/j2.npy",
                               embedding="/spool/j2.emb.npy"))),
    p.Infer(batch="b2", granularity="frame", items=(), batch_audio_s=60.0, heartbeat_s=2.0),
    p.Infer(batch="b4", granularity="utterance", items=(
        p.InferItem(job="j3", key="call", audio="/spool/j3.npy",
                    segments=p.Segmenting(mode="fixed", window_s=2.0, hop_s=0.5)),
        p.InferItem(job="j4", key="memo", audio="/spool/j4.npy",
                    segments=p.Segmenting(mode="vad", vad_threshold=0.6)))),
    p.Unload(),
    p.Exit(),
    p.Hello(pid=1234),
    p.Loaded(seconds=1.5, device="cuda:0", dtype="bfloat16",
             timings={"import_s": 0.8, "weights_s": 0.5}),
    p.Loaded(seconds=0.1, device="cpu", dtype="float32"),
    p.LoadFailed(code="model_not_found", message="no such model"),
    p.Heartbeat(batch="b1", seconds=4.25),
    p.Progress(batch="b4", job="j3", done_s=61.5, total_s=3600.0),
    p.Result(batch="b1", seconds=0.42, results=(
        p.ItemResult(job="j1", result={"key": "a.wav", "labels": ["x"], "scores": [1.0],
                                       "top": {"label": "x", "score": 1.0}, "frames": 3,
                                       "duration_s": 0.5}),
        p.ItemResult(job="j2", error=p.ErrorInfo(code="audio_missing", message="gone")),
    )),
    p.Result(batch="b3", seconds=0.0, results=()),
    p.BatchFailed(batch="b1", code="out_of_memory", message="does not fit"),
    p.Unloaded(),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_as_one_line(msg: p.Message) -> None:
    line = p.encode(msg)
    assert line.endswith("\n") and line.count("\n") == 1
    assert p.decode(line) == msg
    assert p.decode(line.encode()) == msg  # bytes straight from a pipe
    if isinstance(msg, p.Load | p.Infer | p.Unload | p.Exit):
        assert p.decode_op(line) == msg
        with pytest.raises(ProtocolError, match="expected an event"):
            p.decode_event(line)
    else:
        assert p.decode_event(line) == msg
        with pytest.raises(ProtocolError, match="expected an op"):
            p.decode_op(line)


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in MESSAGES} == set(p.OPS.values()) | set(p.EVENTS.values())


def test_wire_format_is_the_documented_one() -> None:
    assert json.loads(p.encode(p.Hello(pid=7))) == {"event": "hello", "pid": 7}
    assert json.loads(p.encode(p.Exit())) == {"op": "exit"}
    item = json.loads(p.encode(MESSAGES[1]))["items"][0]
    assert item == {"job": "j1", "key": "a.wav", "audio": "/spool/j1.npy", "embedding": None,
                    "segments": None}
    seg = json.loads(p.encode(MESSAGES[3]))["items"][0]["segments"]
    assert seg["mode"] == "fixed" and seg["window_s"] == 2.0 and seg["hop_s"] == 0.5


def _line(**obj: Any) -> str:
    return json.dumps(obj)


INFER = {"op": "infer", "batch": "b1", "granularity": "utterance",
         "items": [{"job": "j", "key": "k", "audio": "/a.npy", "embedding": None}]}
RESULT = {"event": "result", "batch": "b1", "seconds": 0.1,
          "results": [{"job": "j", "result": {"key": "k"}}]}

MALFORMED: list[tuple[str, str | bytes, str]] = [
    ("not json", "hello there", "not JSON"),
    ("truncated json", '{"event": "hello", "pid"', "not JSON"),
    ("not utf-8", b'{"event": "hello\xff"}', "not JSON"),
    ("an array", "[1, 2]", "expected a JSON object, got an array"),
    ("a number", "42", "expected a JSON object, got an integer"),
    ("no tag", _line(pid=1), "neither 'op' nor 'event'"),
    ("both tags", _line(op="exit", event="hello"), "both 'op' and 'event'"),
    ("unknown event", _line(event="telemetry", done=3), "unknown event 'telemetry'"),
    ("unknown op", _line(op="reboot"), "unknown op 'reboot'"),
    ("tag not a string", _line(event=3), "unknown event 3"),
    ("missing field", _line(event="hello"), "hello: missing field 'pid'"),
    ("wrong type", _line(event="hello", pid="12"), "hello.pid: expected an integer, got a string"),
    ("bool is no integer", _line(event="hello", pid=True), "hello.pid: expected an integer"),
    ("unknown field", _line(event="unloaded", extra=1), r"unloaded: unknown field\(s\) 'extra'"),
    ("null string", _line(event="load_failed", code=None, message="x"),
     "load_failed.code: expected a string, got null"),
    ("timing not a number", _line(event="loaded", seconds=1, device="cpu", dtype="float32",
                                  timings={"weights_s": "slow"}),
     "loaded.timings.weights_s: expected a number"),
    ("bad granularity", json.dumps({**INFER, "granularity": "word"}),
     "infer: granularity must be one of utterance, frame, got 'word'"),
    ("items not an array", json.dumps({**INFER, "items": {"job": "j"}}),
     "infer.items: expected an array, got an object"),
    ("item not an object", json.dumps({**INFER, "items": ["/a.npy"]}),
     r"infer.items\[0\]: expected a JSON object, got a string"),
    ("item missing audio", json.dumps({**INFER, "items": [{"job": "j", "key": "k"}]}),
     r"infer.items\[0\]: missing field 'audio'"),
    ("batch_audio_s not a number", json.dumps({**INFER, "batch_audio_s": "60"}),
     "infer.batch_audio_s: expected a number"),
    ("result without outcome", json.dumps({**RESULT, "results": [{"job": "j"}]}),
     r"result.results\[0\]: needs exactly one of 'result' and 'error'"),
    ("result with both", json.dumps({**RESULT, "results": [
        {"job": "j", "result": {}, "error": {"code": "x", "message": "y"}}]}),
     "needs exactly one of 'result' and 'error'"),
    ("result not an object", json.dumps({**RESULT, "results": [{"job": "j", "result": [1]}]}),
     r"result.results\[0\].result: expected an object or null, got an array"),
    ("error missing message", json.dumps({**RESULT, "results": [
        {"job": "j", "error": {"code": "x"}}]}),
     r"result.results\[0\].error: missing field 'message'"),
    ("seconds missing", json.dumps({k: v for k, v in RESULT.items() if k != "seconds"}),
     "result: missing field 'seconds'"),
]


@pytest.mark.parametrize(("line", "why"), [(m[1], m[2]) for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_lines_raise_one_protocol_error_saying_why(line: str | bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        p.decode(line)


def test_protocol_error_is_an_internal_error_with_its_own_code() -> None:
    assert issubclass(ProtocolError, errors.InternalError)
    assert type(errors.from_code("protocol_error", "x")) is ProtocolError


def test_granularities_are_defined_once() -> None:
    assert api.GRANULARITIES is p.GRANULARITIES == ("utterance", "frame")
    assert p.as_granularity("frame") == "frame"
    with pytest.raises(ProtocolError):
        p.as_granularity("word")


# -- each side handles a malformed line in one place -------------------------------------------
BREAKS_PROTOCOL = (
    "import os, sys, time\n"
    "from ondemand import protocol\n"
    "sys.stdout.write(protocol.encode(protocol.Hello(pid=os.getpid())))\n"
    "sys.stdout.write('{\"event\": \"telemetry\", \"done\": 3}\\n')\n"
    "sys.stdout.flush()\n"
    "time.sleep(60)\n"
)


def test_the_daemon_kills_a_worker_that_breaks_the_protocol() -> None:
    async def main() -> None:
        events: list[p.Event] = []
        exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        spawn = make_spawn([sys.executable, "-c", BREAKS_PROTOCOL])
        proc = WorkerProcess(await spawn(), on_event=lambda _, ev: events.append(ev),
                             on_exit=lambda _, rc: exited.set_result(rc))
        rc = await asyncio.wait_for(exited, 20)
        kind, detail = proc.classify(rc)
        assert kind is ExitKind.PROTOCOL_ERROR, (kind, detail)
        assert "unknown event 'telemetry'" in detail and "SIGKILL" in detail
        assert events == [p.Hello(pid=proc.pid)]  # the good line before it got through
        proc.close()

    asyncio.run(main())


def test_the_worker_ignores_a_malformed_op_and_keeps_serving() -> None:
    fake = Path(__file__).with_name("fake_worker.py")
    ops = "not json\n" + json.dumps({"op": "reboot"}) + "\n" + p.encode(p.Unload()) + p.encode(
        p.Exit())
    done = subprocess.run([sys.executable, str(fake)], input=ops, capture_output=True, text=True,
                          timeout=30, check=False)
    hello, *rest = [p.decode_event(line) for line in done.stdout.splitlines()]
    assert isinstance(hello, p.Hello) and rest == [p.Unloaded()] and done.returncode == 0
    warnings = [x for x in done.stderr.splitlines() if "not the protocol" in x]
    assert len(warnings) == 2 and all(f"pid={hello.pid}" in w for w in warnings)
    assert "not JSON" in warnings[0] and "unknown op 'reboot'" in warnings[1]
