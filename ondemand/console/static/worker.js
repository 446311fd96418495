// Worker, live: state (from `state` events the moment they happen), why it is warm, countdowns,
// the last load's breakdown, GPU memory and the queue (from `worker` / `queue` snapshots), and the
// load / unload / exit buttons.  Countdowns tick locally from the last snapshot: no polling.

import { api, explain } from "./api.js";
import { $, clock, h, parseDuration, replace, say, seconds } from "./ui.js";

const HISTORY = 8;
const MARKS_MAX = 200;
const NAMES = {
  interpreter_s: "new interpreter", worker_s: "in the worker", import_s: "imports",
  resolve_s: "resolve model", weights_s: "weights", to_device_s: "to device", warmup_s: "warm-up",
};

export class WorkerPanel {
  constructor() {
    this.snap = null;
    this.at = 0; // performance.now() when the snapshot arrived
    this.queue = null;
    this.history = [];
    this.marks = 0;
    this.live = false; // set while the event stream is connected
    this.pill = $("#worker-state");
    $("#load-button").addEventListener("click", () => this.act("load"));
    $("#unload-button").addEventListener("click", () => this.act("unload"));
    $("#exit-button").addEventListener("click", () => this.act("exit"));
    setInterval(() => { if (this.counting()) this.render(); }, 1000);
  }

  // -- inputs ----------------------------------------------------------------------------------
  applyState(ev) {
    this.history.unshift(ev);
    this.history.length = Math.min(this.history.length, HISTORY);
    if (this.snap) this.snap = { ...this.snap, state: ev.new, pid: ev.pid };
    this.setPill(ev.new);
    this.renderHistory();
    // For the benchmark (bench/console_bench.py): when the change became visible, against the
    // server's time of the change.
    requestAnimationFrame(() => {
      if (++this.marks > MARKS_MAX) { performance.clearMarks("worker-state"); this.marks = 1; }
      performance.mark("worker-state", { detail: { state: ev.new, serverTime: ev.time } });
    });
  }

  // A snapshot from a request's answer may be older than the last `state` event (the two travel
  // on different connections): while the stream is live it only refreshes the same state.
  applySnapshot(worker, fromStream = true) {
    if (!fromStream && this.live && this.snap && worker.state !== this.snap.state) return;
    this.snap = worker;
    this.at = performance.now();
    this.render();
  }

  applyQueue(q) {
    this.queue = q;
    this.render();
  }

  // -- actions ---------------------------------------------------------------------------------
  async act(what) {
    const msg = $("#worker-msg");
    say(msg, "");
    let hold = 0;
    if (what === "load") {
      hold = parseDuration($("#hold-input").value);
      if (hold === null) return say(msg, "Hold: write a duration such as 90s, 30m, 2h or 1h30m (or leave it empty).");
    }
    const button = $(`#${what}-button`);
    button.disabled = true;
    try {
      const snap = what === "load" ? await api.load(hold) : await api.unload(what === "exit");
      this.applySnapshot(snap, false);
    } catch (e) {
      say(msg, explain(e));
    } finally {
      button.disabled = false;
    }
  }

  // -- rendering -------------------------------------------------------------------------------
  setPill(state) {
    this.pill.textContent = state;
    this.pill.dataset.state = state;
  }

  left(value) {
    if (value === null || value === undefined) return null;
    return Math.max(0, value - (performance.now() - this.at) / 1000);
  }

  counting() {
    const w = this.snap;
    return w && (w.unload_in_s != null || w.exit_in_s != null || w.hold_s != null || w.backoff_s != null);
  }

  why(w) {
    const by = w.trigger ? ` (for ${w.trigger})` : "";
    const unload = this.left(w.unload_in_s), exit = this.left(w.exit_in_s), hold = this.left(w.hold_s);
    const ladder = [unload != null ? `unloads in ${seconds(unload, 0)}` : null,
      exit != null ? `exits in ${seconds(exit, 0)}` : null].filter(Boolean).join(", ");
    switch (w.state) {
      case "cold": return "No worker process: nothing held on the GPU. The next job, a schedule or Load starts one.";
      case "starting": return `Starting a fresh worker process${by}.`;
      case "loading": return `Loading the model${by}.`;
      case "ready":
        if (w.warm_because === "in_flight") return "Warm because jobs are running.";
        if (w.warm_because === "hold") return `Warm because of a hold by ${w.hold_trigger}: ${seconds(hold, 0)} left${ladder ? `, then ${ladder}` : ""}.`;
        return ladder ? `Warm and idle: ${ladder}.` : "Warm and idle: no idle timeout (kept until unloaded).";
      case "unloading": return "Dropping the model; the process stays for a fast reload.";
      case "unloaded": return `Process alive without the model (its GPU context stays for a fast reload)${ladder ? `; ${ladder}` : ""}.`;
      case "stopping": return "Stopping the worker process (and waiting for its GPU memory to come back).";
      case "backoff": {
        const err = w.last_error ? ` Last error: ${w.last_error.code}: ${w.last_error.message}` : "";
        return `Loading failed ${w.load_failures} times in a row; loads are refused for ${seconds(this.left(w.backoff_s), 0)}.${err}`;
      }
      default: return "";
    }
  }

  render() {
    const w = this.snap;
    if (!w) return;
    this.setPill(w.state);
    $("#worker-why").textContent = this.why(w);
    const facts = [];
    const add = (k, v) => facts.push(h("dt", {}, k), h("dd", {}, v));
    if (w.unload_in_s != null) add("Unload in", seconds(this.left(w.unload_in_s), 0));
    if (w.exit_in_s != null) add("Exit in", seconds(this.left(w.exit_in_s), 0));
    if (w.hold_s != null) add("Hold", `${seconds(this.left(w.hold_s), 0)} (${w.hold_trigger})`);
    add("In flight", String(w.in_flight));
    if (this.queue) add("Queue", `${this.queue.queued} queued · ${this.queue.running} running · at most ${this.queue.max_pending}`);
    add("GPU memory", w.gpu_memory_mb == null ? (w.pid ? "not measured here (no NVML)" : "none held") : `${w.gpu_memory_mb.toFixed(0)} MiB`);
    add("Process", w.pid ? `pid ${w.pid} · ${w.device} · ${w.dtype}` : `none · ${w.device} · ${w.dtype}`);
    add("Model", w.model);
    add("Loads · processes", `${w.loads} · ${w.spawns}`);
    replace($("#worker-facts"), facts);
    this.renderLoad(w.last_load);
  }

  renderLoad(load) {
    const box = $("#last-load");
    if (!load) return replace(box, h("dt", {}, "None yet"), h("dd", {}, "the model has not been loaded since the daemon started"));
    const rows = [h("dt", {}, "Total"), h("dd", {}, `${seconds(load.seconds, 2)} · ${load.fresh_process ? "new process" : "reload in the same process"} · ${load.trigger}`)];
    for (const [k, v] of Object.entries(load)) {
      if (!k.endsWith("_s") || typeof v !== "number" || (k === "interpreter_s" && !load.fresh_process)) continue;
      rows.push(h("dt", {}, NAMES[k] || k.replace(/_s$/, "").replace(/_/g, " ")), h("dd", {}, seconds(v, 2)));
    }
    replace(box, rows);
  }

  renderHistory() {
    replace($("#history"), this.history.map((e) => h("li", {},
      h("time", {}, clock(e.time)), ` ${e.old} → `, h("strong", {}, e.new),
      ` · ${e.reason}${e.trigger ? ` · ${e.trigger}` : ""}`)));
  }
}
