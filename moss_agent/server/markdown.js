// Markdown to DOM nodes for the chat page: the model's text is never parsed as HTML.
// Every node is made with createElement / createTextNode; a link gets an href only for http(s) and mailto,
// and only the server's own /v1/images/ pictures are loaded. MOSS's citations <sup><|N|></sup> become
// numbered links to the turn's search hits.
"use strict";

const MossMarkdown = (() => {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const SAFE_HREF = /^(https?:\/\/|mailto:)/i;
  // Earliest match wins; at one position, the first alternative.
  const INLINE = new RegExp([
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
    /<sup>\s*<\|(\d+)\|>\s*<\/sup>|<\|(\d+)\|>/.source, // 3, 4: citation
    /!\[([^\]]*)\]\(\s*((?:[^()\s]|\([^()\s]*\))+)(?:\s+"[^"]*")?\s*\)/.source, // 5, 6: image
    /\[([^\]]+)\]\(\s*((?:[^()\s]|\([^()\s]*\))+)(?:\s+"[^"]*")?\s*\)/.source, // 7, 8: link (one level of parens)
    /(?<![\w*])\*\*(?=\S)([\s\S]*?\S)\*\*(?![\w*])|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 9, 10: strong
    /~~(?=\S)([\s\S]*?\S)~~/.source, // 11: strike
    /(?<![\w*])\*(?=[^\s*])([\s\S]*?[^\s*])\*(?![\w*])|(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 12, 13
    /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"\]])/.source, // 14: bare URL
    /<br\s*\/?>/.source, // a line break MOSS sometimes writes
    /\\([\\`*_{}[\]()#+\-.!~|<>])/.source, // 15: escaped character
  ].join("|"), "g");

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function link(text, href) {
    if (!SAFE_HREF.test(href)) return document.createTextNode(text);
    const a = el("a", null, text);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    return a;
  }

  function citation(number, ctx) {
    const sup = el("sup", "cite");
    const hit = ctx.sources[number - 1];
    const node = hit ? link(`[${number}]`, hit.url || "") : document.createTextNode(`[${number}]`);
    if (hit && hit.title && node.nodeType === 1) node.title = hit.title;
    sup.append(node);
    return sup;
  }

  function inline(text, ctx, parent) {
    let at = 0;
    INLINE.lastIndex = 0;
    const matches = [...text.matchAll(INLINE)];
    for (const m of matches) {
      if (m.index > at) parent.append(document.createTextNode(text.slice(at, m.index)));
      at = m.index + m[0].length;
      if (m[1] !== undefined) parent.append(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
      else if (m[3] !== undefined || m[4] !== undefined) parent.append(citation(Number(m[3] ?? m[4]), ctx));
      else if (m[5] !== undefined) parent.append((ctx.image && ctx.image(m[6], m[5])) || link(m[5] || m[6], m[6]));
      else if (m[7] !== undefined) {
        const a = link("", m[8]);
        inline(m[7], ctx, a.nodeType === 1 ? a : parent);
        if (a.nodeType === 1) parent.append(a);
      } else if (m[9] !== undefined || m[10] !== undefined) inline(m[9] ?? m[10], ctx, parent.appendChild(el("strong")));
      else if (m[11] !== undefined) inline(m[11], ctx, parent.appendChild(el("del")));
      else if (m[12] !== undefined || m[13] !== undefined) inline(m[12] ?? m[13], ctx, parent.appendChild(el("em")));
      else if (m[14] !== undefined) parent.append(link(m[14], m[14]));
      else if (m[15] !== undefined) parent.append(document.createTextNode(m[15]));
      else parent.append(el("br"));
    }
    if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
    return parent;
  }

  // Lines joined by line breaks: MOSS writes single newlines where it means them.
  function lines(list, ctx, parent) {
    list.forEach((line, i) => {
      if (i) parent.append(el("br"));
      inline(line.trim(), ctx, parent);
    });
    return parent;
  }

  function cells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split(/(?<!\\)\|/).map((c) => c.trim());
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
      || (line.includes("|") && next !== undefined && TABLE_RULE.test(next) && next.includes("-"));
  }

  function list(src, i, ctx, parent) {
    const first = ITEM.exec(src[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    while (i < src.length) {
      const m = ITEM.exec(src[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      i += 1;
      while (i < src.length) {
        const line = src[i];
        const lead = line.length - line.trimStart().length;
        if (line.trim() === "") {
          const next = src[i + 1];
          if (next === undefined || next.length - next.trimStart().length <= indent) break;
          body.push("");
        } else if (lead > indent) body.push(line.slice(Math.min(lead, indent + 4)));
        else if (!startsBlock(line) && !ITEM.test(line) && body[body.length - 1] !== "") body.push(line);
        else break;
        i += 1;
      }
      const li = node.appendChild(el("li"));
      li.append(blocks(body, ctx, document.createDocumentFragment()));
      // A tight item (no blank line inside) shows its paragraphs' contents, not <p> blocks.
      if (!body.includes("")) for (const p of [...li.children].filter((c) => c.tagName === "P")) p.replaceWith(...p.childNodes);
    }
    parent.append(node);
    while (i < src.length && src[i].trim() === "" && src[i + 1] !== undefined && ITEM.test(src[i + 1])
      && ITEM.exec(src[i + 1])[1].length === indent) i += 1;
    return i;
  }

  function blocks(src, ctx, parent) {
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      let m;
      if (line.trim() === "") { i += 1; continue; }
      if ((m = FENCE.exec(line))) {
        const end = src.findIndex((l, j) => j > i && l.trim().startsWith(m[1]) && l.trim().replace(/[`~]/g, "") === "");
        const body = src.slice(i + 1, end < 0 ? src.length : end);
        const pre = el("pre");
        const code = pre.appendChild(el("code", null, body.join("\n")));
        if (m[2]) code.dataset.lang = m[2];
        parent.append(pre);
        i = end < 0 ? src.length : end + 1;
      } else if ((m = HEADING.exec(line))) {
        parent.append(inline(m[2], ctx, el("h" + m[1].length)));
        i += 1;
      } else if (RULE.test(line)) {
        parent.append(el("hr"));
        i += 1;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < src.length && (m = QUOTE.exec(src[i]))) { body.push(m[1]); i += 1; }
        parent.append(blocks(body, ctx, el("blockquote")));
      } else if (ITEM.test(line)) {
        i = list(src, i, ctx, parent);
      } else if (startsBlock(line, src[i + 1])) { // a table
        const table = el("table");
        const head = table.appendChild(el("thead")).appendChild(el("tr"));
        for (const c of cells(line)) inline(c, ctx, head.appendChild(el("th")));
        const body = table.appendChild(el("tbody"));
        i += 2;
        while (i < src.length && src[i].includes("|") && src[i].trim() !== "") {
          const row = body.appendChild(el("tr"));
          for (const c of cells(src[i])) inline(c, ctx, row.appendChild(el("td")));
          i += 1;
        }
        parent.append(table);
      } else {
        const para = [line];
        i += 1;
        while (i < src.length && src[i].trim() !== "" && !startsBlock(src[i], src[i + 1])) { para.push(src[i]); i += 1; }
        parent.append(lines(para, ctx, el("p")));
      }
    }
    return parent;
  }

  /**
   * Render Markdown as DOM nodes.
   * @param {string} text The model's text.
   * @param {{sources?: {title: string, url: string}[], image?: (url: string, alt: string) => Node | null}} options
   *   sources: the turn's search hits, cited as <|N|> (1-based); image: the node of a Markdown image, or null
   *   for a link to it instead.
   * @returns {DocumentFragment}
   */
  function render(text, options = {}) {
    const ctx = { sources: options.sources || [], image: options.image };
    return blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), ctx, document.createDocumentFragment());
  }

  return { render };
})();
