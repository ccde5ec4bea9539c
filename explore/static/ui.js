// Shared helpers of the page: DOM building, the API client (with this tab's session id), messages, and
// `Latest`, which keeps one request in flight per control and sends only the newest value when it returns.
"use strict";

const UI = (() => {
  // One id per page load (not per browser): two tabs never share server-side state.
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  const session = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") node.style.cssText = value; // CSSOM: allowed under the page's CSP
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (value === true) node.setAttribute(key, "");
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) if (child) node.append(child);
    return node;
  }

  class ApiError extends Error {}

  // `api(tab, action, {params, json, file})`: GET without a body, POST with JSON or a file (raw body).
  async function api(tab, action, options = {}) {
    const query = options.params ? "?" + new URLSearchParams(options.params).toString() : "";
    const init = { method: "GET", headers: { "X-Explore-Session": session } };
    if (options.json !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.json);
    } else if (options.file !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = options.file.type || "application/octet-stream";
      init.headers["X-Filename"] = encodeURIComponent(options.file.name || "upload");
      init.body = options.file;
    }
    let response;
    try {
      response = await fetch(`/api/${tab}/${action}${query}`, init);
    } catch (error) {
      throw new ApiError("the server does not answer (was it stopped?)");
    }
    let data;
    try {
      data = await response.json();
    } catch (error) {
      throw new ApiError(`the server answered ${response.status} without JSON`);
    }
    if (!response.ok) throw new ApiError(data.error || `request failed (${response.status})`);
    return data;
  }

  // An inline message under a control: kind "error" | "info" | "" (hidden).
  function say(target, text, kind = "error") {
    target.textContent = text || "";
    target.className = `msg ${text ? kind : ""}`;
  }

  // One request in flight; while it runs, only the newest pushed value is kept and sent next.
  class Latest {
    constructor(send) {
      this.send = send;
      this.busy = false;
      this.pending = false;
      this.value = undefined;
    }
    push(value) {
      this.value = value;
      this.pending = true;
      if (!this.busy) this.run();
    }
    async run() {
      this.busy = true;
      while (this.pending) {
        const value = this.value;
        this.pending = false;
        try {
          await this.send(value);
        } catch (error) {
          console.error(error);
        }
      }
      this.busy = false;
    }
  }

  function pct(p) {
    return p === null || p === undefined ? "–" : `${(100 * p).toFixed(1)}%`;
  }

  function num(x, digits = 3) {
    if (x === null || x === undefined) return "–";
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return x.toFixed(digits);
  }

  // Wait until an <img> shows `src` (decoded), so that timings end when the new image is on screen.
  async function show(img, src) {
    img.src = src;
    try {
      await img.decode();
    } catch (error) {
      /* a broken image still counts as shown */
    }
  }

  function panel(title, ...children) {
    return el("div", { class: "panel" }, title ? el("h3", { text: title }) : null, ...children);
  }

  return { session, el, svg, api, ApiError, say, Latest, pct, num, show, panel };
})();

// Timings the bench reads: one entry per slider image shown (from the input event to the image on screen).
window.exploreTimings = [];
