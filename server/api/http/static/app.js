// The playground: a form built from the server's own input schema (/openapi.json), requests through fal's queue
// routes, progress and previews from the status stream, results, cancel, copy-as snippets and a history.
// No build step and no CDN: this file is served as committed.
"use strict";

const APP = "fal-ai/pixart-sigma";
const ORDER = ["prompt", "negative_prompt", "image_size", "num_inference_steps", "guidance_scale", "seed", "style",
  "scheduler", "num_images", "enable_safety_checker", "output_format", "step_cache", "preview_every"];
const LABELS = {
  prompt: "Prompt", negative_prompt: "Negative prompt", image_size: "Size", num_inference_steps: "Steps",
  guidance_scale: "Guidance scale", seed: "Seed", style: "Style", scheduler: "Scheduler", num_images: "Images",
  enable_safety_checker: "Safety checker", output_format: "Output format", step_cache: "Step cache",
  preview_every: "Preview every (steps)",
};
const HIDDEN = new Set(["sync_mode"]);
const state = { key: sessionStorage.getItem("pixart-key") || "", schemas: null, running: null, lastSeed: null };
const $ = (id) => document.getElementById(id);

function headers(json) {
  const h = {};
  if (state.key) h.Authorization = "Key " + state.key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function plain(schema) {  // X | null -> X
  if (schema && schema.anyOf) {
    const kept = schema.anyOf.filter((s) => s.type !== "null");
    if (kept.length === 1) return { ...schema, ...kept[0], anyOf: undefined };
  }
  return schema;
}

function resolve(ref) {
  return state.schemas[ref.replace("#/components/schemas/", "")];
}

// -- the form ---------------------------------------------------------------------------------------------------
function field(name, schema) {
  const box = document.createElement("div");
  box.className = "field";
  box.dataset.name = name;
  const label = document.createElement("label");
  label.textContent = LABELS[name] || name;
  label.htmlFor = "f-" + name;
  box.appendChild(label);
  const s = plain(schema);
  let control;
  if (name === "image_size") {
    control = sizeControl(schema);
  } else if (name === "seed") {
    control = seedControl();
  } else if (s.enum) {
    control = document.createElement("select");
    if (schema.default === null || schema.default === undefined) control.appendChild(new Option("(server default)", ""));
    for (const value of s.enum) control.appendChild(new Option(value, value));
    control.value = schema.default ?? "";
  } else if (s.type === "boolean") {
    control = document.createElement("input");
    control.type = "checkbox";
    control.checked = Boolean(schema.default);
  } else if (s.type === "integer" || s.type === "number") {
    control = document.createElement("input");
    control.type = "number";
    if (s.minimum !== undefined) control.min = s.minimum;
    if (s.maximum !== undefined) control.max = s.maximum;
    control.step = s.type === "integer" ? "1" : "0.1";
    if (schema.default !== null && schema.default !== undefined) control.value = schema.default;
  } else if (name === "prompt" || name === "negative_prompt") {
    control = document.createElement("textarea");
    control.value = schema.default || "";
  } else {
    control = document.createElement("input");
    control.type = "text";
    control.value = schema.default || "";
  }
  if (!control.id) control.id = "f-" + name;
  box.appendChild(control);
  if (schema.description) {
    const help = document.createElement("p");
    help.className = "help";
    help.id = "h-" + name;
    help.textContent = schema.description;
    box.appendChild(help);
  }
  const focusable = control.matches("input, select, textarea") ? control : control.querySelector("input, select");
  focusable.setAttribute("aria-describedby", (schema.description ? "h-" + name + " " : "") + "e-" + name);
  const error = document.createElement("p");
  error.className = "error";
  error.id = "e-" + name;
  error.setAttribute("role", "alert");
  box.appendChild(error);
  return box;
}

function sizeControl(schema) {
  const presets = schema.anyOf.find((s) => s.enum).enum;
  const custom = resolve(schema.anyOf.find((s) => s.$ref).$ref).properties;
  const wrap = document.createElement("div");
  const select = document.createElement("select");
  select.id = "f-image_size";
  for (const p of presets) select.appendChild(new Option(p, p));
  select.appendChild(new Option("custom", "custom"));
  select.value = schema.default;
  const sides = document.createElement("div");
  sides.className = "inline";
  sides.hidden = true;
  for (const side of ["width", "height"]) {
    const label = document.createElement("label");
    label.htmlFor = "f-" + side;
    label.textContent = side;
    const input = document.createElement("input");
    input.type = "number";
    input.id = "f-" + side;
    input.min = custom[side].minimum;
    input.max = custom[side].maximum;
    input.step = "8";
    input.value = 1024;
    sides.append(label, input);
  }
  select.addEventListener("change", () => { sides.hidden = select.value !== "custom"; });
  wrap.append(select, sides);
  wrap.id = "size-box";
  return wrap;
}

function seedControl() {
  const wrap = document.createElement("div");
  wrap.className = "inline";
  wrap.id = "seed-box";
  const input = document.createElement("input");
  input.type = "number";
  input.id = "f-seed";
  input.min = 0;
  input.placeholder = "random";
  const lock = document.createElement("button");
  lock.type = "button";
  lock.id = "seed-lock";
  lock.textContent = "Use last seed";
  lock.addEventListener("click", () => { if (state.lastSeed !== null) input.value = state.lastSeed; });
  const random = document.createElement("button");
  random.type = "button";
  random.textContent = "Random";
  random.addEventListener("click", () => { input.value = ""; });
  wrap.append(input, lock, random);
  return wrap;
}

async function buildForm() {
  const doc = await (await fetch("/openapi.json")).json();
  state.schemas = doc.components.schemas;
  const props = state.schemas.FalInput.properties;
  const names = [...ORDER.filter((n) => n in props), ...Object.keys(props).filter((n) => !ORDER.includes(n))];
  const fields = $("fields");
  for (const name of names) if (!HIDDEN.has(name)) fields.appendChild(field(name, props[name]));
  $("f-preview_every").value = 5;
  $("f-prompt").value = "a red circle on a blue background";
}

function collect() {
  const body = {};
  for (const box of document.querySelectorAll("#fields .field")) {
    const name = box.dataset.name;
    if (name === "image_size") {
      const preset = $("f-image_size").value;
      body.image_size = preset === "custom"
        ? { width: Number($("f-width").value), height: Number($("f-height").value) } : preset;
      continue;
    }
    const control = $("f-" + name);
    if (control.type === "checkbox") body[name] = control.checked;
    else if (control.type === "number") { if (control.value !== "") body[name] = Number(control.value); }
    else if (control.value !== "") body[name] = control.value;
  }
  return body;
}

function fill(body) {
  for (const [name, value] of Object.entries(body)) {
    if (name === "image_size") {
      if (typeof value === "string") $("f-image_size").value = value;
      else {
        $("f-image_size").value = "custom";
        $("f-width").value = value.width;
        $("f-height").value = value.height;
      }
      $("f-image_size").dispatchEvent(new Event("change"));
      continue;
    }
    const control = $("f-" + name);
    if (!control) continue;
    if (control.type === "checkbox") control.checked = Boolean(value);
    else control.value = value;
  }
}

function clearErrors() {
  for (const e of document.querySelectorAll(".field .error")) e.textContent = "";
  $("form-error").textContent = "";
}

function showErrors(detail) {
  for (const item of Array.isArray(detail) ? detail : []) {
    const name = (item.loc || [])[1];
    const target = $("e-" + name);
    if (target) target.textContent = item.msg;
    else $("form-error").textContent += `${(item.loc || []).slice(1).join(".")}: ${item.msg} `;
  }
  if (!Array.isArray(detail)) $("form-error").textContent = String(detail);
  const first = document.querySelector(".field .error:not(:empty)");
  if (first) first.parentElement.querySelector("input, select, textarea").focus();
}

// -- a request --------------------------------------------------------------------------------------------------
function needKey(message) {
  $("key-box").hidden = false;
  $("status").textContent = message;
  $("api-key").focus();
}

async function submit(event) {
  if (event) event.preventDefault();
  clearErrors();
  const body = collect();
  const answer = await fetch(`/queue/${APP}`, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  const data = await answer.json().catch(() => ({}));
  if (answer.status === 401) return needKey("This server needs an API key.");
  if (answer.status === 422) return showErrors(data.detail);
  if (!answer.ok) { $("form-error").textContent = data.detail || `HTTP ${answer.status}`; return; }
  remember(data.request_id, body);
  follow(data.request_id, body);
}

async function follow(rid, body) {
  state.running = rid;
  $("cancel").disabled = false;
  $("images").replaceChildren();
  $("logs").textContent = "";
  $("preview-box").hidden = true;
  $("progress").value = 0;
  $("status").textContent = "Submitted.";
  updateCopy(body);
  const started = { at: null, step: 0 };
  const answer = await fetch(`/queue/${APP}/requests/${rid}/status/stream?logs=1`, { headers: headers(false) });
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  while (true) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) { last = JSON.parse(line.slice(6)); show(last, started); }
      }
    }
  }
  $("cancel").disabled = true;
  state.running = null;
  if (last && last.status === "COMPLETED") await finished(rid, last);
  document.body.dataset.ended = rid;
}

