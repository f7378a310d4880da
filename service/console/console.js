// flock's routing console: plain JavaScript over the gateway's own API, no build step.
// Every call carries the key typed above (kept in this tab's sessionStorage only), so the console shows what that
// key may see: the same keys guard it as the API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("flock-key") || "", modes: [], threshold: null, timer: null };

function headers() {
  const h = { "content-type": "application/json" };
  if (state.key) h.authorization = "Bearer " + state.key;
  return h;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `${path}: HTTP ${r.status}`);
  return data;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// --- the pool and the modes ---------------------------------------------------------------------------------
async function connect() {
  try {
    const [experts, ready] = await Promise.all([api("/v1/experts"), fetch("/ready").then((r) => r.json())]);
    const list = $("experts");
    list.replaceChildren();
    for (const e of experts.data) {
      const li = el("li", undefined, e.status === "quarantined" ? "quarantined" : "");
      li.append(el("b", e.name), document.createTextNode(": " + e.description));
      if (e.problem) li.append(el("div", "quarantined: " + e.problem));
      list.append(li);
    }
    $("pool-version").textContent = `${experts.data.length} · pool ${experts.pool_version}`;
    state.modes = ready.modes.filter((m) => m !== "base" && m !== "direct");
    state.threshold = ready.pool.abstain_threshold;
    const select = $("mode");
    const chosen = select.value;
    select.replaceChildren(...state.modes.map((m) => el("option", m)));
    select.value = state.modes.includes(chosen) ? chosen : ready.default_mode;
    status(`connected: ${experts.data.length} experts, modes ${state.modes.join(", ")}`);
    clearInterval(state.timer);
    counters();
    state.timer = setInterval(counters, 2000);
  } catch (err) {
    status(err.message, true);
  }
}

// --- live counters from /metrics ------------------------------------------------------------------------------
function metric(text, name) {
  // Prometheus text format: name{label="v",...} value
  const out = [];
  for (const line of text.split("\n")) {
    if (!line.startsWith(name + "{")) continue;
    const labels = Object.fromEntries([...line.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    out.push({ labels, value: Number(line.slice(line.lastIndexOf(" ") + 1)) });
  }
  return out;
}

async function counters() {
  let text;
  try {
    text = await (await fetch("/metrics")).text();
  } catch (err) {
    return;
  }
  const per = {};
  for (const s of metric(text, "flock_expert_selections_total")) per[s.labels.expert] = (per[s.labels.expert] || 0) + s.value;
  const rows = Object.entries(per).sort((a, b) => b[1] - a[1])
    .map(([name, n]) => { const tr = el("tr"); tr.append(el("td", name), el("td", String(n))); return tr; });
  $("selections").tBodies[0].replaceChildren(...rows);
  const cache = Object.fromEntries(metric(text, "flock_routing_cache_total").map((s) => [s.labels.result, s.value]));
  const total = (cache.hit || 0) + (cache.miss || 0) + (cache.bypass || 0);
  $("hit-rate").textContent = total ? `${Math.round((100 * (cache.hit || 0)) / total)} %` : "–";
  $("cache-counts").textContent = total ? `(${cache.hit || 0} hits of ${total})` : "(no lookups yet)";
}

// --- a prompt: scores, decisions, answer ---------------------------------------------------------------------
function request() {
  const text = $("prompt").value.trim();
  if (text.startsWith("[")) {
    try {
      const messages = JSON.parse(text);
      if (Array.isArray(messages)) return { messages };
    } catch (err) { /* not a conversation: a prompt that starts with "[" */ }
  }
  return { messages: [{ role: "user", content: text }] };
}

function chart(scores, threshold, chosen) {
  const rows = Object.entries(scores).sort((a, b) => b[1] - a[1]).map(([name, score]) => {
    const row = el("div", undefined, "bar" + (chosen.has(name) ? " chosen" : ""));
    const track = el("div", undefined, "track");
    const fill = el("div", undefined, "fill");
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    const line = el("div", undefined, "threshold");
    line.style.left = `${Math.max(0, Math.min(1, threshold)) * 100}%`;
    line.title = `abstain threshold ${threshold}`;
    track.append(fill, line);
    row.dataset.expert = name;
    row.append(el("span", name, "name"), track, el("span", score.toFixed(3), "score"));
    return row;
  });
  $("chart").replaceChildren(...rows);
  $("threshold-label").textContent = `(dashed: abstain threshold ${threshold}; below it for every expert, the base model answers)`;
}

function describe(routing) {
  if (!routing.experts.length) return "base model (abstained)";
  return routing.experts.map((e) => `${e.name} (${e.weight})`).join(", ");
}

async function decisions(body) {
  const rows = await Promise.all(state.modes.map(async (mode) => {
    const tr = el("tr");
    tr.dataset.mode = mode;
    try {
      const r = await api("/v1/route", { ...body, routing: { mode } });
      tr.append(el("td", mode), el("td", describe(r.routing)));
    } catch (err) {
      tr.append(el("td", mode), el("td", err.message));
    }
    return tr;
  }));
  $("decisions").tBodies[0].replaceChildren(...rows);
}

async function answer(body, mode) {
  $("answer").textContent = "";
  $("answer-meta").textContent = "";
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: "auto", ...body, routing: { mode }, stream: true,
      max_tokens: Number($("max-tokens").value) || 96, temperature: Number($("temperature").value) || 0 }),
  });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || `HTTP ${r.status}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.routing) $("answer-meta").textContent = `served by ${chunk.model}: ${describe(chunk.routing)}`;
      for (const c of chunk.choices || []) $("answer").textContent += (c.delta && c.delta.content) || "";
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const body = request();
  const mode = $("mode").value;
  $("send").disabled = true;
  status("routing…");
  try {
    const explained = await api("/v1/route", { ...body, explain: true, routing: { mode } });
    chart(explained.scores, explained.threshold, new Set(explained.routing.experts.map((e) => e.name)));
    await decisions(body);
    status("answering…");
    await answer(body, mode);
    status("done");
  } catch (err) {
    status(err.message, true);
  } finally {
    $("send").disabled = false;
    counters();
  }
}

$("key").value = state.key;
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("flock-key", state.key);
  connect();
});
$("prompt-form").addEventListener("submit", ask);
connect();
