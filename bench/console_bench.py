"""Console benchmark: page weight of a first visit, navigation -> interactive, and the delay from
a worker state change (server clock) to the page showing it, against an `ondemand serve`
subprocess on loopback with the fake worker, driven by the distribution's Chromium.

    .venv/bin/python bench/console_bench.py [--visits 10] [--cycles 10] [--out FILE.json]

Page weight: every response of a first visit (fresh browser context, empty cache), compressed
bytes on the wire as Chromium reports them (body + headers), the event stream excepted (it never
ends).  Interactive: the page's `console-interactive`
performance mark (status rendered, controls live), relative to navigation start.  State delay:
each `worker-state` mark the page sets in the frame after it drew a `state` event, against the
server's time of the change (`StateChanged.time`); same machine, same clock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import harness  # bench/harness.py  # noqa: E402

from tests.console_browser import CHROMIUM_ARGS, find_chromium  # noqa: E402

WAIT_MARK = """() => new Promise((resolve) => {
  const look = () => {
    const m = performance.getEntriesByName("console-interactive")[0];
    if (m) resolve(m.startTime); else setTimeout(look, 5);
  };
  look();
})"""
STATE_MARKS = """() => performance.getEntriesByName("worker-state").map((m) => ({
  state: m.detail.state, shownMs: performance.timeOrigin + m.startTime,
  serverMs: m.detail.serverTime * 1000 }))"""


def start_serve(storage: Path) -> tuple[subprocess.Popen[str], str]:
    config = storage / "config.toml"
    config.write_text(
        "[server]\nport = 0\n"
        f'[storage]\ndir = "{storage}"\n'
        "[worker]\nunload_after_s = -1.0\nexit_after_s = -1.0\nstandby = false\n"
        f'command = "{sys.executable} {ROOT / "tests" / "fake_worker.py"}"\n')
    env = {**os.environ, "FAKE_LOAD_S": "0.2", "PYTHONPATH": str(ROOT)}
    return harness.start_serve(config, env)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def state_of(base: str) -> str:
    with urllib.request.urlopen(base + "/v1/status", timeout=10) as r:
        return str(json.loads(r.read())["worker"]["state"])


def wait_state(base: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while state_of(base) != state:
        if time.monotonic() > deadline:
            raise SystemExit(f"worker never reached {state}")
        time.sleep(0.02)


def q(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def first_visit(browser: Any, base: str) -> dict[str, Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r))
    page.goto(base + "/")
    interactive_ms = page.evaluate(WAIT_MARK)
    # every first-visit request answered (the event stream stays open: no "network idle")
    page.locator("#cost-chart canvas").wait_for()
    page.locator("#jobs-empty").wait_for()
    page.wait_for_timeout(300)
    nav = page.evaluate("""() => { const n = performance.getEntriesByType("navigation")[0];
        return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd}; }""")
    static = api = 0
    for r in responses:
        path = r.url.split("://", 1)[1].split("/", 1)[1] if "://" in r.url else r.url
        if path.startswith("v1/events"):
            continue  # never finishes: sizes() would wait for its end
        sizes = r.request.sizes()
        wire = sizes["responseBodySize"] + sizes["responseHeadersSize"]
        if path.startswith("v1/"):
            api += wire
        else:
            static += wire
    ctx.close()
    return {"interactive_ms": interactive_ms, "dcl_ms": nav["dcl"], "load_ms": nav["load"],
            "static_bytes": static, "api_bytes": api,
            "requests": len(responses)}


def state_delays(browser: Any, base: str, cycles: int) -> list[dict[str, Any]]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(base + "/")
    page.evaluate(WAIT_MARK)
    page.locator('#conn[data-conn="live"]').wait_for()
    for _ in range(cycles):
        post(base + "/v1/worker/load", {"wait": True})
        post(base + "/v1/worker/unload", {"exit": True})
        wait_state(base, "cold")
        time.sleep(0.3)  # let the last change reach the page before the next cycle
    marks: list[dict[str, Any]] = page.evaluate(STATE_MARKS)
    ctx.close()
    return [{"state": m["state"], "delay_ms": m["shownMs"] - m["serverMs"]} for m in marks]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--visits", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "console.json")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium: apt-get install chromium (or set PLAYWRIGHT_CHROMIUM)")
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_serve(Path(tmp))
        rss_idle = psutil.Process(proc.pid).memory_info().rss / 2**20
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                visits = [first_visit(browser, base) for _ in range(args.visits)]
                delays = state_delays(browser, base, args.cycles)
                browser.close()
            rss_after = psutil.Process(proc.pid).memory_info().rss / 2**20
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    inter = [v["interactive_ms"] for v in visits]
    ds = [d["delay_ms"] for d in delays]
    result = {
        "chromium": subprocess.run([chromium, "--version"], capture_output=True,
                                   text=True).stdout.strip(),
        "page_weight_bytes": {"static": visits[0]["static_bytes"], "api": visits[0]["api_bytes"],
                              "total": visits[0]["static_bytes"] + visits[0]["api_bytes"],
                              "requests": visits[0]["requests"]},
        "interactive_ms": {"median": statistics.median(inter), "p90": q(inter, 90),
                           "min": min(inter), "max": max(inter), "runs": len(inter)},
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2),
                            "cpus": os.cpu_count()},
        "dom_content_loaded_ms_median": statistics.median(v["dcl_ms"] for v in visits),
        "state_delay_ms": {"median": statistics.median(ds), "p95": q(ds, 95), "max": max(ds),
                           "changes": len(ds)},
        "front_end_rss_mb": {"idle": round(rss_idle, 1), "after_visits": round(rss_after, 1)},
        "visits": visits,
        "delays": delays,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    w = result["page_weight_bytes"]
    print(f"page weight, first visit: {w['total'] / 1024:.1f} KiB "
          f"(static {w['static'] / 1024:.1f} KiB + API {w['api'] / 1024:.1f} KiB, "
          f"{w['requests']} requests)  target < 300 KB")
    i = result["interactive_ms"]
    print(f"navigation -> interactive: median {i['median']:.0f} ms, p90 {i['p90']:.0f} ms, "
          f"min {i['min']:.0f} ms, max {i['max']:.0f} ms over {i['runs']} fresh visits  "
          "target < 300 ms")
    d = result["state_delay_ms"]
    print(f"state change -> shown: median {d['median']:.1f} ms, p95 {d['p95']:.1f} ms, "
          f"max {d['max']:.1f} ms over {d['changes']} changes  target < 200 ms")
    r = result["front_end_rss_mb"]
    print(f"front-end RSS: idle {r['idle']} MB, after the visits {r['after_visits']} MB")
    la = result["load_average_1m"]
    print(f"machine load (1 min average): {la['start']} -> {la['end']} on {la['cpus']} CPUs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
