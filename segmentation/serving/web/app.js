// The page that tries the segmentation service. Plain JavaScript, no build step, no external assets.
// Every API URL is relative to the page (served under /ui/), so the page works behind any prefix.
(function () {
  "use strict";

  const API = new URL("../", window.location.href);
  const KEY_STORAGE = "segmentation.apiKey";
  const PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
    "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
  ];
  const MASK_OPACITY = 0.45;

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("form"), file: $("image-file"), fileName: $("file-name"), drop: $("dropzone"),
    url: $("image-url"), prompt: $("prompt"), model: $("model"), modelStatus: $("model-status"),
    reloadModels: $("reload-models"), key: $("api-key"), submit: $("submit"), cancel: $("cancel"),
    progress: $("progress"), status: $("status"), error: $("error"), result: $("result"),
    canvas: $("overlay"), chips: $("chips"), placeholder: $("placeholder"), timing: $("timing"),
    downloadJson: $("download-json"), downloadPng: $("download-png"),
    objects: $("objects"), objectsEmpty: $("objects-empty"), rawText: $("raw-text"),
  };

  const state = {
    file: null,          // the chosen File, or null
    preview: null,       // the decoded picked image (HTMLImageElement), or null when it cannot be shown
    answer: null,        // the last successful answer (JSON)
    base: null,          // what the overlay is drawn on: an image, or null for a plain background
    layers: [],          // per object: {color, mask: canvas|null, visible, cover: Float32Array|null}
    controller: null,    // AbortController of the request in flight
    ticker: null,
    downloadStem: "segmentation",
    modelCount: 0,
  };

  // ---------------------------------------------------------------- API key

  function apiKey() {
    return el.key.value.trim();
  }

  function authHeaders() {
    const key = apiKey();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function loadKey() {
    try {
      el.key.value = window.sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (err) {
      // Storage can be disabled; the field still works for this page.
    }
  }

  function saveKey() {
    try {
      if (apiKey()) window.sessionStorage.setItem(KEY_STORAGE, apiKey());
      else window.sessionStorage.removeItem(KEY_STORAGE);
    } catch (err) {
      // ignore: storage disabled
    }
  }

  // ---------------------------------------------------------------- errors in plain words

  function messageFromBody(text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch (err) {
      const plain = (text || "").trim();
      return plain.length > 500 ? plain.slice(0, 500) + "…" : plain;
    }
    if (Array.isArray(data)) {
      const parts = data.map((item) => (item && typeof item === "object" && "error" in item)
        ? String(item.error) : JSON.stringify(item));
      return parts.join("; ");
    }
    if (data && typeof data === "object") {
      if (typeof data.error === "string") return data.error;
      if (typeof data.detail === "string") return data.detail;
      if (data.error) return JSON.stringify(data.error);
    }
    return typeof data === "string" ? data : JSON.stringify(data);
  }

  function describeHttpError(status, text) {
    const message = messageFromBody(text) || "no details given";
    const hints = {
      400: "The server refused the request: " + message,
      401: "The server needs a valid API key: " + message + ". Enter it in the API key field.",
      403: "The API key is not allowed to do this: " + message,
      404: "The server has no such endpoint (is this page served by the segmentation service?): " + message,
      413: "The image or request is too large: " + message,
      422: "The server could not use the request: " + message,
      429: "The server is handling too many requests; try again in a moment. (" + message + ")",
      503: "The model is busy or restarting; try again in a few seconds. (" + message + ")",
      504: "The request took too long and was stopped by the server. (" + message + ")",
    };
    const sentence = hints[status] || (status >= 500 ? "The server failed: " + message : "Request failed: " + message);
    return sentence + " [HTTP " + status + "]";
  }

  function describeNetworkError(err) {
    if (err && err.name === "AbortError") return "Cancelled.";
    return "Could not reach the server (" + (err && err.message ? err.message : "network error") +
      "). Check that it is running and that this page was opened from it.";
  }

  async function callApi(path, body) {
    // -> parsed JSON; throws Error(plain message) on any failure.
    const init = { method: "POST", headers: authHeaders(), body };
    if (!(body instanceof FormData)) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (state.controller) init.signal = state.controller.signal;
    let response;
    try {
      response = await fetch(new URL(path, API), init);
    } catch (err) {
      throw new Error(describeNetworkError(err));
    }
    let text;
    try {
      text = await response.text();
    } catch (err) {
      throw new Error(describeNetworkError(err));
    }
    if (!response.ok) throw new Error(describeHttpError(response.status, text));
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new Error("The server answered with something that is not JSON [HTTP " + response.status + "].");
    }
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  function setStatus(message) {
    el.status.textContent = message;
  }

  // ---------------------------------------------------------------- models

  async function loadModels() {
    el.model.disabled = true;
    el.reloadModels.disabled = true;
    el.model.replaceChildren(new Option("Loading models…", ""));
    delete el.model.dataset.loaded;
    el.modelStatus.textContent = "";
    try {
      const data = await callApi("models", {});
      const models = Array.isArray(data.models) ? data.models : [];
      if (!models.length) throw new Error("The server lists no models.");
      el.model.replaceChildren(...models.map((m) => {
        // A LoRA adapter names its base: "acme/cat-lora (LoRA of google/paligemma2-3b-mix-448)".
        const note = m.default ? " (default)" : m.base ? " (LoRA of " + m.base + ")" : "";
        const option = new Option(m.id + note, m.id, Boolean(m.default), Boolean(m.default));
        option.dataset.imageSize = String(m.image_size);
        if (m.base) option.dataset.base = String(m.base);
        return option;
      }));
      state.modelCount = models.length;
      describeModel();
      el.model.dataset.loaded = "true";
    } catch (err) {
      el.model.replaceChildren(new Option("Server default model", ""));
      el.modelStatus.textContent = "Could not load the model list. " + err.message;
      el.model.dataset.loaded = "false";
    } finally {
      el.model.disabled = false;
      el.reloadModels.disabled = false;
    }
  }

  function describeModel() {
    const option = el.model.selectedOptions[0];
    if (!option || !option.dataset.imageSize) return;
    const count = state.modelCount === 1 ? "1 model served" : state.modelCount + " models served";
    const adapter = option.dataset.base ? " It is a LoRA adapter of " + option.dataset.base + "." : "";
    el.modelStatus.textContent = count + "; this one sees pictures at " + option.dataset.imageSize + "×" +
      option.dataset.imageSize + " px." + adapter;
  }

  el.model.addEventListener("change", describeModel);

  // ---------------------------------------------------------------- picking the image

  function decodeImage(src) {
    const img = new Image();
    img.decoding = "async";
    img.src = src;
    return img.decode().then(() => img);
  }

  async function useFile(file) {
    if (!file) return;
    state.file = file;
    state.preview = null;
    el.url.value = "";
    el.fileName.textContent = file.name + " (" + Math.max(1, Math.round(file.size / 1024)) + " KB)";
    state.downloadStem = (file.name.replace(/\.[^.]*$/, "") || "image") + "-segmentation";
    showError("");
    try {
      state.preview = await decodeImage(URL.createObjectURL(file));
    } catch (err) {
      state.preview = null; // e.g. a format the browser cannot show: the server returns the picture
    }
    if (state.file !== file) return; // another pick meanwhile
    clearResult();
    if (state.preview) {
      drawBase(state.preview, state.preview.naturalWidth, state.preview.naturalHeight);
      el.canvas.dataset.state = "preview";
      el.placeholder.hidden = true;
    } else {
      el.placeholder.textContent = "This browser cannot show " + file.name + "; the server's copy is shown with the answer.";
    }
  }

  function clearFile() {
    state.file = null;
    state.preview = null;
    el.file.value = "";
    el.fileName.textContent = "";
  }

  el.file.addEventListener("change", () => useFile(el.file.files[0]));

  el.url.addEventListener("input", () => {
    if (el.url.value.trim() && state.file) {
      clearFile();
      clearResult();
      el.placeholder.textContent = "The server fetches the URL; the picture is shown with the answer.";
    }
    state.downloadStem = "segmentation";
  });

  ["dragenter", "dragover"].forEach((type) => el.drop.addEventListener(type, (event) => {
    event.preventDefault();
    el.drop.classList.add("dragging");
  }));
  ["dragleave", "dragend"].forEach((type) => el.drop.addEventListener(type, () => el.drop.classList.remove("dragging")));
  el.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    el.drop.classList.remove("dragging");
    const file = Array.from(event.dataTransfer.files || []).find((f) => f.type.startsWith("image/"));
    if (file) useFile(file);
    else showError("That is not an image file. Drop a PNG, JPEG, WebP… picture.");
  });
  // An image pasted anywhere on the page (e.g. a screenshot) is used as the input.
  document.addEventListener("paste", (event) => {
    const file = Array.from((event.clipboardData && event.clipboardData.files) || []).find((f) => f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      useFile(file);
    }
  });

  // ---------------------------------------------------------------- drawing

  function drawBase(image, width, height) {
    el.canvas.width = width;
    el.canvas.height = height;
    const ctx = el.canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    if (image) ctx.drawImage(image, 0, 0, width, height);
    else {
      ctx.fillStyle = "#c8ccd4";
      ctx.fillRect(0, 0, width, height);
    }
  }

  async function maskLayer(mask, color, width, height) {
    // A canvas with the object's pixels in its color, translucent; null when there is no PNG mask.
    if (!mask || mask.format !== "png" || !mask.data) return null;
    const img = await decodeImage("data:image/png;base64," + mask.data);
    const layer = document.createElement("canvas");
    layer.width = width;
    layer.height = height;
    const ctx = layer.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(img, 0, 0, width, height);
    const pixels = ctx.getImageData(0, 0, width, height);
    const d = pixels.data;
    const r = parseInt(color.slice(1, 3), 16);
    const g = parseInt(color.slice(3, 5), 16);
    const b = parseInt(color.slice(5, 7), 16);
    const alpha = Math.round(255 * MASK_OPACITY);
    for (let i = 0; i < d.length; i += 4) {
      const on = d[i] >= 128;
      d[i] = r;
      d[i + 1] = g;
      d[i + 2] = b;
      d[i + 3] = on ? alpha : 0;
    }
    ctx.putImageData(pixels, 0, 0);
    return layer;
  }

  function textColorOn(hex) {
    const r = parseInt(hex.slice(1, 3), 16), g = parseInt(hex.slice(3, 5), 16), b = parseInt(hex.slice(5, 7), 16);
    return (0.299 * r + 0.587 * g + 0.114 * b) > 150 ? "#000000" : "#ffffff";
  }

  function fitText(ctx, text, maxWidth) {
    // The tag, shortened with an ellipsis in the middle of the label when wider than the picture.
    if (ctx.measureText(text).width <= maxWidth) return text;
    const score = text.slice(text.lastIndexOf(" "));
    let label = text.slice(0, text.lastIndexOf(" "));
    while (label.length > 1 && ctx.measureText(label + "…" + score).width > maxWidth) label = label.slice(0, -1);
    return label + "…" + score;
  }

  function chipText(obj) {
    return obj.label + " " + Number(obj.score).toFixed(2);
  }

  // ---------------------------------------------------------------- label chips: where they go
  //
  // One chip (label and score) per object shown, placed near its box where it covers no other chip and
  // as little of the objects as it can: above or inside the box's top, below or inside its bottom, at
  // its left or right edge, or pushed next to a chip already in the way. Positions are in picture
  // pixels, so the same placement serves the page (chips sized in CSS pixels, whatever the picture's
  // own size) and the downloaded PNG (chips sized to the picture).

  const COVER_CELLS = 128; // the object map's resolution along the picture's long side

  function overlapArea(a, b) {
    const w = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x);
    const h = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
    return w > 0 && h > 0 ? w * h : 0;
  }

  function gapToBox(rect, box) {
    // How far the chip is from its object's box: 0 when it touches or overlaps it.
    const dx = Math.max(0, box[0] - (rect.x + rect.w), rect.x - box[2]);
    const dy = Math.max(0, box[1] - (rect.y + rect.h), rect.y - box[3]);
    return Math.hypot(dx, dy);
  }

  function placeChips(items, width, height, cover) {
    // items: [{box: [x0, y0, x1, y1], w, h}] -> [{x, y, w, h}] (same order; picture pixels).
    // cover(rect): picture pixels of objects under rect.
    const placed = [];
    const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), Math.max(lo, hi));
    items.forEach((item) => {
      const [x0, y0, x1, y1] = item.box;
      const w = Math.min(item.w, width), h = Math.min(item.h, height);
      const bases = [];
      [y0 - h, y0, y1, y1 - h].forEach((y, yi) => [x0, x1 - w].forEach((x, xi) => bases.push({ x, y, rank: 2 * yi + xi })));
      const candidates = [];
      const add = (x, y, rank) => candidates.push({ x: clamp(x, 0, width - w), y: clamp(y, 0, height - h), w, h, rank });
      bases.forEach((b) => {
        add(b.x, b.y, b.rank);
        // A chip in the way: try right next to it, on each side.
        placed.forEach((r) => {
          if (!overlapArea({ x: clamp(b.x, 0, width - w), y: clamp(b.y, 0, height - h), w, h }, r)) return;
          add(r.x + r.w, b.y, b.rank + 8);
          add(r.x - w, b.y, b.rank + 8);
          add(b.x, r.y + r.h, b.rank + 8);
          add(b.x, r.y - h, b.rank + 8);
        });
      });
      let best = null, bestCost = Infinity;
      candidates.forEach((c) => {
        let clash = 0;
        placed.forEach((r) => { clash += overlapArea(c, r); });
        // Chips never on chips if there is any room; then objects covered as little as possible; then
        // close to the box; then the usual spot (above its top left corner).
        const cost = 1000 * clash + cover(c) + 4 * w * gapToBox(c, item.box) + 0.01 * w * h * c.rank;
        if (cost < bestCost) {
          bestCost = cost;
          best = c;
        }
      });
      placed.push({ x: best.x, y: best.y, w, h });
    });
    return placed;
  }

  function coverMap(width, height) {
    // Summed-area table of how much object (mask, or box without a mask) lies under each cell of a
    // coarse grid over the picture: cover(rect) in picture pixels, at any rect, in constant time.
    const cell = Math.max(1, Math.max(width, height) / COVER_CELLS);
    const gw = Math.max(1, Math.ceil(width / cell)), gh = Math.max(1, Math.ceil(height / cell));
    const sums = new Float64Array((gw + 1) * (gh + 1));
    const grid = new Float32Array(gw * gh);
    state.answer.objects.forEach((obj, i) => {
      const layer = state.layers[i];
      if (!layer || !layer.visible) return;
      const cover = layer.cover || boxCover(obj.box, cell, gw, gh);
      if (!cover) return;
      for (let k = 0; k < grid.length; k++) grid[k] += cover[k];
    });
    for (let y = 0; y < gh; y++) {
      for (let x = 0; x < gw; x++) {
        sums[(y + 1) * (gw + 1) + x + 1] = grid[y * gw + x] + sums[y * (gw + 1) + x + 1] +
          sums[(y + 1) * (gw + 1) + x] - sums[y * (gw + 1) + x];
      }
    }
    return (rect) => {
      const cx0 = Math.max(0, Math.floor(rect.x / cell)), cy0 = Math.max(0, Math.floor(rect.y / cell));
      const cx1 = Math.min(gw, Math.ceil((rect.x + rect.w) / cell)), cy1 = Math.min(gh, Math.ceil((rect.y + rect.h) / cell));
      if (cx1 <= cx0 || cy1 <= cy0) return 0;
      const at = (x, y) => sums[y * (gw + 1) + x];
      return (at(cx1, cy1) - at(cx0, cy1) - at(cx1, cy0) + at(cx0, cy0)) * cell * cell;
    };
  }

  function boxCover(box, cell, gw, gh) {
    if (!Array.isArray(box)) return null;
    const cover = new Float32Array(gw * gh);
    for (let y = Math.floor(box[1] / cell); y < Math.min(gh, Math.ceil(box[3] / cell)); y++) {
      for (let x = Math.floor(box[0] / cell); x < Math.min(gw, Math.ceil(box[2] / cell)); x++) cover[y * gw + x] = 1;
    }
    return cover;
  }

  function maskCover(layer, width, height) {
    // The mask's share of each grid cell (0..1), read from its layer scaled down to the grid.
    const cell = Math.max(1, Math.max(width, height) / COVER_CELLS);
    const gw = Math.max(1, Math.ceil(width / cell)), gh = Math.max(1, Math.ceil(height / cell));
    const small = document.createElement("canvas");
    small.width = gw;
    small.height = gh;
    const ctx = small.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(layer, 0, 0, gw, gh);
    const alpha = ctx.getImageData(0, 0, gw, gh).data;
    const cover = new Float32Array(gw * gh);
    for (let k = 0; k < cover.length; k++) cover[k] = alpha[4 * k + 3] / (255 * MASK_OPACITY);
    return cover;
  }

  function shownObjects() {
    // [index, object] of the objects ticked in the list that have a box.
    return state.answer.objects.map((obj, i) => [i, obj]).filter(([i, obj]) => state.layers[i].visible && Array.isArray(obj.box));
  }

  // ---------------------------------------------------------------- drawing

  function drawShapes(width, height) {
    // The picture with masks and boxes (no text: the chips are HTML), in picture pixels.
    drawBase(state.base, width, height);
    const ctx = el.canvas.getContext("2d");
    const line = Math.max(1, Math.round(Math.max(width, height) / 250));
    state.answer.objects.forEach((obj, i) => {
      const layer = state.layers[i];
      if (layer.visible && layer.mask) ctx.drawImage(layer.mask, 0, 0);
    });
    ctx.lineWidth = line;
    shownObjects().forEach(([i, obj]) => {
      const [x0, y0, x1, y1] = obj.box;
      ctx.strokeStyle = state.layers[i].color;
      ctx.strokeRect(x0 + line / 2, y0 + line / 2, Math.max(1, x1 - x0 - line), Math.max(1, y1 - y0 - line));
    });
  }

  function renderOverlay() {
    if (!state.answer) return;
    drawShapes(state.answer.width, state.answer.height);
    el.canvas.dataset.state = "result";
    layoutChips();
  }

  function pictureRect() {
    // Where the picture is drawn inside the canvas element (object-fit: contain), in CSS pixels
    // relative to .canvas-wrap, and its scale (CSS pixels per picture pixel).
    const width = state.answer.width, height = state.answer.height;
    const boxW = el.canvas.clientWidth, boxH = el.canvas.clientHeight;
    const scale = Math.min(boxW / width, boxH / height);
    return {
      left: el.canvas.offsetLeft + (boxW - width * scale) / 2,
      top: el.canvas.offsetTop + (boxH - height * scale) / 2,
      width: width * scale, height: height * scale, scale,
    };
  }

  function layoutChips() {
    // The chips as HTML over the canvas: sharp at any zoom, sized to the picture as shown.
    el.chips.replaceChildren();
    if (!state.answer || el.canvas.dataset.state !== "result") return;
    const rect = pictureRect();
    if (!(rect.scale > 0)) return;
    const shown = shownObjects();
    const font = Math.round(Math.min(13, Math.max(10, Math.min(rect.width, rect.height) / 24)));
    const chips = shown.map(([i, obj]) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.index = String(i);
      chip.textContent = chipText(obj);
      chip.title = chip.textContent;
      chip.style.fontSize = font + "px";
      chip.style.maxWidth = Math.floor(rect.width) + "px";
      chip.style.background = state.layers[i].color;
      chip.style.color = textColorOn(state.layers[i].color);
      el.chips.append(chip);
      return chip;
    });
    // Measured with fractions (offsetWidth rounds), plus one CSS pixel between neighbouring chips.
    const items = shown.map(([, obj], k) => {
      const size = chips[k].getBoundingClientRect();
      return { box: obj.box, w: (size.width + 1) / rect.scale, h: (size.height + 1) / rect.scale };
    });
    const spots = placeChips(items, state.answer.width, state.answer.height, coverMap(state.answer.width, state.answer.height));
    spots.forEach((spot, k) => {
      chips[k].style.left = (rect.left + spot.x * rect.scale) + "px";
      chips[k].style.top = (rect.top + spot.y * rect.scale) + "px";
    });
  }

  function exportCanvas() {
    // The overlay at the picture's own size with the chips drawn in, sized to the picture.
    const width = state.answer.width, height = state.answer.height;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    ctx.drawImage(el.canvas, 0, 0);
    const font = Math.min(64, Math.max(10, Math.round(Math.max(width, height) / 45)));
    const pad = Math.round(font / 4);
    ctx.font = "600 " + font + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    const shown = shownObjects();
    const tags = shown.map(([, obj]) => fitText(ctx, chipText(obj), width - 2 * pad));
    const items = shown.map(([, obj], k) => ({ box: obj.box, w: ctx.measureText(tags[k]).width + 2 * pad, h: font + 2 * pad }));
    placeChips(items, width, height, coverMap(width, height)).forEach((spot, k) => {
      const color = state.layers[shown[k][0]].color;
      ctx.fillStyle = color;
      ctx.fillRect(spot.x, spot.y, spot.w, spot.h);
      ctx.fillStyle = textColorOn(color);
      ctx.fillText(tags[k], spot.x + pad, spot.y + pad);
    });
    return out;
  }

  if (window.ResizeObserver) {
    let pending = false;
    new ResizeObserver(() => {
      if (pending) return;
      pending = true;
      window.requestAnimationFrame(() => {
        pending = false;
        layoutChips();
      });
    }).observe(el.canvas);
  }

  function objectItem(obj, i) {
    const layer = state.layers[i];
    const li = document.createElement("li");
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.dataset.index = String(i);
    box.addEventListener("change", () => {
      layer.visible = box.checked;
      renderOverlay();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = layer.color;
    swatch.setAttribute("aria-hidden", "true");
    const name = document.createElement("span");
    name.className = "obj-label";
    name.textContent = obj.label + " " + Number(obj.score).toFixed(2);
    const meta = document.createElement("span");
    meta.className = "obj-meta";
    const b = obj.box || [];
    meta.textContent = "box " + b.join(", ") + (obj.area != null ? " · " + obj.area + " px" : "") +
      (obj.mask ? "" : " · no mask");
    label.append(box, swatch, name, meta);
    li.append(label);
    return li;
  }

  function clearResult() {
    state.answer = null;
    state.layers = [];
    el.objects.replaceChildren();
    el.objectsEmpty.textContent = "No answer yet.";
    el.objectsEmpty.hidden = false;
    el.rawText.textContent = "";
    el.timing.textContent = "";
    el.downloadJson.disabled = true;
    el.downloadPng.disabled = true;
    el.canvas.dataset.state = "empty";
    el.chips.replaceChildren();
    el.placeholder.hidden = false;
    el.placeholder.textContent = "The picture and what the model found appear here.";
  }

  async function showAnswer(answer, base, elapsedMs) {
    if (!answer || !Array.isArray(answer.objects) || !answer.width || !answer.height) {
      throw new Error("The server's answer lacks width, height or objects.");
    }
    state.answer = answer;
    state.base = base;
    state.layers = await Promise.all(answer.objects.map(async (obj, i) => {
      const color = PALETTE[i % PALETTE.length];
      let mask = null;
      try {
        mask = await maskLayer(obj.mask, color, answer.width, answer.height);
      } catch (err) {
        mask = null; // an undecodable mask: the box is still drawn
      }
      return { color, mask, visible: true, cover: mask ? maskCover(mask, answer.width, answer.height) : null };
    }));
    el.placeholder.hidden = true;
    renderOverlay();
    el.objects.replaceChildren(...answer.objects.map(objectItem));
    el.objectsEmpty.hidden = answer.objects.length > 0;
    el.objectsEmpty.textContent = "The model found no objects for this prompt.";
    el.rawText.textContent = answer.text || "(empty)";
    el.timing.textContent = "Round trip " + Math.round(elapsedMs) + " ms · " + answer.objects.length +
      (answer.objects.length === 1 ? " object" : " objects") + " · " + answer.width + "×" + answer.height +
      " px · " + answer.model + " · “" + answer.prompt + "”";
    el.downloadJson.disabled = false;
    el.downloadPng.disabled = false;
    // On a narrow screen the result sits below the form: bring it into view.
    if (window.matchMedia("(max-width: 800px)").matches && el.result.getBoundingClientRect().top > window.innerHeight / 2) {
      el.result.scrollIntoView({ block: "start" });
    }
  }

  // ---------------------------------------------------------------- submitting

  function setBusy(busy) {
    el.submit.disabled = busy;
    el.submit.textContent = busy ? "Working…" : "Run";
    el.cancel.hidden = !busy;
    el.progress.hidden = !busy;
    el.result.setAttribute("aria-busy", busy ? "true" : "false");
    el.form.setAttribute("aria-busy", busy ? "true" : "false");
    if (state.ticker) window.clearInterval(state.ticker);
    state.ticker = null;
    if (busy) {
      const started = performance.now();
      setStatus("Working… the model is running.");
      state.ticker = window.setInterval(() => {
        setStatus("Working… " + Math.round((performance.now() - started) / 1000) + " s");
      }, 1000);
    }
  }

  function task() {
    const checked = el.form.querySelector('input[name="task"]:checked');
    return checked ? checked.value : "segment";
  }

  el.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (state.controller) return;
    showError("");
    const url = el.url.value.trim();
    const prompt = el.prompt.value.trim();
    if (!state.file && !url) {
      showError("Choose an image first: pick a file, drop one on the box, or paste an image URL.");
      el.file.focus();
      return;
    }
    if (!prompt) {
      showError("Type at least one class to look for, e.g. “cat ; dog”.");
      el.prompt.focus();
      return;
    }
    saveKey();
    // Text parts are sent JSON-encoded, as BentoML's own client does: the server JSON-decodes every
    // text part, so a prompt such as `123` or `true` would otherwise change type.
    const form = new FormData();
    const base = state.file ? state.preview : null;
    if (state.file) form.append("image", state.file, state.file.name);
    else form.append("image_url", JSON.stringify(url));
    form.append("prompt", JSON.stringify(prompt));
    if (el.model.value) form.append("model", JSON.stringify(el.model.value));
    const chosenTask = task();
    if (chosenTask === "segment") form.append("mask_format", JSON.stringify("png"));
    // Without a picture the browser can show (a URL, or a format it cannot decode), ask the server
    // for the picture it used (the model's input size) and draw on that, stretched to full size.
    if (!base) form.append("return_input_image", "true");

    state.controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    try {
      const answer = await callApi(chosenTask, form);
      const elapsed = performance.now() - started;
      let picture = base;
      if (!picture && answer.input_image) {
        try {
          picture = await decodeImage("data:image/png;base64," + answer.input_image);
        } catch (err) {
          picture = null;
        }
      }
      await showAnswer(answer, picture, elapsed);
      setStatus("Done: " + answer.objects.length + (answer.objects.length === 1 ? " object" : " objects") +
        " found in " + Math.round(elapsed) + " ms.");
    } catch (err) {
      setStatus("");
      showError(err.message);
    } finally {
      state.controller = null;
      setBusy(false);
    }
  });

  el.cancel.addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });

  // ---------------------------------------------------------------- downloads

  function download(blob, name) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  el.downloadJson.addEventListener("click", () => {
    if (!state.answer) return;
    // The server's answer as received, less the picture this page asked for only to draw on.
    const { input_image: _unused, ...answer } = state.answer;
    download(new Blob([JSON.stringify(answer, null, 2)], { type: "application/json" }), state.downloadStem + ".json");
  });

  el.downloadPng.addEventListener("click", () => {
    if (!state.answer) return;
    exportCanvas().toBlob((blob) => {
      if (blob) download(blob, state.downloadStem + "-overlay.png");
      else showError("The browser could not make a PNG of the overlay.");
    }, "image/png");
  });

  // ---------------------------------------------------------------- start

  el.reloadModels.addEventListener("click", loadModels);
  el.key.addEventListener("change", () => {
    saveKey();
    if (el.model.dataset.loaded !== "true") loadModels();
  });
  loadKey();
  loadModels();
})();