function show(status, started) {
  for (const line of status.logs || []) $("logs").textContent += `${line.timestamp} ${line.level} ${line.message}\n`;
  if (status.status === "IN_QUEUE") {
    $("status").textContent = `In queue: position ${status.queue_position}.`;
  } else if (status.status === "IN_PROGRESS") {
    const p = status.progress;
    if (p && p.total_steps) {
      if (started.at === null) { started.at = performance.now(); started.step = p.step; }
      const done = p.step - started.step;
      const perStep = done > 0 ? (performance.now() - started.at) / done : null;
      const eta = perStep ? ` about ${Math.ceil((p.total_steps - p.step) * perStep / 1000)} s left` : "";
      $("status").textContent = `Step ${p.step}/${p.total_steps}.${eta}`;
      $("progress").max = p.total_steps;
      $("progress").value = p.step;
    } else {
      $("status").textContent = "Running.";
    }
    if (status.preview) {
      document.body.dataset.previews = Number(document.body.dataset.previews || 0) + 1;
      $("preview").src = status.preview.url;
      $("preview-caption").textContent = `preview after step ${status.preview.step}/${status.preview.total_steps}`;
      $("preview-box").hidden = false;
    }
  }
}

async function finished(rid, status) {
  if (status.error) {
    $("status").textContent = `Ended: ${status.error_type}: ${status.error}`;
    return;
  }
  const answer = await fetch(`/queue/${APP}/requests/${rid}`, { headers: headers(false) });
  const result = await answer.json();
  if (!answer.ok) { $("status").textContent = `Result: ${result.detail}`; return; }
  state.lastSeed = result.seed;
  $("status").textContent = `Done: seed ${result.seed}, ${result.timings.inference.toFixed(2)} s.`;
  $("progress").value = $("progress").max;
  $("preview-box").hidden = true;
  for (const image of result.images) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = `result ${image.file_name} for: ${result.prompt}`;
    img.className = "result";
    const caption = document.createElement("figcaption");
    caption.textContent = `${image.width}x${image.height}, seed ${result.seed}, ` + Object.entries(result.timings)
      .map(([k, v]) => (k.startsWith("steps_") ? `${k} ${v}` : `${k} ${v.toFixed(2)} s`)).join(", ");
    figure.append(img, caption);
    $("images").appendChild(figure);
  }
  updateCopy({ ...collect(), seed: result.seed });
}

