// Emotion over time for one result.  A result with `segments` ([{start_s, end_s, scores}], from
// segment-level analysis of long recordings) is drawn segment by segment, with the scores as
// lines; a plain result is one segment: the whole clip.

import { emotionColor, h, loadUplot, pct, splitLabel } from "./ui.js";

export function segmentsOf(result) {
  const segs = Array.isArray(result.segments) && result.segments.length ? result.segments : null;
  if (segs) return segs.filter((s) => Number.isFinite(s.start_s) && Number.isFinite(s.end_s) && Array.isArray(s.scores));
  return [{ start_s: 0, end_s: result.duration_s || 0, scores: result.scores }];
}

function topOf(labels, scores) {
  let best = 0;
  scores.forEach((s, i) => { if (s > scores[best]) best = i; });
  return { ...splitLabel(labels[best]), index: best, score: scores[best] };
}

export function timeline(result) {
  const labels = result.labels || [];
  const segs = segmentsOf(result);
  const end = segs.length ? Math.max(...segs.map((s) => s.end_s)) : 0;
  const strip = h("div", { class: "strip" });
  const spoken = [];
  for (const s of segs) {
    const top = topOf(labels, s.scores);
    const span = `${s.start_s.toFixed(1)}–${s.end_s.toFixed(1)} s`;
    spoken.push(`${span} ${top.en}`);
    strip.append(h("div", {
      class: "seg", title: `${span}: ${top.en} ${pct(top.score)}`,
      style: {
        left: `${(100 * s.start_s) / (end || 1)}%`,
        width: `${(100 * Math.max(0, s.end_s - s.start_s)) / (end || 1)}%`,
        background: emotionColor(top.id, top.index),
      },
    }, h("span", {}, top.en)));
  }
  strip.setAttribute("role", "img");
  strip.setAttribute("aria-label", `Emotion over time: ${spoken.join("; ")}`);
  const fig = h("figure", { class: "timeline", dataset: { testid: "timeline", segments: String(segs.length) } },
    strip,
    h("div", { class: "axis" }, h("span", {}, "0 s"), h("span", {}, `${end.toFixed(1)} s`)),
  );
  if (segs.length > 1) {
    const box = h("div", { class: "chart small" });
    fig.append(box);
    loadUplot().then((uPlot) => requestAnimationFrame(() => drawScores(uPlot, box, labels, segs)), () => box.remove());
  }
  fig.append(h("figcaption", {}, segs.length > 1
    ? `${segs.length} segments; the band shows each segment's most likely emotion.`
    : "Whole clip: one result per clip (segment results are drawn here when the server returns them)."));
  return fig;
}

function drawScores(uPlot, box, labels, segs) {
  const xs = segs.map((s) => (s.start_s + s.end_s) / 2);
  const series = [{ label: "time (s)" }];
  const data = [xs];
  labels.forEach((label, i) => {
    const { en, id } = splitLabel(label);
    series.push({ label: en, stroke: emotionColor(id, i), width: 1.5, value: (u, v) => (v == null ? "–" : pct(v)) });
    data.push(segs.map((s) => s.scores[i]));
  });
  const width = Math.max(240, box.clientWidth || 300);
  // eslint-disable-next-line no-new
  new uPlot({
    width, height: 160, series, legend: { show: false },
    scales: { x: { time: false }, y: { range: [0, 1] } },
    axes: [{ size: 28, label: "seconds", labelSize: 14 }, { size: 56, values: (u, vals) => vals.map((v) => `${Math.round(v * 100)}%`) }],
  }, data, box);
}
