"use strict";
// tinymed's page: upload → /api/preview (decoded as the model sees it) → streamed /v1/chat/completions.
const $ = (id) => document.getElementById(id);
const state = { model: null, image: null };

function headers(extra = {}) {
  const key = $("api-key").value;
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

function showError(message) { $("error").textContent = message || ""; }

async function loadInfo() {
  try {
    const health = await (await fetch("/health")).json();
    state.model = health.model;
    $("model-info").textContent = `model ${health.model} · quantization ${health.quant} · device ${health.device}`;
    $("key-label").hidden = !health.auth_required;
  } catch (e) {
    $("model-info").textContent = "server unreachable";
  }
}

async function useFile(file) {
  showError("");
  const frame = $("frame").value;
  const url = "/api/preview" + (frame !== "" ? `?frame=${encodeURIComponent(frame)}` : "");
  const response = await fetch(url, { method: "POST", body: file, headers: headers({ "Content-Type": "application/octet-stream" }) });
  if (!response.ok) {
    state.image = null;
    $("preview").hidden = true;
    $("image-info").textContent = "No usable image.";
    showError(`${file.name}: ${await errorText(response)}`);
    return;
  }
  const preview = await response.json();
  state.image = preview.image;
  $("preview").src = preview.image;
  $("preview").hidden = false;
  const source = preview.source ? `${preview.source}, ` : "";
  $("image-info").textContent = `${file.name}: ${source}${preview.width}×${preview.height} px, as the model sees it`;
}

function parseEvents(buffer, onData) {
  // SSE: events end with a blank line; we only need their `data:` lines.
  const events = buffer.split("\n\n");
  const rest = events.pop();
  for (const event of events) {
    const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
    if (data) onData(data);
  }
  return rest;
}

async function ask(event) {
  event.preventDefault();
  showError("");
  $("answer").textContent = "";
  $("stats").textContent = "";
  const content = [{ type: "text", text: $("question").value }];
  if (state.image) content.unshift({ type: "image_url", image_url: { url: state.image } });
  const body = {
    model: state.model, stream: true, stream_options: { include_usage: true }, temperature: 0,
    max_tokens: Number($("max-tokens").value) || 64, messages: [{ role: "user", content }],
  };
  $("ask").disabled = true;
  const t0 = performance.now();
  let firstToken = null, usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
    });
    if (!response.ok) { showError(await errorText(response)); return; }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + value, (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) { showError(chunk.error.message); return; }
        if (chunk.usage) usage = chunk.usage;
        const text = chunk.choices?.[0]?.delta?.content;
        if (text) {
          firstToken ??= performance.now();
          $("answer").textContent += text;
        }
      });
    }
    const seconds = (performance.now() - t0) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    const ttft = firstToken ? ` · first token ${((firstToken - t0) / 1000).toFixed(2)} s` : "";
    $("stats").textContent = `latency ${seconds.toFixed(2)} s${ttft} · ${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s`;
  } catch (e) {
    showError(`request failed: ${e}`);
  } finally {
    $("ask").disabled = false;
  }
}

function setUpDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) useFile($("file").files[0]); });
  $("frame").addEventListener("change", () => { if ($("file").files.length) useFile($("file").files[0]); });
}

setUpDrop();
$("ask-form").addEventListener("submit", ask);
loadInfo();
