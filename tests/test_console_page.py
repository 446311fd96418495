"""The web console in a real browser: Debian's Chromium driven by Playwright, against the real
front end (fake worker; the real worker on the golden tiny model for the numbers).  Screenshots of
the main view go to tests/artifacts/."""

from __future__ import annotations

import io
import json
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf

from tests import golden
from tests.conftest import daemon_config, fake_env, wav_bytes
from tests.console_browser import ARTIFACTS, CHROMIUM_ARGS, ServedDaemon, find_chromium

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright
except ImportError:
    pytest.skip("playwright is not installed: pip install -e '.[dev]' (README, Tests)",
                allow_module_level=True)

CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium found: `apt-get install chromium` (Debian) or set "
                "PLAYWRIGHT_CHROMIUM=/path/to/chromium; .ci/run installs it",
                allow_module_level=True)

TOKEN = "page-token-0123456789abcdef"
GOLDEN_CLIP = "mid_16k.wav"


def score_id(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.split("/")[-1].lower()).strip("-")


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What Chromium's fake microphone plays: 3 s of a voiced, syllable-like tone at 48 kHz."""
    rate = 48000
    t = np.arange(3 * rate) / rate
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180, 360, 540, 720), 1))
    x = 0.25 * voice * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) / 2
    path = tmp_path_factory.mktemp("mic") / "voice.wav"
    sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(mic_wav: Path) -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={mic_wav}"])
        yield b
        b.close()


@dataclass
class Watched:
    page: Page
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # page errors, CSP violations

    def other_hosts(self, base: str) -> set[str]:
        ours = urlsplit(base).netloc
        return {urlsplit(r.url).netloc for r in self.requests
                if not r.url.startswith(("blob:", "data:"))} - {ours}


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Watched]]:
    contexts = []

    def open_(url: str, *, width: int = 1280, height: int = 900) -> Watched:
        ctx = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(ctx)
        page = ctx.new_page()
        w = Watched(page)

        def console(m: ConsoleMessage) -> None:
            # A refused request is logged by Chromium itself; the page shows what it means.
            if m.type == "error" and "Failed to load resource" not in m.text:
                w.problems.append(m.text)

        page.on("request", lambda r: w.requests.append(r))
        page.on("console", console)
        page.on("pageerror", lambda e: w.problems.append(str(e)))
        page.goto(url)
        return w

    yield open_
    for ctx in contexts:
        ctx.close()


def test_golden_clip_shows_the_api_numbers_and_talks_to_no_other_host(
    tmp_path: Path, open_page: Callable[..., Watched]
) -> None:
    cfg = daemon_config(tmp_path, model={"path": str(golden.MODEL)},
                        worker={"device": "cpu", "load_timeout_s": 90.0},
                        audio={"max_seconds": 30.0})
    with ServedDaemon(cfg, worker_cmd=[sys.executable, "-m", "ondemand.worker"],
                      env=fake_env()) as s:
        w = open_page(s.url + "/")
        page = w.page
        state = page.get_by_test_id("worker-state")
        expect(state).to_have_attribute("data-state", "cold")
        page.locator("#opt-embedding").check()
        page.get_by_test_id("upload-input").set_input_files(str(golden.AUDIO / GOLDEN_CLIP))
        card = page.get_by_test_id("result").first
        expect(card.get_by_test_id("job-status")).to_have_text("done", timeout=120_000)
        job_id = card.get_attribute("data-job")
        assert job_id
        job: dict[str, Any] = s.call(s.d.job(job_id))
        res = job["result"]
        assert len(res["labels"]) == 9
        for label, score in zip(res["labels"], res["scores"], strict=True):
            shown = card.get_by_test_id(f"score-{score_id(label)}")
            assert float(shown.get_attribute("data-value") or "nan") == score, label
        exp = golden.expected()["clips"][GOLDEN_CLIP]
        np.testing.assert_allclose(res["scores"], exp["scores"], atol=1e-5)
        expect(card.get_by_test_id("top-label")).to_have_text(res["top"]["label"].split("/")[-1])
        expect(card.get_by_test_id("top-label")).to_have_attribute("data-label", exp["top"])
        expect(card.get_by_test_id("timeline")).to_be_visible()
        expect(card.locator("audio")).to_have_attribute("src", re.compile(r"^blob:"))
        # the result JSON and the embedding, downloaded through the API with the page's fetch
        with page.expect_download() as dl:
            card.get_by_role("button", name="Download result JSON").click()
        assert json.loads(Path(dl.value.path()).read_text()) == job
        with page.expect_download() as dl:
            card.get_by_role("button", name="Download embedding .npy").click()
        np.testing.assert_allclose(np.load(dl.value.path()),
                                   golden.expected_feats(exp["key"], "utterance"), atol=1e-4)
        # the other panels followed
        expect(state).to_have_attribute("data-state", "ready")
        expect(page.locator("#history")).to_contain_text("ready")
        row = page.get_by_test_id("jobs-table").locator(f'tr[data-job="{job_id}"]')
        expect(row).to_contain_text("done")
        expect(row).to_contain_text(res["top"]["label"].split("/")[-1])
        expect(page.get_by_test_id("cost-chart").locator("canvas")).to_have_count(1)
        expect(page.locator("#cost-summary")).to_contain_text("cold start")
        expect(page.locator("#conn")).to_have_attribute("data-conn", "live")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-desktop.png"), full_page=True)
        page.set_viewport_size({"width": 360, "height": 800})
        expect(card.get_by_test_id("top-label")).to_be_visible()
        # readable at 360 px: nothing wider than the screen (wide tables scroll in their box)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        page.screenshot(path=str(ARTIFACTS / "console-360.png"), full_page=True)
        print(f"screenshots: {ARTIFACTS}/console-desktop.png, console-360.png")
        assert w.other_hosts(s.url) == set()
        assert w.problems == []


