// GET /v1/events (Server-Sent Events) read with fetch(), because EventSource cannot send an
// Authorization header and the token must never go into a URL.  Resumes with Last-Event-ID,
// reconnects with backoff, and treats a stream silent for 2.5 heartbeats as dead.

import { authHeaders } from "./api.js";

export class EventStream {
  // handlers: onEvent(name, data, id), onState("live" | "reconnecting" | "locked"), onUnauthorized()
  constructor(url, handlers) {
    this.url = url;
    this.h = handlers;
    this.lastId = null;
    this.retryMs = 3000;
    this.heartbeatMs = 15000;
    this.failures = 0;
    this.stopped = false;
    this.ctrl = null;
  }

  start() {
    this.stopped = false;
    this.loop();
  }

  stop() {
    this.stopped = true;
    if (this.ctrl) this.ctrl.abort();
  }

  async loop() {
    while (!this.stopped) {
      let opened = false;
      try {
        opened = await this.once();
      } catch (e) {
        if (e && e.status === 401) {
          this.h.onState("locked");
          this.h.onUnauthorized();
          return;
        }
      }
      if (this.stopped) return;
      this.h.onState("reconnecting");
      this.failures = opened ? 0 : this.failures + 1;
      // Server-suggested delay after a clean end; exponential (capped 5 s) while failing.
      const wait = opened ? Math.min(this.retryMs, 1000) : Math.min(5000, 250 * 2 ** this.failures);
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  // One connection; true when it was established (so the next try is not a backoff).
  async once() {
    this.ctrl = new AbortController();
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (this.lastId !== null) headers.set("Last-Event-ID", this.lastId);
    const r = await fetch(this.url, { headers, signal: this.ctrl.signal, cache: "no-store" });
    if (r.status === 401) throw Object.assign(new Error("unauthorized"), { status: 401 });
    if (!r.ok || !r.body) return false;
    this.h.onState("live");
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let watchdog = null;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => this.ctrl.abort(), this.heartbeatMs * 2.5);
    };
    try {
      arm();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        buf += value;
        let cut;
        while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
          this.dispatch(block);
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") throw e;
    } finally {
      clearTimeout(watchdog);
    }
    return true;
  }

  dispatch(block) {
    let name = "message", id = null;
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue; // comment: heartbeat
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
      else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    }
    if (id !== null) this.lastId = id;
    if (!data.length) return;
    let payload;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch {
      return;
    }
    if (name === "hello" && payload.heartbeat_s) this.heartbeatMs = payload.heartbeat_s * 1000;
    this.h.onEvent(name, payload, id);
  }
}
