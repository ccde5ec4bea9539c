// Small SVG charts drawn by the page itself: line charts (training curves, one panel per quantity) and bar
// charts (concept relevance). Axes are labelled with what is measured.
"use strict";

const Charts = (() => {
  const { svg, el } = UI;
  const PALETTE = ["#0f766e", "#c2410c", "#1d4ed8", "#a21caf", "#4d7c0f", "#b45309", "#0e7490", "#be123c",
    "#6d28d9", "#15803d", "#9f1239", "#334155"];

  function ticks(lo, hi, count = 5) {
    if (!(hi > lo)) {
      const pad = Math.abs(lo) * 0.1 || 1;
      lo -= pad;
      hi += pad;
    }
    const raw = (hi - lo) / count;
    const step = Math.pow(10, Math.floor(Math.log10(raw)));
    const nice = [1, 2, 2.5, 5, 10].map((m) => m * step).find((s) => s >= raw) || 10 * step;
    const first = Math.ceil(lo / nice) * nice;
    const out = [];
    for (let v = first; v <= hi + nice * 1e-9; v += nice) out.push(Math.abs(v) < nice * 1e-9 ? 0 : v);
    return { lo: Math.min(lo, first), hi, values: out };
  }

  function label(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return String(Number(v.toPrecision(4)));
  }

  // series: [{name, x: [], y: [], color, dash}]
  function line(target, { title, xlabel, ylabel, series, width = 360, height = 230 }) {
    const m = { l: 58, r: 12, t: 26, b: 40 };
    const w = width - m.l - m.r;
    const h = height - m.t - m.b;
    const xs = series.flatMap((s) => s.x);
    const ys = series.flatMap((s) => s.y.filter((v) => v !== null));
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
    root.append(svg("text", { x: m.l, y: 16, class: "chart-title", text: title }));
    if (!xs.length || !ys.length) {
      root.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", text: "no points yet" }));
      target.append(root);
      return root;
    }
    const xt = ticks(Math.min(...xs), Math.max(...xs));
    const yt = ticks(Math.min(...ys), Math.max(...ys));
    const X = (v) => m.l + ((v - xt.lo) / (xt.hi - xt.lo || 1)) * w;
    const Y = (v) => m.t + h - ((v - yt.lo) / (yt.hi - yt.lo || 1)) * h;
    const axes = svg("g", { class: "axes" });
    for (const v of yt.values) {
      axes.append(svg("line", { x1: m.l, x2: m.l + w, y1: Y(v), y2: Y(v), class: "grid" }));
      axes.append(svg("text", { x: m.l - 6, y: Y(v) + 3, class: "tick", "text-anchor": "end", text: label(v) }));
    }
    for (const v of xt.values) {
      axes.append(svg("text", { x: X(v), y: m.t + h + 14, class: "tick", "text-anchor": "middle", text: label(v) }));
    }
    axes.append(svg("line", { x1: m.l, x2: m.l + w, y1: m.t + h, y2: m.t + h, class: "axis" }));
    axes.append(svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: m.t + h, class: "axis" }));
    axes.append(svg("text", { x: m.l + w / 2, y: height - 6, class: "axis-label", "text-anchor": "middle", text: xlabel }));
    axes.append(svg("text", {
      x: 12, y: m.t + h / 2, class: "axis-label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${m.t + h / 2})`, text: ylabel,
    }));
    root.append(axes);
    for (const s of series) {
      const points = s.x.map((x, i) => [x, s.y[i]]).filter(([, y]) => y !== null);
      if (points.length > 1) {
        const d = points.map(([x, y], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
        root.append(svg("path", { d, class: "series", stroke: s.color, "stroke-dasharray": s.dash || null }));
      }
      if (points.length <= 60) {
        for (const [x, y] of points) {
          root.append(svg("circle", { cx: X(x), cy: Y(y), r: points.length === 1 ? 3.5 : 2.2, fill: s.color },
            svg("title", { text: `${s.name}\nstep ${x}: ${label(y)}` })));
        }
      }
    }
    // a readout of the nearest step of every series under the pointer
    const readout = svg("text", { x: m.l + w, y: 16, class: "readout", "text-anchor": "end" });
    const cursor = svg("line", { y1: m.t, y2: m.t + h, class: "cursor", visibility: "hidden" });
    root.append(cursor, readout);
    root.addEventListener("mousemove", (event) => {
      const box = root.getBoundingClientRect();
      const px = ((event.clientX - box.left) / box.width) * width;
      if (px < m.l || px > m.l + w) return;
      const step = xt.lo + ((px - m.l) / w) * (xt.hi - xt.lo);
      const parts = [];
      for (const s of series) {
        let best = -1;
        s.x.forEach((x, i) => {
          if (s.y[i] !== null && (best < 0 || Math.abs(x - step) < Math.abs(s.x[best] - step))) best = i;
        });
        if (best >= 0) parts.push(`${label(s.y[best])}`);
      }
      cursor.setAttribute("x1", px);
      cursor.setAttribute("x2", px);
      cursor.setAttribute("visibility", "visible");
      readout.textContent = `step ≈ ${Math.round(step)}: ${parts.join(" / ")}`;
    });
    root.addEventListener("mouseleave", () => {
      cursor.setAttribute("visibility", "hidden");
      readout.textContent = "";
    });
    target.append(root);
    return root;
  }

  // bars: [{key, value, label, cls, tip}], a dashed reference line at `threshold` (labelled `thresholdLabel`)
  function bars(target, { title, xlabel, ylabel, bars, threshold, thresholdLabel, onclick, width = 640, height = 220 }) {
    const m = { l: 54, r: 14, t: 26, b: 44 };
    const w = width - m.l - m.r;
    const h = height - m.t - m.b;
    const values = bars.map((b) => b.value);
    const yt = ticks(Math.min(0, ...values, threshold ?? 0), Math.max(0, ...values, threshold ?? 0));
    const Y = (v) => m.t + h - ((v - yt.lo) / (yt.hi - yt.lo || 1)) * h;
    const step = w / Math.max(1, bars.length);
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
    root.append(svg("text", { x: m.l, y: 16, class: "chart-title", text: title }));
    for (const v of yt.values) {
      root.append(svg("line", { x1: m.l, x2: m.l + w, y1: Y(v), y2: Y(v), class: "grid" }));
      root.append(svg("text", { x: m.l - 6, y: Y(v) + 3, class: "tick", "text-anchor": "end", text: label(v) }));
    }
    bars.forEach((b, i) => {
      const x = m.l + i * step + step * 0.15;
      const top = Y(Math.max(0, b.value));
      const rect = svg("rect", {
        x, y: top, width: Math.max(1, step * 0.7), height: Math.max(0.5, Math.abs(Y(b.value) - Y(0))),
        class: `bar ${b.cls || ""}`, "data-key": b.key,
      }, svg("title", { text: b.tip || `${b.label}: ${label(b.value)}` }));
      if (onclick) {
        rect.addEventListener("click", () => onclick(b.key));
        rect.style.cursor = "pointer";
      }
      root.append(rect);
      if (bars.length <= 40) {
        root.append(svg("text", { x: x + step * 0.35, y: m.t + h + 13, class: "tick", "text-anchor": "middle", text: b.label }));
      }
    });
    root.append(svg("line", { x1: m.l, x2: m.l + w, y1: Y(0), y2: Y(0), class: "axis" }));
    root.append(svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: m.t + h, class: "axis" }));
    if (threshold !== undefined && threshold !== null) {
      root.append(svg("line", { x1: m.l, x2: m.l + w, y1: Y(threshold), y2: Y(threshold), class: "threshold" }));
      root.append(svg("text", { x: m.l + w - 2, y: Y(threshold) - 4, class: "threshold-label", "text-anchor": "end", text: thresholdLabel }));
    }
    root.append(svg("text", { x: m.l + w / 2, y: height - 8, class: "axis-label", "text-anchor": "middle", text: xlabel }));
    root.append(svg("text", {
      x: 12, y: m.t + h / 2, class: "axis-label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${m.t + h / 2})`, text: ylabel,
    }));
    target.append(root);
    return root;
  }

  function legend(items) {
    return el("div", { class: "legend" }, items.map((item) => el("span", { class: "legend-item" },
      el("span", { class: "swatch", style: `background:${item.color}` }), item.name)));
  }

  return { PALETTE, line, bars, legend, ticks };
})();