async function cancel() {
  const rid = state.running;
  if (!rid) return;
  const answer = await fetch(`/queue/${APP}/requests/${rid}/cancel`, { method: "PUT", headers: headers(false) });
  const data = await answer.json().catch(() => ({}));
  if (state.running === rid) $("status").textContent = `Cancel: ${data.status || answer.status}.`;  // not once ended
}

// -- copy as ----------------------------------------------------------------------------------------------------
function updateCopy(body) {
  const origin = location.origin;
  const json = JSON.stringify(body);
  const size = typeof body.image_size === "object" ? `${body.image_size.width}x${body.image_size.height}` : "auto";
  const { prompt, num_images, image_size, ...extra } = body;
  const snippets = {
    "curl": `curl -s -X POST '${origin}/run/${APP}' -H 'Authorization: Key $PIXART_KEY' \\\n` +
      `  -H 'Content-Type: application/json' -d '${json.replaceAll("'", "'\\''")}'`,
    "fal-python": `# FAL_KEY=<key> FAL_QUEUE_RUN_HOST=${location.host}/queue FAL_RUN_HOST=${location.host}/run\n` +
      `import fal_client\nresult = fal_client.subscribe("${APP}", arguments=${json})`,
    "fal-js": `import { fal } from "@fal-ai/client";\nfal.config({ credentials: process.env.FAL_KEY, ` +
      `proxyUrl: { url: "${origin}/fal/proxy", when: "always" } });\n` +
      `const result = await fal.subscribe("${APP}", { input: ${json} });`,
    "openai": `from openai import OpenAI\nclient = OpenAI(api_key="<key>", base_url="${origin}/v1")\n` +
      `image = client.images.generate(model="pixart-sigma", prompt=${JSON.stringify(prompt || "")}, ` +
      `n=${num_images || 1}, size="${size}", extra_body=${JSON.stringify(extra)})`,
    "grpcurl": `grpcurl -plaintext -H 'authorization: Key <key>' -d '${JSON.stringify(protoJson(body))}' \\\n` +
      `  ${location.hostname}:50051 pixart.v1.PixArt/Generate`,
  };
  state.snippets = snippets;
  $("copy-text").textContent = snippets[$("copy-kind").value];
}

