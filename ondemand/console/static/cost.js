// Schedule and cost: prewarm rules (GET /v1/prewarm), GPU time per day for the last 30 days
// split by phase with cold starts, on-demand vs always-on, and the keep-alive recommendation in
// words (GET /v1/cost?since=30d).  Re-read when a worker session ends, not on a timer.

import { api, explain } from "./api.js";
import { $, debounce, h, loadUplot, money, replace, say, seconds, when } from "./ui.js";

const PHASES = [
  { key: "loading", label: "loading", color: "#e0a800" },
  { key: "ready_busy", label: "busy", color: "#2e8b57" },
  { key: "ready_idle", label: "idle-warm", color: "#d9534f" },
  { key: "unloaded_alive", label: "unloaded-alive", color: "#8e6bbf" },
];
const COLD_COLOR = "#1f6feb";

function hours(x) {
  if (x * 60 < 1) return `${Math.round(x * 3600)} s`;
  return x < 1 ? `${(x * 60).toFixed(x * 60 < 10 ? 1 : 0)} min` : `${x.toFixed(x < 10 ? 2 : 1)} h`;
}

export class CostPanel {
  constructor() {
    this.plot = null;
    this.later = debounce(() => this.refresh(), 2000);
    $("#cost-refresh").addEventListener("click", () => this.refresh());
    new ResizeObserver(() => {
      const box = $("#cost-chart");
      if (this.plot && box.clientWidth && Math.abs(this.plot.width - box.clientWidth) > 4) {
        this.plot.setSize({ width: box.clientWidth, height: this.plot.height });
      }
    }).observe($("#cost-chart"));
  }

  // A worker session ended or started: the figures moved.
  onState(ev) {
    if (ev.new === "cold" || ev.new === "ready") this.later();
  }

  async refresh() {
    const msg = $("#cost-msg");
    const [prewarm, cost] = await Promise.allSettled([api.prewarm(), api.cost()]);
    say(msg, [prewarm, cost].filter((r) => r.status === "rejected").map((r) => explain(r.reason)).join(" "));
    if (prewarm.status === "fulfilled") this.renderPrewarm(prewarm.value);
    if (cost.status === "fulfilled") await this.renderCost(cost.value);
  }

