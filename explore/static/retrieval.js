// Retrieval: query by DNA / FASTA or photo; per-rank prediction, nearest keys, novelty; a clickable PCA of the index.
"use strict";

(window.Views || (window.Views = {})).retrieval = function (root, tab) {
  const { el, api, say, num, pct } = UI;
  const ranks = tab.ranks;

  // ---------------------------------------------------------------- query form
  const dna = el("textarea", { rows: 7, spellcheck: "false", placeholder: "A DNA barcode (ACGT…), or FASTA records:\n>specimen 1\nACGT…", "aria-label": "DNA barcode or FASTA" });
  const unknown = el("input", { type: "checkbox" });
  const file = el("input", { type: "file", accept: "image/*", "aria-label": "query image" });
  const keys = el("select", { "aria-label": "key modality" }, tab.keys.map((k) => el("option", { value: k, text: `${k} keys`, selected: k === "dna" })));
  const k = el("input", { type: "number", min: 1, max: tab.max_k, value: 5, class: "narrow", "aria-label": "neighbours" });
  const go = el("button", { text: "Identify" });
  const msg = el("div", { class: "msg" });
  const results = el("div", { class: "results" }, el("p", { class: "muted", text: "Paste a barcode, upload a photo, or click a point of the index." }));

  const modes = [];
  if (tab.queries.includes("dna")) modes.push(["dna", "DNA / FASTA", el("div", {}, dna, el("label", { class: "check" }, unknown, "read unknown characters as N (--dna-unknown n)"))]);
  if (tab.queries.includes("image")) modes.push(["image", "Photo", el("div", {}, file)]);
  let mode = modes[0][0];
  const switcher = el("div", { class: "seg" });
  const bodies = el("div", {});
  function pick(name) {
    mode = name;
    for (const b of switcher.children) b.classList.toggle("chosen", b.dataset.mode === name);
    bodies.replaceChildren(modes.find((m) => m[0] === name)[2]);
  }
  for (const [name, label] of modes) switcher.append(el("button", { text: label, dataset: { mode: name }, onclick: () => pick(name) }));
  pick(mode);

  // ---------------------------------------------------------------- projection
  const rankSelect = el("select", { "aria-label": "colour by rank" }, ranks.map((r) => el("option", { value: r, text: r, selected: r === "genus" })));
  const canvas = el("canvas", { width: 460, height: 400, class: "projection", "aria-label": "PCA of the index; click a point to query with it" });
  const legend = el("div", { class: "legend" });
  const projInfo = el("div", { class: "hint" });
  let projection = null;

  root.append(
    el("aside", { class: "panel query" }, el("h2", { text: "Query" }), switcher, bodies,
      el("div", { class: "row" }, keys, el("label", {}, "k ", k), go), msg,
      el("p", { class: "hint", text: `${tab.count} keys in the index (${tab.keys.join(", ")}); ${Object.keys(tab.novelty).length ? "novelty thresholds calibrated on val" : "no calibrated novelty threshold (run `retrieve evaluate --on val`)"}.` })),
    el("div", { class: "panel results-panel" }, el("h2", { text: "Identification" }), results),
    el("aside", { class: "panel" }, el("h2", { text: "Index" }),
      el("div", { class: "row" }, el("label", {}, "colour by ", rankSelect)), canvas, legend, projInfo));

  async function ask(options) {
    say(msg, "");
    go.disabled = true;
    try {
      const answer = await api(tab.id, options.point ? "point" : "query", options.body);
      if (!answer.superseded) drawResults(answer.results);
    } catch (error) {
      say(msg, error.message);
    } finally {
      go.disabled = false;
    }
  }

  go.addEventListener("click", () => {
    const settings = { keys: keys.value, k: k.value };
    if (mode === "dna") {
      ask({ body: { json: { dna: dna.value, unknown_as_n: unknown.checked, ...settings } } });
    } else {
      const chosen = file.files[0];
      if (!chosen) return say(msg, "choose an image file first");
      if (chosen.size > tab.max_upload) return say(msg, `${chosen.name} is ${(chosen.size / 2 ** 20).toFixed(1)} MiB; the limit is ${(tab.max_upload / 2 ** 20).toFixed(0)} MiB`);
      ask({ body: { file: chosen, params: settings } });
    }
  });

  function drawResults(list) {
    results.replaceChildren(...list.map((r) => {
      const flag = r.novel === null ? el("span", { class: "badge", text: "no novelty threshold" })
        : r.novel ? el("span", { class: "badge warn", text: "possibly novel species" }) : el("span", { class: "badge ok", text: "known species" });
      const threshold = r.threshold === null ? "" : ` (threshold ${num(r.threshold, 3)})`;
      const prediction = el("table", { class: "prediction" },
        el("tr", {}, el("th", { text: "rank" }), el("th", { text: "prediction" }), el("th", { text: "support" })),
        ranks.map((rank) => el("tr", {}, el("td", { text: rank }), el("td", { class: "taxon", text: r.prediction[rank].label.replace(/_/g, " ") }), el("td", { class: "num", text: pct(r.prediction[rank].support) }))));
      const neighbours = el("table", { class: "neighbours" },
        el("tr", {}, el("th", { text: "" }), el("th", { text: "#" }), el("th", { text: "cosine" }), el("th", { text: "id" }), ranks.map((rank) => el("th", { text: rank }))),
        r.neighbours.map((n, i) => el("tr", {},
          el("td", {}, tab.thumbnails && n.row !== null ? el("img", { src: `/api/${tab.id}/thumb?row=${n.row}`, alt: n.id, class: "key-thumb", loading: "lazy" }) : ""),
          el("td", { class: "num", text: i + 1 }), el("td", { class: "num", text: num(n.score, 3) }), el("td", { text: n.id }),
          ranks.map((rank) => el("td", { class: "taxon", text: n[rank].replace(/_/g, " ") })))));
      return el("div", { class: "result" },
        el("div", { class: "result-head" }, el("b", { text: `${r.modality} query ${r.query}` }), ` → ${r.keys} keys · best cosine ${num(r.best_score, 3)}${threshold} `, flag),
        el("div", { class: "two" }, prediction, el("div", { class: "hint", text: "Prediction: the nearest key's label at each rank; support: the cosine-weighted share of the k neighbours that agree." })),
        el("div", { class: "scroll-x" }, neighbours));
    }));
  }

  // ---------------------------------------------------------------- projection drawing and clicks
  async function loadProjection() {
    marked = null;
    try {
      projection = await api(tab.id, "projection", { params: { rank: rankSelect.value } });
      drawProjection();
    } catch (error) {
      projInfo.textContent = error.message;
    }
  }
  rankSelect.addEventListener("change", loadProjection);

  let placed = [];
  let marked = null;
  function drawProjection() {
    const p = projection;
    const ctx = canvas.getContext("2d");
    const W = canvas.width;
    const H = canvas.height;
    const pad = 16;
    ctx.clearRect(0, 0, W, H);
    const xs = p.x;
    const ys = p.y;
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    const X = (v) => pad + ((v - x0) / (x1 - x0 || 1)) * (W - 2 * pad);
    const Y = (v) => H - pad - ((v - y0) / (y1 - y0 || 1)) * (H - 2 * pad);
    const order = p.counts.map((c, i) => i).sort((a, b) => p.counts[b] - p.counts[a]);
    const colourOf = new Map(order.slice(0, 10).map((t, i) => [t, Charts.PALETTE[i]]));
    placed = xs.map((x, i) => [X(x), Y(ys[i]), i]);
    for (const [px, py, i] of placed) {
      ctx.fillStyle = colourOf.get(p.taxon[i]) || "#b8bcc2";
      ctx.globalAlpha = 0.8;
      ctx.beginPath();
      if (p.modality[i] === 0) ctx.arc(px, py, 4, 0, 2 * Math.PI);
      else ctx.rect(px - 3.5, py - 3.5, 7, 7);
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    if (marked !== null && placed[marked]) { // the key last clicked: a ring around it
      const [px, py] = placed[marked];
      ctx.strokeStyle = "#15312d";
      ctx.lineWidth = 2.5;
      ctx.beginPath();
      ctx.arc(px, py, 9, 0, 2 * Math.PI);
      ctx.stroke();
    }
    legend.replaceChildren(...order.slice(0, 10).map((t) => el("span", { class: "legend-item" }, el("span", { class: "swatch", style: `background:${colourOf.get(t)}` }), p.taxa[t])),
      order.length > 10 ? el("span", { class: "legend-item" }, el("span", { class: "swatch", style: "background:#b8bcc2" }), `${order.length - 10} other ${p.rank} taxa`) : "");
    const marks = p.modalities.map((m, i) => `${i === 0 ? "●" : "■"} ${m}`).join("  ");
    projInfo.textContent = `PCA of ${p.modalities.join(" and ")} keys, fitted jointly (as retrieve plot): ${p.shown} of ${p.total} records. ${marks}. Click a point to query with that key.`;
  }

  canvas.addEventListener("click", (event) => {
    if (!placed.length) return;
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * canvas.width;
    const y = ((event.clientY - box.top) / box.height) * canvas.height;
    let best = null;
    for (const [px, py, i] of placed) {
      const d = (px - x) ** 2 + (py - y) ** 2;
      if (d < 64 && (!best || d < best[0])) best = [d, i];
    }
    if (!best) return;
    const i = best[1];
    marked = i;
    drawProjection();
    ask({ point: true, body: { json: { modality: projection.modalities[projection.modality[i]], row: projection.row[i], keys: keys.value, k: k.value } } });
  });

  loadProjection();
  return {};
};
