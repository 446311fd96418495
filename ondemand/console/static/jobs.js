// Recent jobs (GET /v1/jobs): status, length, time taken, top label, result and embedding.
// Re-read when a job event arrives (coalesced), not on a timer.

import { api, explain } from "./api.js";
import { $, debounce, download, h, replace, say, seconds, splitLabel, when } from "./ui.js";

const PAGE = 20;

export class JobsTable {
  constructor() {
    this.body = $("#jobs-table tbody");
    this.next = null;
    this.shown = PAGE;
    this.later = debounce(() => this.refresh(), 500);
    $("#jobs-more").addEventListener("click", () => { this.shown += PAGE; this.refresh(); });
  }

  async refresh() {
    let listing;
    try {
      listing = await api.jobs({ limit: this.shown });
    } catch (e) {
      return say($("#jobs-msg"), explain(e));
    }
    say($("#jobs-msg"), "");
    replace(this.body, listing.jobs.map((j) => this.row(j)));
    $("#jobs-empty").hidden = listing.jobs.length > 0;
    if (!listing.jobs.length) $("#jobs-empty").textContent = `No jobs yet. Analyse a clip above, or submit one with the API: curl -F audio=@clip.wav ${location.origin}/v1/jobs`;
    $("#jobs-more").hidden = !listing.next;
  }

  row(j) {
    const took = j.finished && j.created ? j.finished - j.created : null;
    const top = j.top ? splitLabel(j.top.label) : null;
    const fail = j.error ? `${j.error.code}: ${j.error.message}` : "";
    const status = j.status === "queued" && j.position != null ? `queued (#${j.position + 1})` : j.status;
    return h("tr", { dataset: { job: j.id, status: j.status } },
      h("td", {}, when(j.created)),
      h("td", { class: "clip" }, j.key),
      h("td", { class: `st st-${j.status}`, title: fail }, status),
      h("td", { class: "num" }, seconds(j.duration_s)),
      h("td", { class: "num" }, took != null ? seconds(took, 2) : "–"),
      h("td", {}, top ? `${top.en} ${(j.top.score * 100).toFixed(0)} %` : (fail ? h("span", { class: "error-text" }, j.error.code) : "–")),
      h("td", {}, j.status === "done"
        ? h("button", { type: "button", class: "link", "aria-label": `Result JSON of ${j.key}`, onclick: () => this.result(j) }, "JSON") : "–"),
      h("td", {}, j.status === "done" && j.embedding
        ? h("button", { type: "button", class: "link", "aria-label": `Embedding of ${j.key}`, onclick: () => this.embedding(j) }, ".npy") : "–"));
  }

  async result(j) {
    try {
      const job = await api.job(j.id);
      download(new Blob([JSON.stringify(job, null, 2)], { type: "application/json" }), `${j.key}.result.json`);
    } catch (e) {
      say($("#jobs-msg"), explain(e));
    }
  }

  async embedding(j) {
    try {
      download(await api.embedding(j.id), `${j.key}.emb.npy`);
    } catch (e) {
      say($("#jobs-msg"), explain(e));
    }
  }
}
