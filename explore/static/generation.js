// Generation: a Phylo-NN run's tree (click a node to sample from it) and a CVAE's conditions and latent sliders.
"use strict";

(window.Views || (window.Views = {})).phylo = function (root, tab) {
  const { el, svg, api, say } = UI;
  const LEVEL_COLOURS = ["#1d4ed8", "#a21caf", "#c2410c", "#0f766e", "#4d7c0f", "#b45309"];
  const nodes = tab.tree.nodes;

  const n = el("input", { type: "number", min: 1, max: tab.max_n, value: 8, class: "narrow", "aria-label": "samples" });
  const seed = el("input", { type: "number", min: 0, value: 0, class: "narrow", "aria-label": "seed" });
  const temperature = el("input", { type: "number", min: 0.05, step: 0.05, value: 1, class: "narrow", "aria-label": "temperature" });
  const topK = el("input", { type: "number", min: 0, max: tab.vocab, value: tab.top_k, class: "narrow", "aria-label": "top-k" });
  const msg = el("div", { class: "msg" });
  const head = el("div", { class: "headline" }, el("span", { class: "muted", text: "Click a coloured node of the tree." }));
  const grid = el("div", { class: "samples" });
  const command = el("code", { class: "command" });
  const treeBox = el("div", { class: "tree" });
  let chosen = null;

  const levelKey = el("div", { class: "legend" }, Array.from({ length: tab.n_levels }, (_, level) => el("span", { class: "legend-item" },
    el("span", { class: "swatch round", style: `background:${LEVEL_COLOURS[level % LEVEL_COLOURS.length]}` }),
    tab.level_names ? `level ${level}: ${tab.level_names[level]}`
      : level === tab.n_levels - 1 ? `level ${level}: species` : `level ${level} (cut ${tab.cuts[level]})`)));

  root.append(
    el("div", { class: "panel tree-panel" }, el("h2", { text: "Phylogeny" }),
      el("p", { class: "hint", text: "Coloured nodes are groups of the model's levels; clicking one samples from it as `generate phylo --node` does: every image draws all its codes from the prior given the node, so the samples show the variation the model learnt for the clade. Grey nodes fall between levels." }),
      levelKey, treeBox),
    el("div", { class: "panel" }, el("h2", { text: "Samples" }),
      el("div", { class: "row" }, el("label", {}, "n ", n), el("label", {}, "seed ", seed), el("label", {}, "temperature ", temperature), el("label", {}, "top-k ", topK)),
      msg, head, grid, el("div", { class: "hint" }, "CLI: ", command)));

  // ---------------------------------------------------------------- the tree (rectangular cladogram)
  function drawTree() {
    const children = nodes.map(() => []);
    nodes.forEach((node, i) => { if (node.parent !== null) children[node.parent].push(i); });
    const leaves = nodes.map((node, i) => i).filter((i) => nodes[i].leaf);
    const rowH = 20;
    const labelW = 180;
    const width = 560;
    const height = leaves.length * rowH + 24;
    // a cladogram: leaves aligned on the right, each internal node one step left of its highest child
    const height_ = new Array(nodes.length).fill(0);
    for (let i = nodes.length - 1; i >= 0; i--) {
      for (const c of children[i]) height_[i] = Math.max(height_[i], height_[c] + 1);
    }
    const maxHeight = Math.max(...height_) || 1;
    const left = nodes[0].name ? 12 + 6.5 * nodes[0].name.length : 16; // room for the root's own label
    const X = (i) => left + ((maxHeight - height_[i]) / maxHeight) * (width - labelW - left - 16);
    const y = new Array(nodes.length);
    leaves.forEach((i, row) => { y[i] = 12 + row * rowH + rowH / 2; });
    for (let i = nodes.length - 1; i >= 0; i--) {
      if (!nodes[i].leaf) y[i] = children[i].reduce((s, c) => s + y[c], 0) / children[i].length;
    }
    const drawing = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "tree-svg" });
    nodes.forEach((node, i) => {
      if (node.parent === null) return;
      const p = node.parent;
      drawing.append(svg("path", { d: `M${X(p)},${y[p]}V${y[i]}H${X(i)}`, class: "branch" }));
    });
    nodes.forEach((node, i) => {
      const clickable = node.level !== null;
      const colour = clickable ? LEVEL_COLOURS[node.level % LEVEL_COLOURS.length] : "#c5c8cc";
      const dot = svg("circle", {
        cx: X(i), cy: y[i], r: clickable ? 5.5 : 3, fill: colour,
        class: `node ${clickable ? "clickable" : ""}`, "data-label": node.label, tabindex: clickable ? 0 : null,
      }, svg("title", { text: clickable ? `${node.label}: level ${node.level}, click to sample` : `${node.label}: not a group of any level` }));
      if (clickable) {
        dot.addEventListener("click", () => sample(node.label, dot));
        dot.addEventListener("keydown", (event) => { if (event.key === "Enter") sample(node.label, dot); });
      }
      drawing.append(dot);
      if (node.leaf) drawing.append(svg("text", { x: X(i) + 9, y: y[i] + 4, class: "leaf-label", text: node.label.replace(/_/g, " ") }));
      else if (node.name) drawing.append(svg("text", { x: X(i) - 7, y: y[i] - 7, class: "node-label", "text-anchor": "end", text: node.name }));
    });
    treeBox.append(drawing);
  }

  async function sample(label, dot) {
    say(msg, "");
    if (chosen) chosen.classList.remove("chosen");
    chosen = dot;
    if (dot) dot.classList.add("chosen");
    root.classList.add("loading");
    try {
      const answer = await api(tab.id, "sample", { json: { node: label, n: n.value, seed: seed.value, temperature: temperature.value, top_k: topK.value } });
      if (answer.superseded) return;
      const where = answer.level === answer.n_levels - 1 ? "" : ` (cut ${answer.cut})`;
      const members = answer.species.length === 1 ? "one species" : `${answer.species.length} species`;
      head.replaceChildren(el("span", { title: answer.species.join(", ") }, el("b", { text: answer.caption }), `${where} · ${members} · ${answer.images.length} samples, seeds ${answer.seeds[0]}–${answer.seeds[answer.seeds.length - 1]}`));
      grid.replaceChildren(...answer.images.map((src, i) => el("figure", { class: "sample" }, el("img", { src, alt: `seed ${answer.seeds[i]}`, class: "pixelated" }), el("figcaption", { text: `seed ${answer.seeds[i]}` }))));
      command.textContent = answer.command;
    } catch (error) {
      say(msg, error.message);
    } finally {
      root.classList.remove("loading");
    }
  }

  drawTree();
  return { sample };
};

