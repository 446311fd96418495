// The console's entry point: the token gate, then the panels, fed by one event stream.

import { Analyse } from "./analyse.js";
import { api, explain, onUnauthorized, token } from "./api.js";
import { CostPanel } from "./cost.js";
import { JobsTable } from "./jobs.js";
import { EventStream } from "./stream.js";
import { $, say } from "./ui.js";
import { WorkerPanel } from "./worker.js";

const CONN = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", locked: "locked", offline: "daemon unreachable" };

const worker = new WorkerPanel();
const analyse = new Analyse();
const cost = new CostPanel();
const jobs = new JobsTable();
let stream = null;
let retryMs = 1000;

function setConn(state) {
  const el = $("#conn");
  el.dataset.conn = state;
  el.textContent = CONN[state];
  worker.live = state === "live";
}

function onEvent(name, data) {
  switch (name) {
    case "state":
      worker.applyState(data);
      cost.onState(data);
      break;
    case "worker":
      worker.applySnapshot(data.worker);
      break;
    case "queue":
      worker.applyQueue(data);
      break;
    case "job":
      analyse.onJob(data);
      jobs.later();
      break;
    case "reset": // events were missed (or the daemon restarted): re-read what they told
      analyse.resync();
      jobs.refresh();
      cost.later();
      break;
    default:
  }
}

function lock(message) {
  if (stream) stream.stop();
  stream = null;
  document.body.classList.add("locked");
  $("#auth").hidden = false;
  $("#forget-token").hidden = true;
  say($("#auth-error"), message);
  setConn("locked");
  $("#token-input").focus();
}

async function unlock() {
  let status;
  try {
    status = await api.status();
  } catch (e) {
    if (e.status === 401) {
      const had = token.get();
      token.clear();
      return lock(had ? "That token was refused. Check server.token (or ONDEMAND_TOKEN) and enter it again." : "");
    }
    setConn("offline");
    say($("#notice"), `${explain(e)} Retrying in ${Math.round(retryMs / 1000)} s.`);
    setTimeout(unlock, retryMs);
    retryMs = Math.min(10000, retryMs * 2);
    return;
  }
  retryMs = 1000;
  say($("#notice"), "");
  document.body.classList.remove("locked");
  $("#auth").hidden = true;
  $("#forget-token").hidden = !token.get();
  worker.applySnapshot(status.worker);
  worker.applyQueue(status.queue);
  requestAnimationFrame(() => performance.mark("console-interactive"));
  if (!stream) {
    stream = new EventStream("/v1/events", {
      onEvent,
      onState: setConn,
      onUnauthorized: () => lock("The token is no longer accepted. Enter the current one."),
    });
    stream.start();
  }
  jobs.refresh();
  cost.refresh();
}

$("#auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("#token-input");
  token.set(input.value.trim());
  input.value = "";
  say($("#auth-error"), "");
  unlock();
});

$("#forget-token").addEventListener("click", () => {
  token.clear();
  lock("Token forgotten for this tab.");
});

onUnauthorized(() => {
  if (!document.body.classList.contains("locked")) {
    token.clear();
    lock("The token is no longer accepted. Enter the current one.");
  }
});

setConn("connecting");
unlock();
