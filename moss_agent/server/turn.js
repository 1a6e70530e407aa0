// One view of a turn, the same live and restored: the question, the reply (Markdown as DOM nodes, citations
// linked to the turn's search hits), its images, the folded trace (inner thoughts, commands, results) and the
// actions (copy; regenerate on the last turn). Loaded before page.js, whose helpers (el, request, ...) it uses.
"use strict";

const TRACE = [["thoughts", "Inner thoughts"], ["commands", "Commands"], ["results", "Results"]];

function addUser(text) {
  const node = el("div", "msg user", text);
  $("messages").append(node);
  updateEmpty();
  scrollDown();
  return node;
}

function addAssistant(human) {
  const box = el("div", "msg assistant");
  const reply = el("div", "reply");
  const trace = el("details", "trace");
  trace.hidden = true;
  trace.append(el("summary", null, "Inner thoughts, commands and results"));
  const parts = {};
  for (const [key, label] of TRACE) {
    const part = el("div", "trace-part " + key);
    part.hidden = true;
    part.append(el("h4", null, label), (parts[key] = el("pre")));
    trace.append(part);
  }
  const sources = el("ol", "sources");
  sources.hidden = true;
  const actions = el("div", "actions");
  box.append(reply, sources, trace, actions);
  $("messages").append(box);
  scrollDown();
  const view = { box, reply, trace, parts, sources, actions, human, text: "", hits: [], images: new Set(), pending: 0 };
  box.view = view;
  return view;
}

function renderReply(view) {
  view.pending = 0;
  const image = (url, alt) => (url.startsWith("/v1/images/") ? imageNode(url, alt) : null);  // others: a link
  view.reply.replaceChildren(MossMarkdown.render(view.text, { sources: view.hits, image }));
  view.sources.replaceChildren();
  view.sources.hidden = !view.hits.length;
  for (const hit of view.hits) {
    const item = view.sources.appendChild(el("li"));
    if (/^https?:\/\//i.test(hit.url || "")) {
      const a = item.appendChild(el("a", null, hit.title || hit.url));
      a.href = hit.url;
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
    } else item.textContent = [hit.title, hit.url].filter(Boolean).join(" \u2014 ");
  }
}

function appendText(view, text) {
  view.text += text;
  if (!view.pending) view.pending = requestAnimationFrame(() => { renderReply(view); scrollDown(); });
}

function traceAppend(view, key, text) {
  if (!text) return;
  const pre = view.parts[key];
  pre.textContent += (pre.textContent ? "\n" : "") + text;
  pre.parentElement.hidden = false;
  view.trace.hidden = false;
}

// The stored turn's texts: what a finished live turn shows too, so the two views are the same.
function setTrace(view, turn) {
  for (const [key] of TRACE) { view.parts[key].textContent = ""; view.parts[key].parentElement.hidden = true; }
  view.trace.hidden = true;
  traceAppend(view, "thoughts", turn.inner_thoughts && turn.inner_thoughts !== "None" ? turn.inner_thoughts : "");
  if (turn.commands && turn.commands !== "None") {
    traceAppend(view, "commands", turn.commands.trim());
    traceAppend(view, "results", (turn.results || "").trim());
  }
}

function imageNode(url, alt) {
  const img = el("img", "generated");
  img.alt = alt || "generated image";
  request(url).then((r) => r.blob()).then((blob) => { img.src = URL.createObjectURL(blob); scrollDown(); })
    .catch((err) => img.replaceWith(el("span", "label", "image unavailable: " + err.message)));
  return img;
}

function addImage(view, url) {
  if (!url || view.images.has(url)) return;
  view.images.add(url);
  view.box.insertBefore(imageNode(url), view.sources);
}

function searchHits(artifact) {
  return Array.isArray(artifact) ? artifact.filter((h) => h && typeof h === "object" && "url" in h) : [];
}

function addActions(view, last) {
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => copyText(view.text, copy));
  view.actions.replaceChildren(copy);
  if (last) {
    const again = el("button", "regenerate", "Regenerate");
    again.type = "button";
    again.addEventListener("click", () => regenerate(view));
    view.actions.append(again);
  }
}

function markLast() {
  const views = [...$("messages").querySelectorAll(".msg.assistant")].map((b) => b.view);
  views.forEach((v, i) => { if (v.done) addActions(v, i === views.length - 1); });
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard permission (plain http on another host): the old way
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function showTurn(turn) {
  addUser(turn.human);
  const view = addAssistant(turn.human);
  view.text = turn.reply;
  view.hits = turn.sources || [];
  setTrace(view, turn);
  renderReply(view);
  for (const url of turn.images || []) addImage(view, url);
  view.done = true;
  view.box.classList.add("done");
}

function showEvent(view, event) {
  if (event.type === "thoughts") traceAppend(view, "thoughts", event.text);
  else if (event.type === "command") traceAppend(view, "commands", event.command);
  else if (event.type === "result") {
    traceAppend(view, "results", event.error || event.output);
    view.hits.push(...searchHits(event.artifact));
    addImage(view, event.image_url);
  } else if (event.type === "turn") {
    setTrace(view, event);
    for (const url of event.images || []) addImage(view, url);
  }
}