SPY = """
window.__constraints = [];
window.__uploads = [];
const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => { window.__constraints.push(c); return gum(c); };
const append = FormData.prototype.append;
FormData.prototype.append = function (name, value, filename) {
  if (name === "audio") window.__uploads.push(value);
  return append.apply(this, arguments);
};
"""
UPLOADED = "async () => Array.from(new Uint8Array(await window.__uploads[0].arrayBuffer()))"


def test_record_from_the_fake_microphone_sends_16k_mono_wav(
    tmp_path: Path, open_page: Callable[..., Watched]
) -> None:
    with ServedDaemon(daemon_config(tmp_path)) as s:
        w = open_page(s.url + "/")
        page = w.page
        page.add_init_script(SPY)
        page.reload()
        expect(page.get_by_test_id("worker-state")).to_have_attribute("data-state", "cold")
        record = page.get_by_test_id("record")
        record.click()
        expect(record).to_have_attribute("aria-pressed", "true")
        # the level moves with the microphone and the length counts up
        # (expect, not wait_for_function: the page's CSP rightly forbids evaluating strings)
        expect(page.locator("#level")).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d+$"))
        at_least_1_2_s = re.compile(r"^(1\.[2-9]|[2-9]\.\d|\d\d+\.\d) s$")
        expect(page.locator("#rec-time")).to_have_text(at_least_1_2_s)
        with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")):
            record.click()  # one click: stop and send
        wav = bytes(page.evaluate(UPLOADED))
        assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
        fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", wav[20:36])
        assert (fmt, channels, rate, bits) == (1, 1, 16000, 16)  # PCM16 mono 16 kHz
        samples, _ = sf.read(io.BytesIO(wav), dtype="float32")
        assert len(samples) >= 1.2 * 16000 and np.sqrt(np.mean(samples**2)) > 0.01
        card = page.get_by_test_id("result").first
        expect(card.get_by_test_id("job-status")).to_have_text("done")
        job = s.call(s.d.job(card.get_attribute("data-job") or ""))
        assert job["status"] == "done" and job["result"]["duration_s"] >= 1.0
        expect(card.get_by_test_id("top-label")).to_have_text(job["result"]["top"]["label"])
        constraints = page.evaluate("window.__constraints")
        assert constraints == [{"audio": {"echoCancellation": False, "noiseSuppression": False,
                                          "autoGainControl": False}}]
        expect(record).to_have_attribute("aria-pressed", "false")
        assert w.problems == []


def test_worker_panel_follows_the_worker_through_buttons_and_timeouts(
    tmp_path: Path, open_page: Callable[..., Watched]
) -> None:
    cfg = daemon_config(tmp_path, worker={"unload_after_s": 1.0, "exit_after_s": 3.0})
    with ServedDaemon(cfg, env=fake_env(load_s="1.5")) as s:
        page = open_page(s.url + "/").page
        state = page.get_by_test_id("worker-state")
        why = page.locator("#worker-why")
        expect(state).to_have_attribute("data-state", "cold")
        expect(state).to_have_text("cold")
        page.get_by_test_id("load-button").click()
        expect(state).to_have_attribute("data-state", "loading")
        expect(state).to_have_attribute("data-state", "ready", timeout=10_000)
        expect(why).to_contain_text("unloads in")
        expect(page.locator("#last-load")).to_contain_text("new process")
        # the idle ladder, with nobody touching anything
        expect(state).to_have_attribute("data-state", "unloaded", timeout=10_000)
        expect(why).to_contain_text("exits in")
        expect(state).to_have_attribute("data-state", "cold", timeout=10_000)
        expect(page.locator("#history")).to_contain_text("stopping → cold")
        # a hold, then the buttons
        page.get_by_test_id("hold-input").fill("1h")
        page.get_by_test_id("load-button").click()
        expect(state).to_have_attribute("data-state", "ready", timeout=10_000)
        expect(why).to_contain_text("hold by manual")
        page.get_by_test_id("unload-button").click()
        expect(state).to_have_attribute("data-state", "unloaded")
        page.get_by_test_id("exit-button").click()
        expect(state).to_have_attribute("data-state", "cold")
        assert s.state() == "cold"
        reasons = [e.reason for e in s.d.events if getattr(e, "new", None) == "stopping"]
        assert reasons == ["idle_exit", "unload_exit"]
        # a hold the page cannot read is refused there, with what to write
        page.get_by_test_id("hold-input").fill("soon")
        page.get_by_test_id("load-button").click()
        expect(page.locator("#worker-msg")).to_contain_text("30m")
        assert s.state() == "cold"


