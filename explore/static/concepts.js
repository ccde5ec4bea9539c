// Concepts (VisCoIN): gallery or upload -> f's and Theta's top-5, concept relevance with the tau rule, one
// slider per explaining concept (the image regenerated as it moves), heat maps and concept cards.
"use strict";

(window.Views || (window.Views = {})).concepts = function (root, tab) {
  const { el, api, say, Latest, pct, num, show } = UI;
  const PAGE = 96;
  const SLIDER_MAX = 4;
  let shown = PAGE;
  let current = null; // the server's explanation of the chosen image
  let focus = null; // the concept whose heat map and card are shown
  const multipliers = new Map(); // concept -> multiplier (every slider shown)
  const added = new Set(); // concepts added by index (removable)

  // ---------------------------------------------------------------- layout
  const filter = el("input", { type: "search", placeholder: "filter by class…", list: `${tab.id}-classes`, "aria-label": "filter by class" });
  const classList = el("datalist", { id: `${tab.id}-classes` }, tab.class_names.map((n) => el("option", { value: n })));
  const upload = el("input", { type: "file", accept: "image/*", class: "visually-hidden", "aria-label": "upload an image" });
  const gallery = el("div", { class: "gallery" });
  const more = el("button", { class: "link", text: "show more" });
  const galleryInfo = el("div", { class: "hint" });
  const galleryMsg = el("div", { class: "msg" });

  const figures = {};
  function figure(key, caption) {
    const img = el("img", { alt: caption, class: `pixelated ${key}` });
    const cap = el("figcaption", {}, el("b", { text: caption }), el("span", { class: "p" }));
    figures[key] = { img, cap, box: el("figure", { class: `shot ${key}` }, img, cap) };
    return figures[key].box;
  }
  const imageRow = el("div", { class: "shots" },
    figure("original", "original"), figure("reconstruction", "reconstruction"),
    figure("amplified", "amplified"), figure("heat", "heat map"));
  const headline = el("div", { class: "headline" }, el("span", { class: "muted", text: "Choose an image from the gallery, or upload one." }));

  const thetaTop = el("div", { class: "chips" });
  const fTop = el("table", { class: "top5" });
  const sliders = el("div", { class: "sliders" });
  const addInput = el("input", { type: "number", min: 0, max: tab.n_concepts - 1, placeholder: "index", "aria-label": "concept index to add", class: "narrow" });
  const addButton = el("button", { text: "add concept" });
  const resetButton = el("button", { class: "secondary", text: "reset to ×1" });
  const slidersMsg = el("div", { class: "msg" });
  const command = el("code", { class: "command" });
  const relevance = el("div", { class: "relevance" });
  const card = el("div", { class: "card-body" }, el("p", { class: "muted", text: "Click a concept (a bar, a slider's name) to see where it fires and what it detects." }));

  root.append(
    el("aside", { class: "panel gallery-panel" },
      el("h2", { text: "Image" }),
      el("div", { class: "row" }, filter, el("label", { class: "button secondary", text: "upload…" }, upload)),
      classList, galleryInfo, galleryMsg, gallery, more),
    el("div", { class: "work" },
      el("div", { class: "panel" }, headline, imageRow),
      el("div", { class: "panel two" },
        el("div", {}, el("h3", { text: "Explained class (Theta's top-5)" }), el("p", { class: "hint", text: "Click a class to explain it instead." }), thetaTop),
        el("div", {}, el("h3", { text: "f's top-5 on the original" }), fTop)),
      el("div", { class: "panel" },
        el("h3", { text: "Concept multipliers" }),
        el("p", { class: "hint", text: `One slider per explaining concept (normalised relevance > τ = ${tab.tau}); the image is regenerated through Ω and G as you drag.` }),
        sliders,
        el("div", { class: "row" }, addInput, addButton, resetButton),
        slidersMsg,
        el("div", { class: "hint" }, "CLI: ", command)),
      el("div", { class: "panel" }, relevance)),
    el("aside", { class: "panel card" }, el("h2", { text: "Concept" }), card));

  // ---------------------------------------------------------------- gallery
  function matches() {
    const query = filter.value.trim().toLowerCase();
    const out = [];
    tab.labels.forEach((label, i) => {
      if (!query || tab.class_names[label].toLowerCase().includes(query)) out.push(i);
    });
    return out;
  }

  function drawGallery() {
    const found = matches();
    gallery.replaceChildren(...found.slice(0, shown).map((i) => el("button", {
      class: `thumb ${current && current.index === i ? "chosen" : ""}`, title: `#${i} · ${tab.class_names[tab.labels[i]]}`,
      dataset: { index: i }, onclick: () => choose({ index: i }),
    }, el("img", { src: `/api/${tab.id}/image?i=${i}&size=thumb`, alt: `image ${i}`, loading: "lazy", class: "pixelated" }))));
    galleryInfo.textContent = `${found.length} of ${tab.n_images} ${tab.split} images (${tab.dataset})`;
    more.hidden = found.length <= shown;
  }
  filter.addEventListener("input", () => { shown = PAGE; drawGallery(); });
  more.addEventListener("click", () => { shown += PAGE; drawGallery(); });
  upload.addEventListener("change", () => {
    const file = upload.files[0];
    upload.value = "";
    if (!file) return;
    if (file.size > tab.max_upload) {
      say(galleryMsg, `${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; the limit is ${(tab.max_upload / 2 ** 20).toFixed(0)} MiB`);
      return;
    }
    choose({ file });
  });

  // ---------------------------------------------------------------- choosing and explaining
  async function choose({ index, file }) {
    say(galleryMsg, "");
    root.classList.add("loading");
    try {
      current = file ? await api(tab.id, "select", { file }) : await api(tab.id, "select", { json: { index } });
      if (current.superseded) return;
      resetSliders();
      drawExplanation();
      drawGallery();
    } catch (error) {
      say(galleryMsg, error.message);
    } finally {
      root.classList.remove("loading");
    }
  }

  async function explainClass(target) {
    try {
      const answer = await api(tab.id, "explain", { json: { target } });
      if (answer.superseded) return;
      current = answer;
      resetSliders();
      drawExplanation();
    } catch (error) {
      say(slidersMsg, error.message);
    }
  }

  function resetSliders() {
    multipliers.clear();
    added.clear();
    for (const k of current.selected) multipliers.set(k, 1);
  }

  function drawExplanation() {
    const c = current;
    const truth = c.label === null ? `uploaded: ${c.image_id}` : `image #${c.index}, true class ${c.label_name}`;
    const verdict = c.target === c.theta_prediction ? "Theta's prediction" : "chosen class";
    headline.replaceChildren(el("span", {}, truth, " · explaining ", el("b", { text: c.target_name }), ` (${verdict})`));
    show(figures.original.img, c.original);
    figures.original.cap.querySelector(".p").textContent = `p_f = ${pct(c.p_original)}`;
    show(figures.reconstruction.img, c.reconstruction);
    figures.reconstruction.cap.querySelector(".p").textContent = `p_f = ${pct(c.p_reconstruction)}`;
    show(figures.amplified.img, c.reconstruction);
    figures.amplified.cap.querySelector(".p").textContent = `p_f = ${pct(c.p_reconstruction)}`;
    figures.heat.img.removeAttribute("src");
    figures.heat.cap.querySelector(".p").textContent = "";
    thetaTop.replaceChildren(...c.top_theta.map((t) => el("button", {
      class: `chip ${t.class === c.target ? "chosen" : ""}`, onclick: () => explainClass(t.class),
    }, t.name, el("span", { class: "p", text: pct(t.p) }))));
    fTop.replaceChildren(el("tr", {}, el("th", { text: "class" }), el("th", { text: "p_f" })),
      ...c.top_f.map((t) => el("tr", { class: t.class === c.target ? "chosen" : "" }, el("td", { text: t.name }), el("td", { class: "num", text: pct(t.p) }))));
    drawSliders();
    drawRelevance();
    if (focus !== null) focusConcept(focus);
  }

  // ---------------------------------------------------------------- sliders
  const renderer = new Latest(async ({ values, t0 }) => {
    const answer = await api(tab.id, "render", { json: { multipliers: Object.fromEntries(values) } });
    if (answer.superseded || !current || answer.version !== current.version) return; // replaced, or another image
    await show(figures.amplified.img, answer.image);
    figures.amplified.cap.querySelector(".p").textContent = `p_f = ${pct(answer.p)}`;
    window.exploreTimings.push({ tab: tab.id, ms: performance.now() - t0, server_ms: answer.server_ms });
    root.dataset.rendered = String(Number(root.dataset.rendered || 0) + 1);
  });

  function render() {
    say(slidersMsg, "");
    renderer.push({ values: new Map(multipliers), t0: performance.now() });
    updateCommand();
  }

  function drawSliders() {
    sliders.replaceChildren();
    if (!multipliers.size) {
      const best = current.relevance.reduce((b, v, k) => (v > current.relevance[b] ? k : b), 0);
      sliders.append(el("p", { class: "muted", text: `No concept passes τ = ${tab.tau} for this class (highest normalised relevance ${num(current.relevance[best], 2)}); add one by index.` }));
    }
    for (const [k, value] of multipliers) {
      const out = el("output", { text: `×${value.toFixed(2)}` });
      const range = el("input", {
        type: "range", min: 0, max: SLIDER_MAX, step: 0.05, value, "aria-label": `multiplier of concept ${k}`,
        dataset: { concept: k },
      });
      range.addEventListener("input", () => {
        multipliers.set(k, Number(range.value));
        out.textContent = `×${Number(range.value).toFixed(2)}`;
        render();
      });
      const name = el("button", { class: `link concept-name ${focus === k ? "chosen" : ""}`, text: `concept ${k}`, onclick: () => focusConcept(k) });
      const r = current.relevance[k];
      const remove = added.has(k) ? el("button", { class: "link", title: "remove", text: "✕", onclick: () => { multipliers.delete(k); added.delete(k); drawSliders(); render(); } }) : null;
      sliders.append(el("div", { class: "slider" }, name, range, out, el("span", { class: "hint", text: `r ${num(r, 2)}` }), remove));
    }
    updateCommand();
  }

  function addConcept() {
    const text = addInput.value.trim();
    const k = Number(text);
    if (!current) return say(slidersMsg, "choose an image first");
    if (text === "" || !Number.isInteger(k) || k < 0 || k >= tab.n_concepts) {
      return say(slidersMsg, `concept ${text || "(empty)"} is out of range: this bundle has K=${tab.n_concepts} concepts (0..${tab.n_concepts - 1})`);
    }
    if (multipliers.has(k)) return say(slidersMsg, `concept ${k} has a slider already`, "info");
    multipliers.set(k, 1);
    added.add(k);
    addInput.value = "";
    drawSliders();
    focusConcept(k);
  }
  addButton.addEventListener("click", addConcept);
  addInput.addEventListener("keydown", (event) => { if (event.key === "Enter") addConcept(); });
  resetButton.addEventListener("click", () => {
    if (!current) return;
    for (const k of multipliers.keys()) multipliers.set(k, 1);
    drawSliders();
    render();
  });

  // amplify scales its chosen concepts by one multiplier and leaves the others at x1: the sliders off x1 must agree
  function updateCommand() {
    if (!current || current.index === null) {
      command.textContent = current ? "(an uploaded image has no index in the split)" : "";
      return;
    }
    const moved = [...multipliers].filter(([, m]) => m !== 1);
    const values = [...new Set(moved.map(([, m]) => m))];
    const ks = moved.length ? moved.map(([k]) => k) : [...multipliers.keys()];
    if (values.length > 1 || !ks.length) {
      command.textContent = "(amplify scales its concepts by one multiplier: set the moved sliders alike to get its command)";
      return;
    }
    command.textContent = `python main.py amplify --bundle ${tab.source} --split ${tab.split} --image-indices ${current.index} --concept-indices ${ks.join(",")} --multipliers ${values.length ? values[0] : 1}`;
  }

  // ---------------------------------------------------------------- relevance chart
  function drawRelevance() {
    const c = current;
    const order = c.relevance.map((v, k) => k).sort((a, b) => Math.abs(c.relevance[b]) - Math.abs(c.relevance[a]));
    const shownBars = order.slice(0, 32);
    const chosen = new Set(c.selected);
    relevance.replaceChildren();
    Charts.bars(relevance, {
      title: `Relevance of each concept to “${c.target_name}” (the ${shownBars.length} largest |r| of K=${tab.n_concepts})`,
      xlabel: "concept (bars in colour pass the τ rule: they explain the class)",
      ylabel: "r / max |r|",
      threshold: tab.tau,
      thresholdLabel: `τ = ${tab.tau}`,
      bars: shownBars.map((k) => ({
        key: k, value: c.relevance[k], label: String(k),
        cls: `${chosen.has(k) ? "explaining" : c.relevance[k] < 0 ? "negative" : ""} ${focus === k ? "focus" : ""}`,
        tip: `concept ${k}\nnormalised relevance ${num(c.relevance[k], 3)}\nr = activation × Θ weight = ${num(c.raw_relevance[k], 4)}\nactivation ${num(c.activation[k], 4)}`,
      })),
      onclick: (k) => focusConcept(Number(k)),
      width: 720,
      height: 230,
    });
  }

  // ---------------------------------------------------------------- heat map and card
  let cardTimer = null;
  async function focusConcept(k) {
    focus = k;
    if (current) {
      drawRelevance();
      for (const b of sliders.querySelectorAll(".concept-name")) b.classList.toggle("chosen", b.textContent === `concept ${k}`);
      try {
        const heat = await api(tab.id, "heatmap", { json: { concept: k } });
        if (!heat.superseded) {
          await show(figures.heat.img, heat.image);
          figures.heat.cap.querySelector(".p").textContent = `#${k} · max ${num(heat.activation, 2)}`;
        }
      } catch (error) {
        say(slidersMsg, error.message);
      }
    }
    loadCard(k);
  }

  async function loadCard(k) {
    clearTimeout(cardTimer);
    let answer;
    try {
      answer = await api(tab.id, "card", { params: { concept: k } });
    } catch (error) {
      card.replaceChildren(el("div", { class: "msg error", text: error.message }));
      return;
    }
    if (focus !== k) return;
    if (answer.status === "computing") {
      const done = answer.total ? `${answer.done} / ${answer.total} batches` : "starting";
      card.replaceChildren(el("h3", { text: `concept ${k}` }), el("p", { class: "progress", text: `${answer.message}: ${done}, ${answer.seconds} s` }));
      cardTimer = setTimeout(() => loadCard(k), 400);
      return;
    }
    const images = el("div", { class: "gallery small" }, answer.images.map((im) => el("button", {
      class: "thumb", title: `#${im.index} · ${im.label_name} · activation ${num(im.activation, 3)}`, onclick: () => choose({ index: im.index }),
    }, el("img", { src: `/api/${tab.id}/image?i=${im.index}&size=thumb`, alt: `image ${im.index}`, class: "pixelated" }),
      el("span", { class: "under", text: num(im.activation, 2) }))));
    const attrs = answer.has_attributes
      ? el("table", { class: "attrs" }, el("tr", {}, el("th", { text: "attribute" }), el("th", { text: "AUC" })),
        answer.attributes.map((a) => el("tr", {}, el("td", { text: a.name }), el("td", { class: "num", text: num(a.auc, 3) }))))
      : el("p", { class: "muted", text: "The dataset has no attribute labels." });
    card.replaceChildren(
      el("h3", { text: `concept ${k}` }),
      el("p", { class: "hint", text: `activation over the ${answer.n_images} ${tab.split} images: mean ${num(answer.mean_activation, 3)}, max ${num(answer.max_activation, 3)}` }),
      el("h4", { text: "Where it fires most" }), images,
      el("h4", { text: "Attributes it detects best" }),
      el("p", { class: "hint", text: "ROC AUC of the activation as a detector of each attribute (0.5: unrelated; below 0.5: fires when it is absent)." }),
      attrs);
  }

  drawGallery();
  return { choose };
};
