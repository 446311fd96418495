// Analyse: files and recordings become jobs; one result card per job, newest first.
// A card follows its job through the event stream (queued -> running -> done/failed/cancelled);
// queue positions are re-read (GET /v1/jobs?status=queued) when other jobs move.

import { api, ApiError, explain } from "./api.js";
import { Recorder, serverReads, toWav16k } from "./audio.js";
import { timeline } from "./timeline.js";
import { $, debounce, download, emotionColor, h, pct, replace, say, seconds, splitLabel } from "./ui.js";

const FINAL = new Set(["done", "failed", "cancelled"]);
const stem = (name) => name.replace(/\.[^.]+$/, "") || "clip";
const sentence = (s) => (s ? s[0].toUpperCase() + s.slice(1) : s);

class Card {
  constructor(name, audioUrl, options) {
    this.name = name;
    this.id = null;
    this.status = "uploading";
    this.options = options;
    this.statusEl = h("span", { class: "badge", dataset: { testid: "job-status", status: "uploading" } }, "uploading");
    this.progressEl = h("p", { class: "progress", "aria-live": "polite" });
    this.msgEl = h("p", { class: "error", role: "alert", hidden: true });
    this.actions = h("div", { class: "actions" });
    this.body = h("div", { class: "body" });
    this.audio = audioUrl ? h("audio", { controls: true, preload: "metadata", src: audioUrl, "aria-label": `Play ${name}` }) : null;
    this.el = h("li", { class: "card", dataset: { testid: "result" } },
      h("div", { class: "card-head" }, h("h3", { class: "clip" }, name), this.statusEl),
      this.progressEl, this.msgEl, this.body, this.audio, this.actions);
  }

  setStatus(status, progress = "") {
    this.status = status;
    this.statusEl.textContent = status;
    this.statusEl.dataset.status = status;
    this.el.dataset.status = status;
    say(this.progressEl, progress);
    if (FINAL.has(status)) replace(this.actions);
  }

  queued(position, eta) {
    const where = position === 0 ? "Next in the queue" : `Position ${position + 1} in the queue`;
    const about = Number.isFinite(eta) ? ` · about ${seconds(eta)}` : "";
    this.setStatus("queued", `${where}${about}`);
  }

  fail(message, retry = null) {
    this.setStatus("failed");
    say(this.msgEl, message);
    if (retry) replace(this.actions, h("button", { type: "button", onclick: retry }, "Try again"));
  }
}

export class Analyse {
  constructor() {
    this.cards = new Map(); // job id -> Card
    this.list = $("#result-list");
    this.recorder = null;
    this.refreshPositions = debounce(() => this.positions(), 1000); // at most 1/s while a queue drains
    this.wire();
  }

  options() {
    return { granularity: $("#opt-granularity").value, embedding: $("#opt-embedding").checked };
  }

