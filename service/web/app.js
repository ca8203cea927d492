// The try-it page's script. It builds the form from what the service says (GET models for the
// tasks, defaults and choices; the OpenAPI document for every field of POST enhance, when the
// service publishes it), submits with `Prefer: respond-async`, shows the job's progress from
// GET jobs/{id}, then the result beside the input. Every URL is relative to the page, so the
// page works behind a proxy that mounts the service under a path. Text from the service goes
// into the page as text (textContent), never as HTML. The API key lives in `state.key` only.
"use strict";

(() => {
  const POLL_MS = 300;
  const $ = (id) => document.getElementById(id);
  const state = {
    key: "",
    models: null, // GET models
    fieldSchema: null, // the multipart fields of POST enhance (OpenAPI), or null
    inputs: [], // the form's field inputs
    objectURLs: [],
    busy: false,
  };

  class ProblemError extends Error {
    constructor(problem) {
      super(problem.title);
      this.problem = problem;
    }
  }

  function withKey(headers) {
    const all = new Headers(headers || {});
    if (state.key) all.set("Authorization", `Bearer ${state.key}`);
    return all;
  }

  async function problemOf(response) {
    const problem = { status: response.status, title: `HTTP ${response.status}`, detail: "" };
    try {
      const body = await response.json();
      if (body && body.title) problem.title = `${body.title} (${response.status})`;
      if (body && body.detail) problem.detail = String(body.detail);
    } catch (_) {
      problem.detail = response.statusText || "the answer was not a problem document";
    }
    return problem;
  }

  // fetch() that throws a ProblemError for an error answer (202 is not one: a job in progress).
  async function api(path, init = {}) {
    let response;
    try {
      response = await fetch(path, { ...init, headers: withKey(init.headers), cache: "no-store" });
    } catch (error) {
      throw new ProblemError({ status: 0, title: "The service cannot be reached", detail: String(error.message || error) });
    }
    if (!response.ok) {
      const problem = await problemOf(response);
      if (response.status === 401) $("key-row").hidden = false;
      throw new ProblemError(problem);
    }
    return response;
  }

  function showProblem(problem) {
    $("problem-title").textContent = problem.title;
    $("problem-detail").textContent = problem.detail;
    $("problem").hidden = false;
  }

  function say(text) {
    $("message").textContent = text;
  }

  // ---- the form, from GET models and the OpenAPI document ----------------------------------
  async function loadModels() {
    try {
      state.models = await (await api("models")).json();
    } catch (error) {
      say(error.problem.status === 401 ? "Enter the API key to start." : "The models could not be read.");
      showProblem(error.problem);
      return;
    }
    $("problem").hidden = true;
    state.fieldSchema = await loadFieldSchema();
    const task = $("task");
    task.replaceChildren();
    for (const entry of state.models.models) {
      task.append(new Option(`${entry.task} (${entry.name})`, entry.task, false, entry.task === state.models.default_task));
    }
    const formats = (state.models.choices || {}).input_format;
    if (formats) $("image").accept = formats.map((f) => `image/${f}`).join(",");
    buildFields();
    say("Choose a photo.");
    updateSubmit();
  }

  async function loadFieldSchema() {
    try {
      const doc = await (await fetch("openapi.json", { cache: "no-store" })).json();
      return doc.paths["/enhance"].post.requestBody.content["multipart/form-data"].schema.properties;
    } catch (_) {
      return null; // the service does not publish it (FLOWIE_DOCS=false): GET models alone
    }
  }

  function currentModel() {
    return state.models.models.find((m) => m.task === $("task").value) || state.models.models[0];
  }

  // A property's alternatives (pydantic writes `X | None` as anyOf [X, null]).
  function variants(prop) {
    return [prop, ...(prop.anyOf || [])].filter((p) => p.type !== "null");
  }

  function choicesFor(name, prop) {
    const model = currentModel();
    // A model's family decides its samplers (GET models lists them per model).
    const perModel = (model.choices && model.choices[name]) || (name === "sampler" && model.samplers);
    const shared = (state.models.choices || {})[name];
    if (perModel || shared) return perModel || shared;
    for (const p of variants(prop)) if (p.enum) return p.enum;
    return null;
  }

  function fieldNames() {
    if (state.fieldSchema) return Object.keys(state.fieldSchema).filter((n) => n !== "image" && n !== "task");
    // Without the OpenAPI document: what GET models names (input_format is the upload's, not a field).
    const names = new Set([...Object.keys(state.models.choices || {}), ...Object.keys(currentModel().defaults || {})]);
    names.delete("input_format");
    names.add("seed");
    return [...names];
  }

  function buildFields() {
    const box = $("fields");
    const kept = Object.fromEntries(state.inputs.map((i) => [i.name, i.value]));
    box.replaceChildren();
    state.inputs = [];
    const defaults = currentModel().defaults || {};
    for (const name of fieldNames()) {
      const prop = (state.fieldSchema && state.fieldSchema[name]) || {};
      const choices = choicesFor(name, prop);
      const fallback = prop.default !== undefined && prop.default !== null ? prop.default : defaults[name];
      const id = `field-${name}`;
      let input;
      if (choices) {
        input = document.createElement("select");
        const label = fallback !== undefined ? `default (${fallback})` : "default";
        input.append(new Option(label, ""));
        for (const choice of choices) input.append(new Option(String(choice), String(choice)));
      } else {
        input = document.createElement("input");
        const kind = variants(prop).map((p) => p.type).find((t) => t === "integer" || t === "number");
        input.type = kind || typeof fallback === "number" || name === "seed" ? "number" : "text";
        input.step = kind === "integer" || name === "seed" ? "1" : "any";
        for (const p of variants(prop)) {
          if (p.minimum !== undefined) input.min = String(p.minimum);
          if (p.maximum !== undefined) input.max = String(p.maximum);
        }
        input.placeholder = name === "seed" ? "random" : fallback !== undefined ? `default (${fallback})` : "default";
      }
      input.id = id;
      input.name = name;
      // A value chosen before the task changed stays when the new task offers it.
      if (kept[name] !== undefined && (!choices || choices.map(String).includes(kept[name]))) input.value = kept[name];
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = name.replace(/_/g, " ");
      box.append(label, input);
      if (prop.description) {
        const hint = document.createElement("span");
        hint.className = "hint";
        hint.textContent = prop.description;
        box.append(hint);
        label.title = prop.description;
      }
      state.inputs.push(input);
    }
  }

  function updateSubmit() {
    $("submit").disabled = state.busy || !state.models || !$("image").files.length;
  }

  // ---- a job: submit, follow, show -----------------------------------------------------
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function showProgress(status) {
    const bar = $("progress");
    const progress = status.progress;
    bar.hidden = false;
    say(`Job ${status.id}: ${status.status}`);
    if (!progress) {
      bar.removeAttribute("value"); // indeterminate
      $("progress-text").textContent = status.status === "queued" ? "waiting for a worker" : "";
      return;
    }
    const parts = [progress.stage || "starting"];
    if (progress.steps) parts.push(`step ${progress.step} of ${progress.steps}`);
    if (progress.tiles) parts.push(`tiles ${progress.tiles_done} of ${progress.tiles}`);
    $("progress-text").textContent = parts.join(" · ");
    if (progress.steps) bar.value = progress.step / progress.steps;
    else bar.removeAttribute("value");
  }

  async function follow(id) {
    for (;;) {
      const response = await api(`jobs/${encodeURIComponent(id)}`);
      const status = await response.json();
      if (response.status === 200) return status;
      showProgress(status);
      await sleep(POLL_MS);
    }
  }

  function objectURL(blob) {
    const url = URL.createObjectURL(blob);
    state.objectURLs.push(url);
    return url;
  }

  function forgetImages() {
    for (const url of state.objectURLs) URL.revokeObjectURL(url);
    state.objectURLs = [];
  }

  // "queue;dur=1.2, compute;dur=30" -> [["queue", "1.2 ms"], ["compute", "30 ms"]]
  function serverTiming(header) {
    return (header || "").split(",").map((part) => part.trim()).filter(Boolean).map((part) => {
      const [name, ...params] = part.split(";").map((s) => s.trim());
      const dur = params.find((p) => p.startsWith("dur="));
      return [name, dur ? `${dur.slice(4)} ms` : ""];
    });
  }

  function fact(list, name, value) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }

  async function showResult(status, response, file) {
    const blob = await response.blob();
    const after = $("after");
    const before = $("before");
    const url = objectURL(blob);
    after.src = url;
    await after.decode();
    const compare = $("compare");
    compare.classList.remove("no-before");
    before.src = objectURL(file);
    try {
      await before.decode();
    } catch (_) {
      compare.classList.add("no-before"); // a format this browser cannot show (TIFF): the result alone
    }
    const download = $("download");
    download.href = url;
    download.download = `flowie-${status.id}.${status.format || "png"}`;
    const facts = $("facts");
    facts.replaceChildren();
    fact(facts, "size", `${after.naturalWidth} × ${after.naturalHeight} (the service says ${status.width} × ${status.height})`);
    fact(facts, "seed", response.headers.get("X-Seed") || String(status.seed));
    // The job's queue and compute time; `total` is the result request's own.
    for (const [name, value] of serverTiming(response.headers.get("Server-Timing"))) fact(facts, `Server-Timing ${name}`, value);
    for (const [stage, seconds] of Object.entries(status.timings || {})) {
      fact(facts, `stage: ${stage}`, `${(seconds * 1000).toFixed(1)} ms`);
    }
    $("result").hidden = false;
    applyZoom();
  }

  async function submit(event) {
    event.preventDefault();
    const file = $("image").files[0];
    if (!file || state.busy) return;
    const body = new FormData();
    body.append("image", file, file.name);
    body.append("task", $("task").value);
    for (const input of state.inputs) if (input.value !== "") body.append(input.name, input.value);
    state.busy = true;
    updateSubmit();
    $("problem").hidden = true;
    $("progress-text").textContent = "";
    say("Sending…");
    try {
      const accepted = await (await api("enhance", { method: "POST", body, headers: { Prefer: "respond-async" } })).json();
      showProgress(accepted);
      const status = await follow(accepted.id);
      const response = await api(`jobs/${encodeURIComponent(accepted.id)}/result`, { headers: { Accept: "image/*" } });
      forgetImages();
      await showResult(status, response, file);
      say(`Job ${status.id}: done`);
      $("progress").value = 1;
      $("progress-text").textContent = "finished";
    } catch (error) {
      say("The job did not finish.");
      $("progress").hidden = true;
      showProblem(error.problem || { title: "The page failed", detail: String(error.message || error) });
    } finally {
      state.busy = false;
      updateSubmit();
    }
  }

  // ---- views: fit to width or 100%, slider or side by side -----------------------------
  function applyZoom() {
    const actual = document.querySelector('[data-zoom="actual"]').getAttribute("aria-pressed") === "true";
    const side = $("side-by-side").checked;
    const compare = $("compare");
    compare.classList.toggle("fit", !actual);
    compare.classList.toggle("side", side);
    const width = $("after").naturalWidth;
    compare.style.width = actual && width ? `${side ? 2 * width + 8 : width}px` : "";
  }

  function start() {
    $("form").addEventListener("submit", submit);
    $("image").addEventListener("change", updateSubmit);
    $("task").addEventListener("change", buildFields);
    $("use-key").addEventListener("click", () => {
      state.key = $("api-key").value.trim();
      loadModels();
    });
    $("api-key").addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        $("use-key").click();
      }
    });
    $("slider").addEventListener("input", (event) => {
      $("compare").style.setProperty("--split", `${event.target.value}%`);
    });
    for (const button of document.querySelectorAll("[data-zoom]")) {
      button.addEventListener("click", () => {
        for (const other of document.querySelectorAll("[data-zoom]")) other.setAttribute("aria-pressed", String(other === button));
        applyZoom();
      });
    }
    $("side-by-side").addEventListener("change", applyZoom);
    loadModels();
  }

  start();
})();
