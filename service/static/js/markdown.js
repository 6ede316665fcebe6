// Answers shown as Markdown, safely, and cheaply while they stream.
//
// Safety: marked turns the text into HTML with raw HTML escaped (shown as text: a model writing
// <script> shows <script>), task boxes as ☑/☐ and images as links (nothing loads by itself);
// DOMPurify then keeps only the tags and attributes Markdown makes, links only to http(s) and
// mailto (opened in a new tab, no referrer), and a code block's language class. The page's CSP
// (script-src 'self', no inline script or style) stands behind both.
//
// Cost: the answer's raw text is the source of truth (the transports append to it, offsets count
// in it); this view is derived from it on animation frames, never per delta, and only its tail
// is parsed again: the blocks before the last few stay as they are (their DOM too). A render
// that took long delays the next (at most ~1/4 of the main thread goes to rendering). When the
// answer has ended, `flush` renders the whole text once more, exactly.

import { Marked } from "../vendor/marked.esm.js";
import createDOMPurify from "../vendor/purify.es.mjs";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const marked = new Marked({ gfm: true, breaks: false, async: false });
marked.use({
  renderer: {
    html: ({ text }) => escapeHtml(text),
    checkbox: ({ checked }) => (checked ? "☑ " : "☐ "),
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

const purify = createDOMPurify(window);
purify.setConfig({
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "li", "ol", "p", "pre", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  // Not URIs: without this DOMPurify holds them to ALLOWED_URI_REGEXP too and drops them.
  ADD_URI_SAFE_ATTR: ["align", "start"],
  RETURN_DOM_FRAGMENT: true,
}); // once: sanitize() then skips parsing a config on every call (several calls a frame)
const LANGUAGE_CLASS = /^language-[\w+#.-]{1,40}$/;
purify.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "class" && !(node.nodeName === "CODE" && LANGUAGE_CLASS.test(data.attrValue))) {
    data.keepAttr = false;
  }
});
purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

// A code block: its language and a copy button above it.
function decorateCode(pre) {
  const code = pre.querySelector("code");
  const lang = (code?.className.match(/language-(\S+)/) || [])[1] || "";
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.className = "code-lang";
  label.textContent = lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "code-copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", lang ? `Copy ${lang} code` : "Copy code");
  head.append(label, copy);
  const box = document.createElement("div");
  box.className = "code-block";
  pre.replaceWith(box);
  box.append(head, pre);
}

// Safe DOM nodes for some top-level tokens (`links`: the reference definitions they may use).
function renderTokens(tokens, links) {
  const list = [...tokens];
  list.links = links;
  const fragment = purify.sanitize(marked.parser(list));
  fragment.querySelectorAll("pre").forEach(decorateCode);
  return [...fragment.childNodes];
}

// The whole text, at once (history, and an answer that has ended).
export function renderMarkdown(text) {
  const tokens = marked.lexer(text);
  return renderTokens(tokens, tokens.links);
}

// How many of the last blocks are parsed again on each frame: a block may still change with
// the text after it (a paragraph that becomes a heading, a list that goes on after a blank line).
const REPARSED_BLOCKS = 3;
const RENDER_SHARE = 4; // after a render that took t ms, wait at least (RENDER_SHARE - 1) * t

export class MarkdownView {
  constructor(target, onRender = () => {}) {
    this.target = target;
    this.onRender = onRender;
    this.blocks = []; // {raw, raws, start, nodes}: what is shown, in groups of blocks
    this.links = Object.create(null);
    this.text = "";
    this.frame = 0;
    this.notBefore = 0;
    this.frameMs = []; // how long each render on a frame took (tests and measurements)
    this.flushMs = 0;
    this.parsed = []; // characters each tail render parsed again (tests: the work is the tail's)
    this.wholeRenders = 0; // flushes that had to render everything again
  }

  // Show `text` on a coming animation frame.
  update(text) {
    this.text = text;
    if (!this.frame) this.frame = requestAnimationFrame((now) => this.onFrame(now));
  }

  onFrame(now) {
    if (now < this.notBefore) {
      this.frame = requestAnimationFrame((t) => this.onFrame(t));
      return;
    }
    this.frame = 0;
    const started = performance.now();
    this.renderTail(this.text);
    this.onRender(); // scrolls: the layout it forces counts in the share too
    const took = performance.now() - started;
    this.frameMs.push(took);
    this.notBefore = now + took * (RENDER_SHARE - 1);
  }

  // Show `text` now, exactly as a whole render would (the answer has ended, or is history).
  // The text is parsed whole once more; when its blocks are the ones shown (nearly always), the
  // shown DOM stays and only the tail is rendered; otherwise (a reference link defined after its
  // use, a block the tail parse cut differently) everything is rendered again.
  flush(text) {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.text = text;
    const started = performance.now();
    const tokens = marked.lexer(text);
    const same = () => {
      const shown = this.blocks.flatMap((b) => b.raws);
      return shown.length === tokens.length && tokens.every((t, i) => t.raw === shown[i]);
    };
    if (this.blocks.length && !Object.keys(tokens.links).length && (this.renderTail(text), same())) {
      this.onRender();
    } else {
      this.wholeRenders++;
      this.blocks = [{ raws: tokens.map((t) => t.raw), start: 0, raw: text, nodes: [] }];
      this.links = Object.create(null);
      this.blocks[0].nodes = renderTokens(tokens, tokens.links);
      this.target.replaceChildren(...this.blocks[0].nodes);
      this.onRender();
    }
    this.flushMs = performance.now() - started;
  }

  // Render what is new: blocks that can no longer change in one go, the last few one by one
  // (each is parsed again next time, with the text after it).
  renderTail(text) {
    let keep = Math.max(0, this.blocks.length - REPARSED_BLOCKS);
    while (keep > 0 && !text.startsWith(this.blocks[keep - 1].raw, this.blocks[keep - 1].start)) keep--;
    const from = keep ? this.blocks[keep - 1].start + this.blocks[keep - 1].raw.length : 0;
    this.parsed.push(text.length - from);
    for (const block of this.blocks.splice(keep)) block.nodes.forEach((n) => n.remove());
    const tokens = marked.lexer(text.slice(from));
    Object.assign(this.links, tokens.links);
    const settled = Math.max(0, tokens.length - REPARSED_BLOCKS);
    const groups = [tokens.slice(0, settled), ...tokens.slice(settled).map((t) => [t])];
    let start = from;
    for (const group of groups.filter((g) => g.length)) {
      const nodes = renderTokens(group, this.links);
      const raws = group.map((t) => t.raw);
      const raw = raws.join("");
      this.target.append(...nodes);
      this.blocks.push({ raw, raws, start, nodes });
      start += raw.length;
    }
  }
}

// Copy text to the clipboard: the Clipboard API where the page is a secure context (https,
// localhost), else the older copy command.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "visually-hidden";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("copy refused");
}