function protoJson(body) {
  const out = { prompt: body.prompt };
  const names = { negative_prompt: "negativePrompt", num_inference_steps: "numInferenceSteps", seed: "seed",
    guidance_scale: "guidanceScale", num_images: "numImages", enable_safety_checker: "enableSafetyChecker",
    preview_every: "previewEvery" };
  for (const [k, v] of Object.entries(names)) if (body[k] !== undefined) out[v] = body[k];
  if (typeof body.image_size === "object") out.imageSizeCustom = body.image_size;
  return out;
}

// -- history ----------------------------------------------------------------------------------------------------
function remember(rid, body) {
  const items = JSON.parse(localStorage.getItem("pixart-history") || "[]");
  items.unshift({ rid, body, at: new Date().toISOString() });
  localStorage.setItem("pixart-history", JSON.stringify(items.slice(0, 30)));
  drawHistory();
}

function drawHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const item of JSON.parse(localStorage.getItem("pixart-history") || "[]")) {
    const li = document.createElement("li");
    const again = document.createElement("button");
    again.type = "button";
    again.textContent = "Re-run";
    again.setAttribute("aria-label", `Re-run: ${item.body.prompt}`);
    again.addEventListener("click", () => { fill(item.body); submit(); });
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "Show";
    open.setAttribute("aria-label", `Show the result of: ${item.body.prompt}`);
    open.addEventListener("click", () => { fill(item.body); follow(item.rid, item.body); });
    li.append(`${item.body.prompt.slice(0, 60)} `, again, " ", open);
    list.appendChild(li);
  }
}

// -- start ------------------------------------------------------------------------------------------------------
async function start() {
  await buildForm();
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("copy-kind").addEventListener("change", () => { $("copy-text").textContent = state.snippets[$("copy-kind").value]; });
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("copy-text").textContent));
  $("key-save").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("pixart-key", state.key);
    $("key-box").hidden = true;
    $("status").textContent = "Key saved for this tab.";
  });
  updateCopy(collect());
  drawHistory();
  const probe = await fetch("/v1/models", { headers: headers(false) });
  if (probe.status === 401) needKey("This server needs an API key.");
  document.body.dataset.ready = "1";
}

start();