  renderPrewarm(doc) {
    const lead = doc.lead || {};
    const intro = h("p", {}, `Scheduled loads start ${seconds(lead.seconds, 0)} before their time `,
      `(${lead.source === "floor" ? "the floor, prewarm_lead.floor_s" : `p${lead.percentile} of the last ${lead.loads_recorded} loads × ${lead.factor}`}).`);
    const holds = (doc.holds || []).map((hd) => h("p", { class: "hold" },
      `Held now by ${hd.trigger} until ${new Date(hd.until.utc).toLocaleString()} (${seconds(hd.remaining_s, 0)} left).`));
    if (!doc.rules || !doc.rules.length) {
      return replace($("#prewarm"), h("h3", {}, "Prewarm"),
        h("p", { class: "empty" }, "No prewarm rules: the worker starts only when work arrives. Add [[prewarm]] rules to config.toml to have it ready for working hours (docs/prewarm.md)."),
        holds);
    }
    const rows = doc.rules.map((r) => h("tr", {},
      h("th", { scope: "row" }, r.name),
      h("td", {}, h("code", {}, r.cron), ` ${r.timezone}`),
      h("td", {}, r.next_fire ? when(Date.parse(r.next_fire.utc) / 1000) : "–"),
      h("td", {}, r.next_start ? when(Date.parse(r.next_start.utc) / 1000) : "–"),
      h("td", {}, seconds(r.hold_s, 0)),
      h("td", {}, r.in_window_until ? `warm until ${when(Date.parse(r.in_window_until.utc) / 1000)}` : lastFire(r.last))));
    replace($("#prewarm"), h("h3", {}, "Prewarm"), intro, holds,
      h("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": "Prewarm rules" },
        h("table", {}, h("thead", {}, h("tr", {}, ["Rule", "When", "Next", "Loading starts", "Hold", "Now"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, rows))));
  }

  async renderCost(doc) {
    const period = doc.periods[doc.periods.length - 1];
    const days = period.days;
    const chartBox = $("#cost-chart");
    const total = (d) => PHASES.reduce((a, p) => a + d.hours[p.key], 0);
    const peak = Math.max(0, ...days.map(total));
    const unit = peak < 1 ? { name: "minutes", f: 60 } : { name: "hours", f: 1 };
    this.renderTable(days, unit);
    this.renderSummary(doc, period);
    chartBox.setAttribute("aria-label", `GPU ${unit.name} per day for the last 30 days, by phase; ${period.cold_starts.count} cold starts`);
    let uPlot;
    try {
      uPlot = await loadUplot();
    } catch (e) {
      return say($("#cost-msg"), `The chart cannot be drawn (${e.message}); the figures are below.`);
    }
    const xs = days.map((d) => Date.parse(`${d.day}T00:00:00Z`) / 1000);
    // Stacked bars: draw the running sums, largest first, so each phase shows as its own band.
    const raw = PHASES.map((p) => days.map((d) => d.hours[p.key] * unit.f));
    const sums = raw.map((_, i) => days.map((_, j) => raw.slice(0, i + 1).reduce((a, r) => a + r[j], 0)));
    const bars = uPlot.paths.bars({ size: [0.75, 40] });
    const series = [{ label: "day", value: (u, v) => (v == null ? "–" : new Date(v * 1000).toISOString().slice(0, 10)) }];
    const data = [xs];
    for (let i = PHASES.length - 1; i >= 0; i--) {
      const p = PHASES[i];
      series.push({
        label: p.label, fill: p.color, stroke: p.color, paths: bars, points: { show: false },
        value: (u, v, si, idx) => (idx == null ? "–" : `${raw[i][idx].toFixed(unit.f === 60 ? 1 : 2)} ${unit.name === "minutes" ? "min" : "h"}`),
      });
      data.push(sums[i]);
    }
    series.push({ label: "cold starts", scale: "n", stroke: COLD_COLOR, width: 0, paths: () => null, points: { show: true, size: 7, fill: COLD_COLOR } });
    data.push(days.map((d) => d.cold_starts || null));
    const opts = {
      width: Math.max(280, chartBox.clientWidth || 320), height: 220, series,
      scales: { x: { time: true, range: (u, lo, hi) => [lo - 43200, hi + 43200] }, y: { range: (u, lo, hi) => [0, Math.max(hi, unit.f === 60 ? 1 : 0.1)] }, n: { range: (u, lo, hi) => [0, Math.max(4, hi + 1)] } },
      axes: [{ size: 30 }, { label: unit.name, size: 44 }, { scale: "n", side: 1, label: "cold starts", size: 40, grid: { show: false } }],
      legend: { live: true },
      cursor: { points: { show: false } },
    };
    if (this.plot) this.plot.destroy();
    chartBox.replaceChildren();
    this.plot = new uPlot(opts, data, chartBox);
  }

  renderTable(days, unit) {
    const rows = days.filter((d) => d.covered_hours > 0).map((d) => h("tr", {},
      h("th", { scope: "row" }, d.day),
      PHASES.map((p) => h("td", {}, (d.hours[p.key] * unit.f).toFixed(2))),
      h("td", {}, String(d.cold_starts)), h("td", {}, money(d.on_demand_usd)), h("td", {}, money(d.always_on_usd))));
    replace($("#cost-table"), rows.length
      ? h("table", {}, h("thead", {}, h("tr", {}, ["Day (UTC)", ...PHASES.map((p) => `${p.label} (${unit.name})`), "Cold starts", "On demand", "Always on"].map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows))
      : h("p", { class: "empty" }, "No day with recorded time yet."));
  }

  renderSummary(doc, period) {
    const hrs = period.hours;
    const c = period.cost;
    const cs = period.cold_starts;
    const rate = doc.settings.gpu_hour_usd;
    const out = [];
    if (!period.covered_hours) {
      out.push(h("p", { class: "empty" }, "Nothing recorded yet: the ledger starts with the daemon and fills as the worker comes and goes."));
    } else {
      out.push(h("p", {}, `The GPU was held ${hours(hrs.gpu_held)} of the ${hours(period.covered_hours)} the daemon ran: `,
        `${hours(hrs.loading)} loading, ${hours(hrs.ready_busy)} busy, ${hours(hrs.ready_idle)} idle-warm, ${hours(hrs.unloaded_alive)} unloaded-alive.`));
      out.push(h("p", { class: "money" }, "On demand ", h("strong", {}, money(c.on_demand_usd)), " vs always on ",
        h("strong", {}, money(c.always_on_usd)), `: saved ${money(c.savings_usd)}`,
        c.savings_pct != null ? ` (${c.savings_pct.toFixed(1)} %)` : "", ` at ${money(rate)} per GPU-hour`,
        rate === 1 ? " (dollars read as GPU-hours; set cost.gpu_hour_usd)." : "."));
      out.push(h("p", {}, `${cs.count} cold start${cs.count === 1 ? "" : "s"}`,
        cs.count ? `, ${seconds(cs.seconds / cs.count, 1)} on average` : "", cs.failed ? `, ${cs.failed} failed` : "", "."));
    }
    out.push(h("p", { class: "advice" }, recommendation(doc.recommendation)));
    replace($("#cost-summary"), out);
  }
}

function lastFire(last) {
  if (!last) return "not fired yet";
  if (last.error) return `last fire failed: ${last.error}`;
  if (last.lateness_s == null) return "last fire: loading";
  return last.lateness_s <= 0 ? `last ready ${seconds(-last.lateness_s, 0)} early` : `last ready ${seconds(last.lateness_s, 1)} late`;
}

const setting = (v) => (v < 0 ? "-1 (never)" : v === 0 ? "0 (at once)" : `${Math.round(v)}`);

export function recommendation(r) {
  if (!r) return "";
  const be = r.break_even_s && r.break_even_s.exit;
  const bound = be != null ? ` Keeping the model warm for more than ${seconds(be, 0)} of idle costs more than one cold start.` : "";
  if (r.status !== "ok") return `No keep-alive recommendation yet: ${r.why}.${bound}`;
  const rec = r.recommended, cur = r.current;
  const same = rec.unload_after_s === cur.unload_after_s && rec.exit_after_s === cur.exit_after_s;
  const head = same
    ? `The current timeouts are the best for the ${r.gaps.count} gaps between jobs seen: worker.unload_after_s = ${setting(cur.unload_after_s)}, worker.exit_after_s = ${setting(cur.exit_after_s)}.`
    : `Recommended: worker.unload_after_s = ${setting(rec.unload_after_s)} and worker.exit_after_s = ${setting(rec.exit_after_s)}. Over the ${r.gaps.count} gaps between jobs seen they would have cost ${money(rec.cost_usd)} with ${rec.spawns + rec.reloads} cold starts, against ${money(cur.cost_usd)} with ${cur.spawns + cur.reloads} for the current settings (always warm: ${money(r.always_warm.cost_usd)}).`;
  return `${head} Why: ${r.why}.${bound}`;
}
