// Runs: training and validation curves of run directories, overlaid, refreshed while a run is still going.
"use strict";

(window.Views || (window.Views = {})).runs = function (root, tab) {
  const { el, api, say, num } = UI;
  const REFRESH_MS = 3000;
  // first shown: the first run and the others of its command (comparable curves)
  const first = tab.runs[0];
  const chosen = new Set(tab.runs.filter((r) => r === first || (r.command && r.command === first.command)).slice(0, tab.max_runs).map((r) => r.id));
  let runs = tab.runs;
  let signature = null;
  let timer = null;

  const list = el("div", { class: "runlist" });
  const msg = el("div", { class: "msg" });
  const note = el("div", { class: "hint" });
  const panels = el("div", { class: "curves" });
  const legend = el("div", { class: "legend" });
  const summary = el("table", { class: "summary" });

  root.append(
    el("aside", { class: "panel" }, el("h2", { text: "Runs" }),
      el("p", { class: "hint", text: `Under ${tab.source}; tick runs to overlay them (at most ${tab.max_runs}).` }), list, note),
    el("div", { class: "panel" }, el("h2", { text: "Curves" }), msg, legend, panels,
      el("h3", { text: "Summary (as `logs` prints it)" }), summary));

  function drawList() {
    list.replaceChildren(...runs.map((run) => {
      const box = el("input", { type: "checkbox", checked: chosen.has(run.id), "aria-label": run.name });
      box.addEventListener("change", () => {
        if (box.checked) chosen.add(run.id); else chosen.delete(run.id);
        signature = null;
        load();
      });
      return el("label", { class: "run" }, box, el("span", { class: "run-name", text: run.name }),
        el("span", { class: `badge ${run.status === "running" ? "live" : run.status === "failed" ? "warn" : ""}`, text: run.status }),
        run.command ? el("span", { class: "hint", text: run.command }) : "");
    }));
  }

  async function load() {
    clearTimeout(timer);
    try {
      const listing = await api(tab.id, "list");
      const before = runs.map((r) => r.name).join("|");
      runs = listing.runs;
      if (runs.map((r) => r.name).join("|") !== before) drawList();
      else runs.forEach((r, i) => { list.children[i].querySelector(".badge").textContent = r.status; });
      const ids = [...chosen].filter((id) => id < runs.length).sort((a, b) => a - b);
      const answer = await api(tab.id, "curves", { params: { runs: ids.join(","), since: signature || "" } });
      if (!answer.unchanged) {
        signature = answer.signature;
        draw(answer);
      }
      say(msg, "");
    } catch (error) {
      say(msg, error.message);
    }
    const live = runs.some((r) => chosen.has(r.id) && r.status === "running");
    note.textContent = live ? `refreshing every ${REFRESH_MS / 1000} s while a chosen run is running` : "";
    timer = setTimeout(load, live ? REFRESH_MS : 4 * REFRESH_MS);
  }

  function draw(answer) {
    const runIds = [...new Set(answer.panels.flatMap((p) => p.series.map((s) => s.run)))].sort((a, b) => a - b);
    const colour = new Map(runIds.map((id, i) => [id, Charts.PALETTE[i % Charts.PALETTE.length]]));
    const dash = { train: null, val: "5 3", test: "2 2" };
    const names = new Map(answer.panels.flatMap((p) => p.series.map((s) => [s.run, s.name])));
    legend.replaceChildren(...runIds.map((id) => el("span", { class: "legend-item" }, el("span", { class: "swatch", style: `background:${colour.get(id)}` }), names.get(id))),
      el("span", { class: "legend-item hint", text: "train ——   val – – –   test ·····" }));
    panels.replaceChildren();
    for (const p of answer.panels) {
      const box = el("div", { class: "chart-box" });
      // a panel holding several quantities (e.g. acc and epoch_acc) colours each (run, quantity) apart
      const metrics = [...new Set(p.series.map((s) => s.metric))];
      const pairs = [...new Set(p.series.map((s) => `${s.run}|${s.metric}`))];
      const colourOf = (s) => (metrics.length > 1 ? Charts.PALETTE[pairs.indexOf(`${s.run}|${s.metric}`) % Charts.PALETTE.length] : colour.get(s.run));
      const series = p.series.map((s) => ({ name: `${s.name} ${s.split}${metrics.length > 1 ? ": " + s.metric : ""}`, x: s.x, y: s.y, color: colourOf(s), dash: dash[s.split] || null }));
      Charts.line(box, { title: p.panel, xlabel: "optimiser step", ylabel: p.ylabel, series });
      if (metrics.length > 1) {
        const seen = new Map(p.series.map((s) => [`${s.run}|${s.metric}`, { name: runIds.length > 1 ? `${s.name}: ${s.metric}` : s.metric, color: colourOf(s) }]));
        box.append(Charts.legend([...seen.values()]));
      }
      panels.append(box);
    }
    if (!answer.panels.length) panels.append(el("p", { class: "muted", text: "Tick a run to see its curves." }));
    for (const problem of answer.problems) panels.append(el("p", { class: "msg error", text: `${problem.name}: ${problem.error}` }));
    summary.replaceChildren(el("tr", {}, ["run", "split", "metric", "points", "last", "best", "best step"].map((h) => el("th", { text: h }))),
      ...answer.summary.map((row) => el("tr", {}, el("td", { text: row.name }), el("td", { text: row.split }), el("td", { text: row.metric }),
        el("td", { class: "num", text: row.points }), el("td", { class: "num", text: num(row.last, 4) }), el("td", { class: "num", text: num(row.best, 4) }), el("td", { class: "num", text: row.best_step }))));
  }

  drawList();
  load();
  return {};
};
