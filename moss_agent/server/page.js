// The moss-agent chat page: plain JavaScript against the server's own API, no build step, nothing from a CDN.
// Text from the model is rendered by markdown.js into DOM nodes, never parsed as HTML; turn.js shows a turn.
"use strict";

const state = {
  conversationId: null, plugins: new Set(), available: [], busy: false, controller: null, model: "moss",
  conversations: [], retry: null,
};
const $ = (id) => document.getElementById(id);
const EXAMPLES = {
  search: "Search the web: what is the MOSS model from Fudan University?",
  calculator: "What is 37 * 12 + 5?",
  solver: "Solve the equation 3x + 7 = 25",
  text2image: 'Draw a picture of "a red cat on a sofa"',
};
const CHAT_EXAMPLES = ["Write a haiku about the sea", "Explain recursion with a short Python example"];

function apiKey() { return localStorage.getItem("moss-api-key") || ""; }

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

class ApiFailure extends Error {
  constructor(message, network) { super(message); this.network = network; }
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiFailure("The server can't be reached. Is moss-agent serve still running?", true);
  }
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new ApiFailure((data.error && data.error.message) || `${response.status} ${response.statusText}`, false);
  }
  return response;
}

async function api(path, options = {}) { return (await request(path, options)).json(); }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function status(text) { $("status").textContent = text || ""; }

// One banner for every failure, and Retry runs what failed. A background refresh that fails too keeps the
// banner of the failure the user saw first (and its retry).
function showError(err, retry, background) {
  if (background && !$("banner").hidden) return;
  $("banner-text").textContent = err.message;
  $("banner").hidden = false;
  $("retry").hidden = !retry;
  state.retry = retry || null;
}

function clearError() { $("banner").hidden = true; state.retry = null; }

function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

function updateEmpty() {
  const empty = !$("messages").children.length;
  $("empty").hidden = !empty;
  if (!empty) return;
  const box = $("examples");
  box.replaceChildren();
  const prompts = [...state.plugins].map((k) => EXAMPLES[k]).filter(Boolean);
  $("empty-note").textContent = prompts.length ? "Ask me anything. With the plugins that are on, I can for example:"
    : "Ask me anything, for example:";
  for (const text of prompts.length ? prompts : CHAT_EXAMPLES) {
    const button = el("button", "example", text);
    button.type = "button";
    button.addEventListener("click", () => submit(text));
    box.append(button);
  }
}

// ---------------------------------------------------------------- sending, stopping, regenerating

async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
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

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.querySelectorAll(".actions button.regenerate").forEach((b) => { b.disabled = busy; });
}

function setConversation(id) {
  state.conversationId = id;
  const hash = id ? "#" + encodeURIComponent(id) : "";
  if (location.hash !== hash) history.replaceState(null, "", location.pathname + location.search + hash);
}

async function send(text) {
  clearError();
  setBusy(true);
  const user = addUser(text);
  const view = addAssistant(text);
  status("MOSS is writing\u2026");
  const body = { model: state.model, messages: [{ role: "user", content: text }], stream: true, plugins: [...state.plugins] };
  if (state.conversationId) body.conversation_id = state.conversationId;
  state.controller = new AbortController();
  try {
    const response = await request("/v1/chat/completions",
      { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    await readEvents(response, (data) => {
      if (data.error) throw new ApiFailure(data.error.message, false);
      if (data.conversation_id && data.conversation_id !== state.conversationId) setConversation(data.conversation_id);
      for (const choice of data.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) appendText(view, delta.content);
        if (delta.moss) showEvent(view, delta.moss);
      }
    });
    renderReply(view);
    view.done = true;
    view.box.classList.add("done");
    status("");
  } catch (err) {
    renderReply(view);
    if (err.name === "AbortError") {
      view.box.classList.add("stopped");
      status("Stopped.");
    } else {
      view.box.classList.add("failed");
      status("");
      showError(err, () => { user.remove(); view.box.remove(); send(text); });
    }
  } finally {
    state.controller = null;
    setBusy(false);
    markLast();
    loadConversations();
  }
}

function stop() {
  if (state.controller) state.controller.abort();  // the server cancels a turn whose client went away
}

async function regenerate(view) {
  if (state.busy || !state.conversationId) return;
  try {
    await api(`/v1/conversations/${encodeURIComponent(state.conversationId)}/turns/last`, { method: "DELETE" });
  } catch (err) { showError(err, () => regenerate(view)); return; }
  view.box.previousElementSibling.remove();
  view.box.remove();
  send(view.human);
}

function submit(text) {
  text = (text || "").trim();
  if (!text || state.busy) return;
  $("input").value = "";
  fitInput();
  closeDrawer();
  send(text);
}

function fitInput() {
  const box = $("input");
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight + 2, window.innerHeight * 0.4) + "px";
}

// ---------------------------------------------------------------- conversations