def test_token_is_asked_once_kept_for_the_tab_and_never_put_in_a_url(
    tmp_path: Path, open_page: Callable[..., Watched]
) -> None:
    with ServedDaemon(daemon_config(tmp_path, server={"token": TOKEN})) as s:
        w = open_page(s.url + "/")
        page = w.page
        token_input = page.get_by_test_id("token-input")
        state = page.get_by_test_id("worker-state")
        expect(token_input).to_be_visible()
        # nothing of the data until the token is given
        expect(state).to_be_hidden()
        expect(page.get_by_test_id("jobs-table")).to_be_hidden()
        assert state.get_attribute("data-state") == ""
        token_input.fill("wrong-token")
        token_input.press("Enter")
        expect(page.locator("#auth-error")).to_contain_text("refused")
        token_input.fill(TOKEN)
        page.get_by_role("button", name="Unlock").click()
        expect(state).to_have_attribute("data-state", "cold")
        expect(page.locator("#conn")).to_have_attribute("data-conn", "live")
        expect(page.get_by_test_id("jobs-table")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('ondemand.token')") == TOKEN
        page.reload()  # same tab: no second prompt
        expect(state).to_have_attribute("data-state", "cold")
        expect(token_input).to_be_hidden()
        assert all(TOKEN not in r.url for r in w.requests)
        sent = {urlsplit(r.url).path for r in w.requests
                if r.all_headers().get("authorization") == f"Bearer {TOKEN}"}
        assert {"/v1/status", "/v1/events", "/v1/jobs", "/v1/cost"} <= sent
        # another tab (a new browsing session) asks again
        other = open_page(s.url + "/").page
        expect(other.get_by_test_id("token-input")).to_be_visible()
        assert w.problems == []


def test_refused_file_full_queue_and_cancel_say_what_happened(
    tmp_path: Path, open_page: Callable[..., Watched]
) -> None:
    bad = tmp_path / "notes.wav"
    bad.write_text("these are meeting notes, not audio")
    clips = []
    for i in range(2):
        clips.append(tmp_path / f"clip{i}.wav")
        clips[-1].write_bytes(wav_bytes(0.5 + i / 10))
    cfg = daemon_config(tmp_path / "var", queue={"max_pending": 1},
                        worker={"load_timeout_s": 120.0})
    with ServedDaemon(cfg, env=fake_env(load_s="60")) as s:  # the job stays queued
        w = open_page(s.url + "/")
        page = w.page
        expect(page.get_by_test_id("worker-state")).to_have_attribute("data-state", "cold")
        page.get_by_test_id("upload-input").set_input_files([str(clips[0]), str(bad)])
        cards = page.get_by_test_id("result")
        expect(cards).to_have_count(2)
        expect(cards.first).to_contain_text("notes.wav")  # newest first
        refused = cards.filter(has_text="notes.wav")
        queued = cards.filter(has_text="clip0.wav")
        expect(refused.get_by_test_id("job-status")).to_have_text("failed")
        expect(refused).to_contain_text("Refused: Could not decode the audio")
        expect(refused).to_contain_text("convert it to WAV or FLAC")
        expect(queued.get_by_test_id("job-status")).to_have_text("queued")
        expect(queued).to_contain_text("Next in the queue")
        # a full queue: nothing queued, when to try again, and a button for it
        page.get_by_test_id("upload-input").set_input_files(str(clips[1]))
        full = cards.filter(has_text="clip1.wav")
        expect(full.get_by_test_id("job-status")).to_have_text("failed")
        expect(full).to_contain_text("Nothing was queued: the queue is full")
        expect(full).to_contain_text("Try again in 5 s")
        queued.get_by_role("button", name="Cancel").click()
        expect(queued.get_by_test_id("job-status")).to_have_text("cancelled")
        full.get_by_role("button", name="Try again").click()
        expect(full.get_by_test_id("job-status")).to_have_text("queued")
        listing = s.call(s.d.job(full.get_attribute("data-job") or ""))
        assert listing["status"] == "queued"
        assert w.problems == []


def test_timeline_draws_segment_results_as_emotion_over_time(
    tmp_path: Path, open_page: Callable[..., Watched]
) -> None:
    with ServedDaemon(daemon_config(tmp_path), env=fake_env(segments="3")) as s:
        clip = tmp_path / "long.wav"
        clip.write_bytes(wav_bytes(3.0))
        w = open_page(s.url + "/", width=800)
        page = w.page
        page.get_by_test_id("upload-input").set_input_files(str(clip))
        card = page.get_by_test_id("result").first
        expect(card.get_by_test_id("job-status")).to_have_text("done")
        timeline = card.get_by_test_id("timeline")
        expect(timeline).to_have_attribute("data-segments", "3")
        expect(timeline.locator(".seg")).to_have_text(["angry", "happy", "neutral"])
        expect(timeline.locator("canvas")).to_have_count(1)  # the scores over time
        expect(timeline).to_contain_text("3.0 s")
        assert w.problems == []
