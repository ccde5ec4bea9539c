// The page's frame: one tab per source given to `python main.py explore`, each view built on first show.
"use strict";

(async function boot() {
  const { el, api } = UI;
  const LABELS = { concepts: "Concepts", retrieval: "Retrieval", phylo: "Phylo-NN", cvae: "CVAE", runs: "Runs" };
  const nav = document.getElementById("tabs");
  const main = document.getElementById("views");
  const status = document.getElementById("status");
  let described;
  try {
    const response = await fetch("/api/tabs", { headers: { "X-Explore-Session": UI.session } });
    described = await response.json();
    if (!response.ok) throw new Error(described.error || response.status);
  } catch (error) {
    main.replaceChildren(el("p", { class: "msg error", text: `cannot load the tabs: ${error.message}` }));
    return;
  }
  status.textContent = `device ${described.device}`;
  const built = new Map();
  window.explore = { views: built, tabs: described.tabs };

  function open(id) {
    for (const button of nav.children) {
      const on = button.dataset.tab === id;
      button.classList.toggle("chosen", on);
      button.setAttribute("aria-selected", String(on));
    }
    for (const section of main.children) section.hidden = section.dataset.tab !== id;
    if (!built.has(id)) {
      const tab = described.tabs.find((t) => t.id === id);
      const section = el("section", { class: `view ${tab.kind}`, dataset: { tab: id }, role: "tabpanel" });
      main.append(section);
      built.set(id, window.Views[tab.kind](section, tab));
    }
    history.replaceState(null, "", `#${id}`);
  }

  for (const tab of described.tabs) {
    nav.append(el("button", { role: "tab", dataset: { tab: tab.id }, title: tab.source, onclick: () => open(tab.id) },
      el("span", { class: "kind", text: LABELS[tab.kind] || tab.kind }), el("span", { class: "name", text: tab.title })));
  }
  const wanted = location.hash.slice(1);
  open(described.tabs.some((t) => t.id === wanted) ? wanted : described.tabs[0].id);
  window.exploreReadyAt = performance.now(); // the bench's page-load figure: tabs drawn, first view built
  document.body.dataset.ready = "1";
})();
