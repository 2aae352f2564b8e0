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
    canvas: $("overlay"), placeholder: $("placeholder"), timing: $("timing"),
    downloadJson: $("download-json"), downloadPng: $("download-png"),
    objects: $("objects"), objectsEmpty: $("objects-empty"), rawText: $("raw-text"),
  };

  const state = {
    file: null,          // the chosen File, or null
    preview: null,       // the decoded picked image (HTMLImageElement), or null when it cannot be shown
    answer: null,        // the last successful answer (JSON)
    base: null,          // what the overlay is drawn on: an image, or null for a plain background
    layers: [],          // per object: {color, mask: canvas|null, visible}
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

  function renderOverlay() {
    const answer = state.answer;
    if (!answer) return;
    const width = answer.width, height = answer.height;
    drawBase(state.base, width, height);
    const ctx = el.canvas.getContext("2d");
    const scale = Math.max(width, height);
    // Sized to the picture: the canvas is shown scaled to the panel's width.
    const line = Math.max(1, Math.round(scale / 250));
    const font = Math.min(48, Math.max(8, Math.round(scale / 28)));
    answer.objects.forEach((obj, i) => {
      const layer = state.layers[i];
      if (layer.visible && layer.mask) ctx.drawImage(layer.mask, 0, 0);
    });
    ctx.font = "600 " + font + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    answer.objects.forEach((obj, i) => {
      const layer = state.layers[i];
      if (!layer.visible || !Array.isArray(obj.box)) return;
      const [x0, y0, x1, y1] = obj.box;
      ctx.lineWidth = line;
      ctx.strokeStyle = layer.color;
      ctx.strokeRect(x0 + line / 2, y0 + line / 2, Math.max(1, x1 - x0 - line), Math.max(1, y1 - y0 - line));
      const pad = Math.round(font / 4);
      const tag = fitText(ctx, obj.label + " " + Number(obj.score).toFixed(2), width - 2 * pad);
      const tw = ctx.measureText(tag).width + 2 * pad;
      const th = font + 2 * pad;
      const tx = Math.min(Math.max(0, x0), Math.max(0, width - tw));
      const ty = y0 - th >= 0 ? y0 - th : Math.min(y0, Math.max(0, height - th));
      ctx.fillStyle = layer.color;
      ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = textColorOn(layer.color);
      ctx.fillText(tag, tx + pad, ty + pad);
    });
    el.canvas.dataset.state = "result";
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
      return { color, mask, visible: true };
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
    el.canvas.toBlob((blob) => {
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
