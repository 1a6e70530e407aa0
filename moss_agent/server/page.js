// The moss-agent chat page: plain JavaScript against the server's own API, no build step.
// Text from the model is only ever set as textContent (never parsed as HTML).
"use strict";

const state = { conversationId: null, plugins: new Set(), available: [], busy: false };
const $ = (id) => document.getElementById(id);

function apiKey() { return localStorage.getItem("moss-api-key") || ""; }

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function status(text) { $("status").textContent = text || ""; }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

// ---------------------------------------------------------------- messages

function addUser(text) { $("messages").append(el("div", "msg user", text)); scrollDown(); }

function addAssistant() {
  const box = el("div", "msg assistant");
  const reply = el("div", "reply");
  const trace = el("details", "trace");
  trace.hidden = true;
  trace.append(el("summary", null, "Inner thoughts, commands and results"));
  box.append(reply, trace);
  $("messages").append(box);
  scrollDown();
  return { box, reply, trace, images: new Set() };
}

function addTrace(view, label, text) {
  if (!text || text === "None") return;
  view.trace.hidden = false;
  view.trace.append(el("div", "label", label), el("pre", label.toLowerCase().replace(/\W+/g, "-"), text));
}

async function addImage(view, url) {
  if (!url || view.images.has(url)) return;
  view.images.add(url);
  const img = el("img", "generated");
  img.alt = "generated image";
  view.box.append(img);
  try {  // fetched with the API key, then shown from a blob URL
    const response = await fetch(url, { headers: headers(false) });
    if (!response.ok) throw new Error(response.statusText);
    img.src = URL.createObjectURL(await response.blob());
  } catch (err) {
    img.replaceWith(el("div", "label", "image unavailable: " + err.message));
  }
  scrollDown();
}

function showTurn(turn) {
  addUser(turn.human);
  const view = addAssistant();
  view.reply.textContent = turn.reply;
  addTrace(view, "Inner thoughts", turn.inner_thoughts);
  addTrace(view, "Commands", turn.commands);
  if (turn.commands && turn.commands !== "None") addTrace(view, "Results", turn.results.trim());
  for (const url of turn.images) addImage(view, url);
}

function showEvent(view, event) {
  if (event.type === "thoughts") addTrace(view, "Inner thoughts", event.text);
  else if (event.type === "command") addTrace(view, "Command", event.command);
  else if (event.type === "result") {
    addTrace(view, "Result", event.error || event.output);
    addImage(view, event.image_url);
  } else if (event.type === "turn") {
    for (const url of event.images || []) addImage(view, url);
  }
}

// ---------------------------------------------------------------- sending

async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  state.busy = true;
  $("send").disabled = true;
  addUser(text);
  const view = addAssistant();
  status("MOSS is writing…");
  const body = {
    model: $("model").textContent || "moss",
    messages: [{ role: "user", content: text }],
    stream: true,
    plugins: [...state.plugins],
  };
  if (state.conversationId) body.conversation_id = state.conversationId;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || response.statusText);
    }
    await readEvents(response, (data) => {
      if (data.error) throw new Error(data.error.message);
      if (data.conversation_id) state.conversationId = data.conversation_id;
      for (const choice of data.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) { view.reply.textContent += delta.content; scrollDown(); }
        if (delta.moss) showEvent(view, delta.moss);
      }
    });
    view.box.classList.add("done");
    status("");
  } catch (err) {
    view.box.classList.add("failed");
    $("messages").append(el("div", "msg error", "Error: " + err.message));
    status("");
  } finally {
    state.busy = false;
    $("send").disabled = false;
    loadConversations();
  }
}

// ---------------------------------------------------------------- conversations and plugins

async function loadConversations() {
  try {
    const { data } = await api("/v1/conversations");
    const list = $("conversations");
    list.replaceChildren();
    for (const c of data) {
      const item = el("li", c.id === state.conversationId ? "active" : "", c.title || "(empty)");
      item.dataset.id = c.id;
      item.title = `${c.num_turns} turn(s)`;
      item.addEventListener("click", () => openConversation(c.id));
      list.append(item);
    }
  } catch (err) { status(err.message); }
}

async function openConversation(id) {
  if (state.busy) return;
  try {
    const conversation = await api("/v1/conversations/" + encodeURIComponent(id));
    state.conversationId = id;
    state.plugins = new Set(conversation.plugins);
    renderPlugins();
    $("messages").replaceChildren();
    conversation.turns.forEach(showTurn);
    loadConversations();
  } catch (err) { status(err.message); }
}

function newChat() {
  state.conversationId = null;
  $("messages").replaceChildren();
  loadPlugins();
  loadConversations();
}

function renderPlugins() {
  const box = $("plugins");
  box.querySelectorAll("label").forEach((label) => label.remove());
  for (const plugin of state.available) {
    const input = el("input");
    input.type = "checkbox";
    input.value = plugin.key;
    input.checked = state.plugins.has(plugin.key);
    input.addEventListener("change", async () => {
      if (input.checked) state.plugins.add(plugin.key); else state.plugins.delete(plugin.key);
      if (state.conversationId) {
        try {
          await api(`/v1/conversations/${encodeURIComponent(state.conversationId)}/plugins`,
            { method: "PUT", body: JSON.stringify({ plugins: [...state.plugins] }) });
        } catch (err) { status(err.message); }
      }
    });
    const label = el("label", "plugin");
    label.title = plugin.description;
    label.append(input, document.createTextNode(" " + plugin.key));
    box.append(label);
  }
}

async function loadPlugins() {
  try {
    const plugins = await api("/v1/plugins");
    state.available = plugins.data;
    state.plugins = new Set(plugins.default);
    renderPlugins();
  } catch (err) { status(err.message); }
}

async function init() {
  const health = await fetch("/health").then((r) => r.json());
  $("model").textContent = health.model;
  if (health.auth) {
    $("key-box").hidden = false;
    $("api-key").value = apiKey();
    $("api-key").addEventListener("change", (e) => {
      localStorage.setItem("moss-api-key", e.target.value);
      loadPlugins();
      loadConversations();
    });
  }
  $("new-chat").addEventListener("click", newChat);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.busy) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  await loadPlugins();
  await loadConversations();
  document.body.dataset.ready = "1";
}

init();
