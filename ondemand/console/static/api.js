// The daemon's HTTP API, as any client would use it.  The token lives in this tab's session
// storage and travels only as an Authorization header, never in a URL.

const TOKEN_KEY = "ondemand.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || "",
  set: (t) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const listeners = { unauthorized: [] };
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

export function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const t = token.get();
  if (t) headers.set("Authorization", `Bearer ${t}`);
  return headers;
}

// fetch() with the token; non-2xx answers become ApiError with the server's code and message.
export async function request(path, { method = "GET", body, json, headers = {}, signal } = {}) {
  const h = authHeaders(headers);
  if (json !== undefined) {
    h.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let r;
  try {
    r = await fetch(path, { method, body, headers: h, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "The daemon did not answer. Is it running? Reload the page once it is.");
  }
  if (r.ok) return r;
  let code = `http_${r.status}`, message = r.statusText || "request failed";
  try {
    const err = (await r.json()).error;
    if (err && err.code) ({ code, message } = err);
  } catch { /* not our JSON error body */ }
  if (r.status === 401) listeners.unauthorized.forEach((fn) => fn());
  const retry = Number(r.headers.get("Retry-After"));
  throw new ApiError(r.status, code, message, Number.isFinite(retry) && retry > 0 ? retry : null);
}

export const getJSON = async (path, opts) => (await request(path, opts)).json();

export const api = {
  status: () => getJSON("/v1/status"),
  job: (id) => getJSON(`/v1/jobs/${encodeURIComponent(id)}`),
  jobs: (params) => getJSON(`/v1/jobs?${new URLSearchParams(params)}`),
  cancel: (id) => getJSON(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }),
  embedding: async (id) => (await request(`/v1/jobs/${encodeURIComponent(id)}/embedding.npy`)).blob(),
  submit: (blob, name, { granularity, embedding }) => {
    const form = new FormData();
    form.append("audio", blob, name);
    form.append("key", name.replace(/\.[^.]+$/, ""));
    form.append("granularity", granularity);
    form.append("embedding", embedding ? "true" : "false");
    return getJSON("/v1/jobs", { method: "POST", body: form });
  },
  load: (holdS) => getJSON("/v1/worker/load", { method: "POST", json: { hold_s: holdS, wait: false } }),
  unload: (exit) => getJSON("/v1/worker/unload", { method: "POST", json: { exit } }),
  prewarm: () => getJSON("/v1/prewarm"),
  cost: () => getJSON("/v1/cost?since=30d"),
};

// What a refused request means for the person at the page, and what to do about it.
export function explain(err) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
  switch (err.code) {
    case "queue_full":
      return `Nothing was queued: ${err.message}.${wait}`;
    case "shutting_down":
      return `The daemon is shutting down; queued jobs are kept.${wait}`;
    case "load_failed":
    case "worker_unavailable":
      return `The worker cannot take work now: ${err.message}`;
    case "unauthorized":
      return "The token was refused. Enter the current token.";
    case "network":
      return err.message;
    default:
      return err.message || `Request failed (${err.status}).`;
  }
}