async function loadConversations() {
  try {
    state.conversations = (await api("/v1/conversations")).data;
  } catch (err) { showError(err, init, true); return; }
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.conversations) {
    const item = el("li", c.id === state.conversationId ? "active" : "");
    item.dataset.id = c.id;
    const title = item.appendChild(el("span", "title", c.title || "(empty)"));
    title.title = `${c.title || "(empty)"}\n${c.num_turns} turn(s)`;
    title.addEventListener("click", () => openConversation(c.id));
    for (const [cls, symbol, label, action] of [["rename", "\u270E", "Rename", startRename], ["delete", "\u2715", "Delete", remove]]) {
      const button = el("button", cls, symbol);
      button.type = "button";
      button.title = label;
      button.setAttribute("aria-label", `${label} \u201C${c.title || "(empty)"}\u201D`);
      button.addEventListener("click", () => action(c, item));
      item.append(button);
    }
    list.append(item);
  }
}

function startRename(c, item) {
  const input = el("input");
  input.value = c.title || "";
  input.setAttribute("aria-label", "New title");
  item.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== c.title) {
      try {
        await api(`/v1/conversations/${encodeURIComponent(c.id)}`, { method: "PATCH", body: JSON.stringify({ title }) });
      } catch (err) { showError(err); }
    }
    loadConversations();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function remove(c) {
  if (state.busy && c.id === state.conversationId) return;
  if (!confirm(`Delete \u201C${c.title || "(empty)"}\u201D? This cannot be undone.`)) return;
  try {
    await api(`/v1/conversations/${encodeURIComponent(c.id)}`, { method: "DELETE" });
  } catch (err) { showError(err, () => remove(c)); return; }
  if (c.id === state.conversationId) newChat();
  else loadConversations();
}

async function openConversation(id) {
  if (state.busy) return;
  let conversation;
  try {
    conversation = await api("/v1/conversations/" + encodeURIComponent(id));
  } catch (err) {
    if (err.network) showError(err, () => openConversation(id));
    else { setConversation(null); status(err.message); }
    return;
  }
  clearError();
  setConversation(id);
  state.plugins = new Set(conversation.plugins);
  renderPlugins();
  $("messages").replaceChildren();
  conversation.turns.forEach(showTurn);
  markLast();
  updateEmpty();
  closeDrawer();
  loadConversations();
}

function newChat() {
  if (state.busy) return;
  setConversation(null);
  $("messages").replaceChildren();
  state.plugins = new Set(state.defaults);
  renderPlugins();
  updateEmpty();
  closeDrawer();
  loadConversations();
  $("input").focus();
}

// ---------------------------------------------------------------- plugins

function renderPlugins() {
  const box = $("plugins");
  box.querySelectorAll("label").forEach((label) => label.remove());
  box.hidden = !state.available.length;
  for (const plugin of state.available) {
    const input = el("input");
    input.type = "checkbox";
    input.value = plugin.key;
    input.checked = state.plugins.has(plugin.key);
    input.addEventListener("change", async () => {
      if (input.checked) state.plugins.add(plugin.key); else state.plugins.delete(plugin.key);
      updateEmpty();
      if (!state.conversationId) return;
      try {
        await api(`/v1/conversations/${encodeURIComponent(state.conversationId)}/plugins`,
          { method: "PUT", body: JSON.stringify({ plugins: [...state.plugins] }) });
      } catch (err) { showError(err); }
    });
    const label = el("label", "plugin");
    label.title = plugin.description;
    label.append(input, document.createTextNode(" " + plugin.key));
    box.append(label);
  }
}

// ---------------------------------------------------------------- the drawer (narrow screens)

function openDrawer() {
  document.body.classList.add("drawer-open");
  $("scrim").hidden = false;
  $("menu").setAttribute("aria-expanded", "true");
}

function closeDrawer() {
  document.body.classList.remove("drawer-open");
  $("scrim").hidden = true;
  $("menu").setAttribute("aria-expanded", "false");
}

// ---------------------------------------------------------------- start

async function init() {
  clearError();
  try {
    await start();
  } finally {
    document.body.dataset.ready = "1";
  }
}

async function start() {
  try {
    const health = await api("/health");
    state.model = health.model;
    $("model").textContent = health.model;
    $("model").title = health.model;
    $("key-box").hidden = !health.auth;
    if (health.auth && !apiKey()) {
      showError(new Error("This server needs an API key: enter it above."));
      return;
    }
    const plugins = await api("/v1/plugins");
    state.available = plugins.data;
    state.defaults = plugins.default;
    if (!state.conversationId) state.plugins = new Set(plugins.default);
    renderPlugins();
  } catch (err) { showError(err, init); return; }
  await loadConversations();
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted && wanted !== state.conversationId && state.conversations.some((c) => c.id === wanted)) {
    await openConversation(wanted);
  }
  updateEmpty();
}

function wire() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", (e) => { localStorage.setItem("moss-api-key", e.target.value); init(); });
  $("new-chat").addEventListener("click", newChat);
  $("menu").addEventListener("click", openDrawer);
  $("close-drawer").addEventListener("click", closeDrawer);
  $("scrim").addEventListener("click", closeDrawer);
  $("stop").addEventListener("click", stop);
  $("retry").addEventListener("click", () => { const retry = state.retry; clearError(); if (retry) retry(); });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit($("input").value); });
  $("input").addEventListener("input", fitInput);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit($("input").value); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") { closeDrawer(); if (state.busy) stop(); } });
}

wire();
init();
