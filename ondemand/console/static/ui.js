// Small DOM and formatting helpers shared by the panels.  No framework: h() builds elements.

export const $ = (sel, root = document) => root.querySelector(sel);

// h("li", {class: "x", dataset: {testid: "result"}, onclick: f}, child, "text", [more])
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function say(el, text) {
  el.textContent = text || "";
  el.hidden = !text;
}

// -- numbers and times ----------------------------------------------------------------------
export function seconds(s, digits = 1) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? digits : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
  const hh = Math.floor(m / 60);
  if (hh < 48) return `${hh} h ${String(m % 60).padStart(2, "0")} min`;
  return `${Math.floor(hh / 24)} d ${hh % 24} h`;
}

export function clock(t) {
  const d = t instanceof Date ? t : new Date(t * 1000);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function when(t) {
  const d = new Date(t * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? clock(d) : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function pct(p) {
  return `${(p * 100).toFixed(1)} %`;
}

export function money(usd) {
  if (usd === null || usd === undefined) return "–";
  const a = Math.abs(usd);
  return `$${usd.toFixed(a >= 100 ? 0 : a >= 1 ? 2 : a >= 0.01 ? 3 : 4)}`;
}

const UNITS = { s: 1, m: 60, h: 3600, d: 86400 };

// "90s", "30m", "2h", "1h30m", "1d", a bare number of seconds; "" -> 0.  null when unreadable.
export function parseDuration(text) {
  const t = String(text || "").trim().toLowerCase().replace(/\s+/g, "");
  if (!t) return 0;
  if (/^\d+(\.\d+)?$/.test(t)) return Number(t);
  const re = /(\d+(?:\.\d+)?)([smhd])/g;
  let total = 0, used = 0, m;
  while ((m = re.exec(t)) !== null) {
    total += Number(m[1]) * UNITS[m[2]];
    used += m[0].length;
  }
  return used === t.length ? total : null;
}

// -- emotion labels -------------------------------------------------------------------------
// The model's labels are "生气/angry" (own label / English), "<unk>"; the fake worker's "angry".
export function splitLabel(label) {
  const s = String(label);
  const slash = s.lastIndexOf("/");
  const en = (slash >= 0 ? s.slice(slash + 1) : s).trim();
  const own = slash >= 0 ? s.slice(0, slash).trim() : "";
  const id = en.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "") || "unknown";
  return { en: en.replace(/^<(.*)>$/, "$1") || en, own, id };
}

const COLORS = {
  angry: "#d64541", disgusted: "#7a8b2c", fearful: "#8e5bb5", happy: "#e0a800",
  neutral: "#8c8c8c", other: "#2a9d8f", sad: "#3a78c3", surprised: "#e07a2f", unk: "#b5b5b5",
};
const SPARE = ["#5c6bc0", "#26a69a", "#ef6c00", "#8d6e63", "#ec407a"];

export function emotionColor(id, index = 0) {
  return COLORS[id] || SPARE[index % SPARE.length];
}

// -- the chart library, loaded when the first chart is drawn (off the path to interactive) ----
let uplot = null;
export function loadUplot() {
  if (!uplot) {
    uplot = new Promise((resolve, reject) => {
      const src = new URL("./vendor/uplot-1.6.32.min.js", import.meta.url).href;
      const script = h("script", { src, onload: () => resolve(window.uPlot), onerror: () => reject(new Error(`cannot load ${src}`)) });
      document.head.append(script);
    });
  }
  return uplot;
}

// -- misc -----------------------------------------------------------------------------------
export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// Run fn at most once per `ms`, trailing: bursts of events cost one call.
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    if (timer !== null) return;
    timer = setTimeout(() => { timer = null; fn(...args); }, ms);
  };
}