  wire() {
    const input = $("#upload-input");
    input.addEventListener("change", () => {
      this.submitFiles([...input.files]);
      input.value = "";
    });
    const drop = $("#drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      this.submitFiles([...e.dataTransfer.files]);
    });
    $("#record").addEventListener("click", () => this.toggleRecord());
  }

  newCard(name, audioUrl) {
    const card = new Card(name, audioUrl, this.options());
    this.list.prepend(card.el);
    $("#results-empty").hidden = true;
    return card;
  }

  async submitFiles(files) {
    say($("#analyse-msg"), "");
    for (const file of files) await this.submitFile(file); // in order: queue order = file order
  }

  async submitFile(file) {
    const card = this.newCard(file.name, URL.createObjectURL(file));
    if (serverReads(file)) return this.send(card, file, file.name, file);
    card.setStatus("uploading", "Converting to 16 kHz WAV in this browser…");
    let wav;
    try {
      wav = await toWav16k(file);
    } catch {
      return card.fail(`Not sent: this browser cannot decode ${file.name}, and the server reads only WAV, FLAC, OGG, MP3 and AIFF. Convert it to one of those and try again.`);
    }
    return this.send(card, wav, `${stem(file.name)}.wav`, null);
  }

  // `original`: the untouched file, when the server may still be given the browser's decoding.
  async send(card, blob, name, original) {
    card.setStatus("uploading", "Uploading…");
    say(card.msgEl, "");
    let accepted;
    try {
      accepted = await api.submit(blob, name, card.options);
    } catch (e) {
      const unreadable = e instanceof ApiError && (e.code === "undecodable" || e.code === "unsupported_media_type");
      if (unreadable && original) {
        try {
          const wav = await toWav16k(original);
          card.setStatus("uploading", "The server could not read it; converted in this browser, sending again…");
          return this.send(card, wav, `${stem(name)}.wav`, null);
        } catch { /* the browser cannot read it either */ }
      }
      const retryable = e instanceof ApiError && (e.status === 503 || e.status === 507 || e.status === 0);
      const why = unreadable ? " This browser could not decode it either: convert it to WAV or FLAC." : "";
      return card.fail(`Refused: ${sentence(explain(e))}${why}`, retryable ? () => this.send(card, blob, name, original) : null);
    }
    card.id = accepted.id;
    card.el.dataset.job = accepted.id;
    this.cards.set(accepted.id, card);
    card.queued(accepted.position, accepted.eta_s);
    replace(card.actions, h("button", { type: "button", onclick: () => this.cancel(card) }, "Cancel"));
    // The job may have moved on while the POST was answered: ask once, events do the rest.
    this.follow(card);
  }

  async cancel(card) {
    try {
      await api.cancel(card.id);
      card.setStatus("cancelled", "Cancelled before it ran.");
    } catch (e) {
      say(card.msgEl, e.status === 409 ? "It started running and can no longer be cancelled." : explain(e));
    }
  }

  async follow(card) {
    let job;
    try {
      job = await api.job(card.id);
    } catch (e) {
      return say(card.msgEl, explain(e));
    }
    this.show(card, job);
  }

  show(card, job) {
    if (job.status === "queued") return; // position comes from the listing
    if (job.status === "running") return card.setStatus("running", "Running on the worker…");
    if (job.status === "cancelled") return card.setStatus("cancelled", "Cancelled before it ran.");
    if (job.status === "failed") {
      const err = job.error || {};
      return card.fail(`The job failed (${err.code || "error"}): ${sentence(err.message || "no reason given")}`);
    }
    if (job.status === "done") this.result(card, job);
  }

  // -- from the event stream ---------------------------------------------------------------
  onJob(ev) {
    const card = this.cards.get(ev.job);
    if (card && !FINAL.has(card.status)) {
      if (ev.status === "running") card.setStatus("running", "Running on the worker…");
      else if (FINAL.has(ev.status)) this.follow(card);
    }
    if ([...this.cards.values()].some((c) => c.status === "queued")) this.refreshPositions();
  }

  // After a reconnect that may have missed events: re-read every card still in flight.
  resync() {
    for (const card of this.cards.values()) if (!FINAL.has(card.status)) this.follow(card);
    this.refreshPositions();
  }

  async positions() {
    const waiting = [...this.cards.values()].filter((c) => c.status === "queued");
    if (!waiting.length) return;
    let listing;
    try {
      listing = await api.jobs({ status: "queued", limit: 200 });
    } catch {
      return;
    }
    const byId = new Map(listing.jobs.map((j) => [j.id, j]));
    for (const card of waiting) {
      const j = byId.get(card.id);
      if (j && card.status === "queued") card.queued(j.position, j.eta_s);
    }
  }

  // -- the result ------------------------------------------------------------------------------
  result(card, job) {
    const r = job.result;
    const took = [job.timings.queue_s, job.timings.compute_s].filter(Number.isFinite).reduce((a, b) => a + b, 0);
    card.setStatus("done", `${seconds(r.duration_s)} of audio · answered in ${seconds(took, 2)}`
      + (job.timings.cold_start_s ? ` (of which ${seconds(job.timings.cold_start_s, 2)} loading the model)` : ""));
    const top = splitLabel(r.top.label);
    const scores = h("ul", { class: "scores", "aria-label": "Scores" });
    r.labels.forEach((label, i) => {
      const { en, own, id } = splitLabel(label);
      const p = r.scores[i];
      scores.append(h("li", { dataset: { testid: `score-${id}`, value: String(p) }, class: label === r.top.label ? "top" : "" },
        h("span", { class: "name" }, en, own ? h("span", { class: "own", lang: "zh" }, own) : null),
        h("span", { class: "bar", role: "meter", "aria-label": en, "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": String(p) },
          h("span", { class: "fill", style: { width: `${(p * 100).toFixed(2)}%`, background: emotionColor(id, i) } })),
        h("span", { class: "value" }, pct(p))));
    });
    replace(card.body,
      h("p", { class: "verdict" }, "Most likely ",
        h("strong", { dataset: { testid: "top-label", label: r.top.label } }, top.en),
        top.own ? h("span", { class: "own", lang: "zh" }, top.own) : null,
        ` · ${pct(r.top.score)}`),
      scores,
      timeline(r));
    const json = new Blob([JSON.stringify(job, null, 2)], { type: "application/json" });
    const base = stem(card.name);
    replace(card.actions,
      h("button", { type: "button", onclick: () => download(json, `${base}.result.json`) }, "Download result JSON"),
      card.options.embedding
        ? h("button", { type: "button", onclick: () => this.embedding(card, base) }, "Download embedding .npy")
        : null);
  }

  async embedding(card, base) {
    try {
      download(await api.embedding(card.id), `${base}.emb.npy`);
    } catch (e) {
      say(card.msgEl, explain(e));
    }
  }

  // -- recording ---------------------------------------------------------------------------------
  async toggleRecord() {
    const button = $("#record");
    const msg = $("#analyse-msg");
    if (!this.recorder) {
      say(msg, "");
      const rec = new Recorder();
      try {
        await rec.start(({ level, seconds: s }) => {
          $("#level-fill").style.width = `${Math.min(100, level * 100).toFixed(0)}%`;
          $("#level").setAttribute("aria-valuenow", String(Math.round(level * 100)));
          $("#rec-time").textContent = `${s.toFixed(1)} s`;
        });
      } catch (e) {
        rec.release();
        const denied = e && (e.name === "NotAllowedError" || e.name === "SecurityError");
        return say(msg, denied
          ? "The microphone was not allowed. Allow it for this page in the browser's site settings and try again."
          : `Cannot record: ${e.message || e}`);
      }
      this.recorder = rec;
      const s = rec.settings || {};
      say($("#rec-info"), `Recording at ${s.sampleRate ? `${s.sampleRate} Hz` : "the device rate"}; click again to stop and send.`);
      button.textContent = "■ Stop and send";
      button.setAttribute("aria-pressed", "true");
      document.body.classList.add("recording");
      return;
    }
    const rec = this.recorder;
    this.recorder = null;
    button.textContent = "● Record";
    button.setAttribute("aria-pressed", "false");
    document.body.classList.remove("recording");
    $("#level-fill").style.width = "0%";
    let out;
    try {
      out = await rec.stop();
    } catch (e) {
      return say(msg, `The recording could not be converted: ${e.message || e}`);
    }
    const name = `recording-${new Date().toTimeString().slice(0, 8).replace(/:/g, "")}.wav`;
    const card = this.newCard(name, URL.createObjectURL(out.wav));
    this.send(card, out.wav, name, null);
  }
}