(window.Views || (window.Views = {})).cvae = function (root, tab) {
  const { el, api, say, Latest, num, show } = UI;
  const classSelect = el("select", { "aria-label": "class" }, el("option", { value: "", text: "any class (not given)" }),
    tab.class_names.map((name, i) => el("option", { value: i, text: name.replace(/^\d+\./, "").replace(/_/g, " ") })));
  const attributes = new Map(); // index -> value (0 or 1); absent = not given
  const attrBox = el("div", { class: "attributes" });
  const n = el("input", { type: "number", min: 1, max: tab.max_n, value: 8, class: "narrow", "aria-label": "samples" });
  const seed = el("input", { type: "number", min: 0, value: 0, class: "narrow", "aria-label": "seed" });
  const go = el("button", { text: "Sample" });
  const msg = el("div", { class: "msg" });
  const grid = el("div", { class: "samples" });
  const live = el("img", { class: "pixelated live", alt: "traversal image" });
  const sliders = el("div", { class: "sliders" });
  const addDim = el("input", { type: "number", min: 0, max: tab.latent_dim - 1, placeholder: "dim", class: "narrow", "aria-label": "latent dimension to add" });
  const eps = new Map();

  // attributes grouped as CUB names them ("has_wing_color::blue"): one row per group, one toggle per value
  const groups = new Map();
  tab.attribute_names.forEach((name, i) => {
    const [group, value] = name.includes("::") ? name.split("::") : ["", name];
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push([value, i, name]);
  });
  for (const [group, items] of groups) {
    const row = el("div", { class: "attr-group" }, group ? el("span", { class: "attr-name", text: group.replace(/^has_/, "").replace(/_/g, " ") }) : null);
    for (const [value, i, name] of items) {
      const button = el("button", { class: "toggle", text: value.replace(/_/g, " "), title: `${name}: not given (click: 0, again: 1, again: not given)` });
      button.addEventListener("click", () => {
        const next = attributes.has(i) ? (attributes.get(i) === 0 ? 1 : null) : 0;
        if (next === null) attributes.delete(i); else attributes.set(i, next);
        button.classList.toggle("on", next === 1);
        button.classList.toggle("off", next === 0);
        button.title = `${name}: ${next === null ? "not given" : next} (click to change)`;
      });
      row.append(button);
    }
    attrBox.append(row);
  }

  root.append(
    el("aside", { class: "panel" }, el("h2", { text: "Condition" }), el("label", {}, "class ", classSelect),
      tab.attribute_names.length ? el("div", {}, el("h3", { text: "Attributes" }), el("p", { class: "hint" }, "Click to cycle: not given → ", el("span", { class: "toggle off mini", text: "0" }), " → ", el("span", { class: "toggle on mini", text: "1" }), ". Samples follow when you press Sample."), attrBox) : el("p", { class: "hint", text: "Trained without attribute conditions." }),
      el("div", { class: "row" }, el("label", {}, "n ", n), el("label", {}, "seed ", seed), go), msg),
    el("div", { class: "panel" }, el("h2", { text: "Samples" }), el("p", { class: "hint", text: "Image i from seed + i, as `generate cvae`." }), grid),
    el("aside", { class: "panel" }, el("h2", { text: "Latent traversal" }),
      el("p", { class: "hint", text: "The seed's prior draw with the chosen dimensions set (prior standard units); sliders for the dimensions with the largest held-out KL under this condition." }),
      live, sliders, el("div", { class: "row" }, addDim, el("button", { class: "secondary", text: "add dimension", onclick: () => addDimension() }))));

  function condition() {
    return { class: classSelect.value === "" ? null : Number(classSelect.value), attributes: Object.fromEntries(attributes), seed: seed.value };
  }

  const traverser = new Latest(async ({ body, t0 }) => {
    const answer = await api(tab.id, "traverse", { json: body });
    if (answer.superseded) return;
    await show(live, answer.image);
    window.exploreTimings.push({ tab: tab.id, ms: performance.now() - t0 });
  });
  function renderLive() {
    traverser.push({ body: { ...condition(), eps: Object.fromEntries(eps) }, t0: performance.now() });
  }

  function drawSliders(dims) {
    sliders.replaceChildren();
    for (const d of dims) if (!eps.has(d)) eps.set(d, 0);
    for (const [d, value] of eps) {
      const out = el("output", { text: num(value, 2) });
      const range = el("input", { type: "range", min: -3, max: 3, step: 0.05, value, "aria-label": `latent dimension ${d}` });
      range.addEventListener("input", () => {
        eps.set(d, Number(range.value));
        out.textContent = num(Number(range.value), 2);
        renderLive();
      });
      sliders.append(el("div", { class: "slider compact" }, el("span", { class: "concept-name", text: `z${d}` }), range, out));
    }
  }

  function addDimension() {
    const d = Number(addDim.value);
    if (addDim.value === "" || !Number.isInteger(d) || d < 0 || d >= tab.latent_dim) {
      return say(msg, `latent dimension must be in 0..${tab.latent_dim - 1}`);
    }
    addDim.value = "";
    drawSliders([d]);
    renderLive();
  }

  async function sampleNow() {
    say(msg, "");
    root.classList.add("loading");
    try {
      const answer = await api(tab.id, "sample", { json: { ...condition(), n: n.value } });
      if (answer.superseded) return;
      grid.replaceChildren(...answer.images.map((src, i) => el("figure", { class: "sample" }, el("img", { src, alt: `seed ${answer.seeds[i]}`, class: "pixelated" }), el("figcaption", { text: `seed ${answer.seeds[i]}` }))));
      eps.clear();
      drawSliders(answer.dims);
      renderLive();
    } catch (error) {
      say(msg, error.message);
    } finally {
      root.classList.remove("loading");
    }
  }
  go.addEventListener("click", sampleNow);
  classSelect.addEventListener("change", sampleNow);
  sampleNow();
  return {};
};
