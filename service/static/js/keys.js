// The "API keys" dialog: create a key (its secret shown once, with a copy button, never kept by
// the page), list the user's keys (name and prefix, never a secret) and revoke one after a
// confirmation. A modal <dialog>: the browser keeps focus inside it and Escape closes it (not
// while a new secret is shown); focus goes back to the button that opened it.
//
// POST /api/keys {name, expires_at?, models?, limit?} -> 201 {..., key}; GET /api/keys ->
// {items}; DELETE /api/keys/{id} -> 204. A key's limit is in the budget's unit: tokens, or a
// decimal string of the currency when the budget counts money.

import { api } from "./api.js";
import { $, h } from "./dom.js";
import { describe } from "./errors.js";
import { copyText } from "./markdown.js";
import { formatMoney, isMoneyUnit, toNanos } from "./money.js";

const when = (iso, empty) => {
  if (!iso) return empty;
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? empty : at.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
};

// The end of the chosen day, in the browser's time zone, as RFC 3339 (UTC).
function endOfDay(date) {
  const at = new Date(`${date}T23:59:59.999`);
  return Number.isNaN(at.getTime()) ? null : at.toISOString();
}

function today() {
  const d = new Date();
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
}

// A key's start as its secret begins ("cgw-" and the first characters), to tell keys apart.
const SECRET_START = "cgw-";
const shownPrefix = (prefix) => (String(prefix).startsWith(SECRET_START) ? prefix : `${SECRET_START}${prefix}`);

export class KeysDialog {
  // budgetUnit(): "tokens" or the currency's code (what a key's limit counts).
  constructor({ budgetUnit }) {
    this.budgetUnit = budgetUnit;
    this.opener = null;
    this.el = {
      dialog: $("#keys-dialog"),
      close: $("#keys-close"),
      error: $("#keys-error"),
      secret: $("#keys-secret"),
      secretName: $("#keys-secret-name"),
      secretValue: $("#keys-secret-value"),
      secretCopy: $("#keys-secret-copy"),
      secretDone: $("#keys-secret-done"),
      form: $("#keys-form"),
      name: $("#keys-name"),
      expires: $("#keys-expires"),
      limit: $("#keys-limit"),
      limitLabel: $("#keys-limit-label"),
      models: $("#keys-models"),
      modelsList: $("#keys-models-list"),
      create: $("#keys-create"),
      loading: $("#keys-loading"),
      empty: $("#keys-empty"),
      table: $("#keys-table"),
      list: $("#keys-list"),
      status: $("#keys-announce"),
    };
    this.bind();
  }

  bind() {
    const e = this.el;
    e.close.addEventListener("click", () => this.close());
    e.dialog.addEventListener("close", () => this.closed());
    // Escape neither, while a new secret is shown: it is never shown again ("I have copied
    // it" or the close button put it away)
    e.dialog.addEventListener("cancel", (ev) => {
      if (!e.secret.hidden) ev.preventDefault();
    });
    // a click on the backdrop (the dialog element itself, outside its box) closes it
    // (not while a new secret is shown: a stray click must not lose it)
    e.dialog.addEventListener("click", (ev) => {
      if (ev.target === e.dialog && e.secret.hidden) this.close();
    });
    e.form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.create();
    });
    e.secretCopy.addEventListener("click", () => this.copySecret());
    e.secretDone.addEventListener("click", () => this.hideSecret(true));
  }

  async open(opener) {
    this.opener = opener || document.activeElement;
    this.hideError();
    this.hideSecret(false);
    const money = isMoneyUnit(this.budgetUnit());
    this.el.limitLabel.textContent = `Monthly limit in ${money ? this.budgetUnit() : "tokens"} (optional)`;
    this.el.limit.inputMode = money ? "decimal" : "numeric";
    this.el.expires.min = today();
    this.el.dialog.showModal();
    this.el.name.focus();
    await Promise.all([this.loadModels(), this.load()]);
  }

  close() {
    if (this.el.dialog.open) this.el.dialog.close();
  }

  // However it was closed (button, Escape, backdrop): forget the secret, give focus back.
  closed() {
    this.hideSecret(false);
    this.opener?.focus();
    this.opener = null;
  }

  // Said to screen readers from inside the dialog (the page behind a modal one is inert).
  announce(text) {
    this.el.status.textContent = text;
  }

  showError(text) {
    this.el.error.textContent = text;
    this.el.error.hidden = false;
  }

  hideError() {
    this.el.error.hidden = true;
    this.el.error.textContent = "";
  }

  report(exc) {
    this.showError(exc && exc.code ? describe(exc) : "Something went wrong on this page. Reload it and try again.");
    if (!(exc && exc.code)) console.error(exc);
  }

  async loadModels() {
    try {
      const { models } = await api("GET", "/api/models");
      const ticked = new Set([...this.el.modelsList.querySelectorAll("input:checked")].map((i) => i.value));
      this.el.modelsList.replaceChildren(
        ...models.map((m) =>
          h(
            "label",
            { class: "keys-model" },
            h("input", { type: "checkbox", name: "models", value: m.name, checked: ticked.has(m.name) }),
            m.name,
          ),
        ),
      );
      this.el.models.hidden = !models.length;
    } catch (exc) {
      this.report(exc);
    }
  }

  async load() {
    this.el.loading.textContent = "Loading your keys…";
    try {
      const { items } = await api("GET", "/api/keys");
      this.render(items);
      this.el.loading.textContent = "";
    } catch (exc) {
      this.el.loading.textContent = "";
      if (exc.status === 404 && exc.code === "not_found") this.showError("This server does not offer API keys.");
      else this.report(exc);
    }
  }

  render(items) {
    this.el.list.replaceChildren(...items.map((k) => this.row(k)));
    this.refreshEmpty();
  }

  refreshEmpty() {
    const any = this.el.list.children.length > 0;
    this.el.table.hidden = !any;
    this.el.empty.hidden = any;
  }

  limitText(limit) {
    if (limit == null) return "none";
    const unit = this.budgetUnit();
    if (isMoneyUnit(unit)) return formatMoney(limit, unit) || String(limit);
    return `${Number(limit).toLocaleString()} tokens`;
  }

  // A key's own limit and, this month, how much of it the key used ("25 of 100,000 tokens used").
  limitCell(key) {
    const limit = this.limitText(key.limit);
    if (key.limit == null || key.used == null) return limit;
    const unit = this.budgetUnit();
    const used = isMoneyUnit(unit) ? formatMoney(key.used, unit) || String(key.used) : Number(key.used).toLocaleString();
    return `${used} of ${limit} used`;
  }

  row(key) {
    const tr = h(
      "tr",
      { class: "key-row", dataset: { keyId: key.id } },
      h("th", { scope: "row", class: "key-name" }, key.name, key.admin ? h("span", { class: "key-badge" }, "admin") : null),
      h("td", { class: "key-prefix" }, h("code", {}, `${shownPrefix(key.prefix)}…`)),
      h("td", {}, when(key.created_at, "")),
      h("td", { class: "key-used" }, when(key.last_used_at, "never")),
      h("td", { class: "key-expires" }, when(key.expires_at, "never")),
      h("td", { class: "key-models" }, key.models && key.models.length ? key.models.join(", ") : "any"),
      h("td", { class: "key-limit" }, this.limitCell(key)),
      h("td", { class: "key-actions" }),
    );
    this.showRevoke(tr, key);
    return tr;
  }

  showRevoke(tr, key) {
    const cell = tr.querySelector(".key-actions");
    const button = h(
      "button",
      { class: "key-revoke", type: "button", "aria-label": `Revoke ${key.name}`, onclick: () => this.confirmRevoke(tr, key) },
      "Revoke",
    );
    cell.replaceChildren(button);
    return button;
  }

  // Revoking asks first: a program using the key stops working.
  confirmRevoke(tr, key) {
    const cell = tr.querySelector(".key-actions");
    const cancel = h("button", { class: "key-revoke-no", type: "button", onclick: () => this.showRevoke(tr, key).focus() }, "Cancel");
    cell.replaceChildren(
      h(
        "div",
        {
          class: "confirm",
          role: "group",
          "aria-label": `Confirm revoking ${key.name}`,
          onkeydown: (ev) => {
            if (ev.key !== "Escape") return;
            ev.preventDefault(); // Escape here cancels the revoke, not the whole dialog
            ev.stopPropagation();
            this.showRevoke(tr, key).focus();
          },
        },
        h("span", {}, "Programs using it stop working."),
        h("button", { class: "key-revoke-yes danger", type: "button", onclick: () => this.revoke(tr, key) }, "Revoke"),
        cancel,
      ),
    );
    cancel.focus();
  }

  async revoke(tr, key) {
    this.hideError();
    try {
      await api("DELETE", `/api/keys/${encodeURIComponent(key.id)}`);
    } catch (exc) {
      if (exc.code !== "key_not_found") {
        this.showRevoke(tr, key).focus();
        return this.report(exc);
      }
    }
    const next = tr.nextElementSibling || tr.previousElementSibling;
    tr.remove();
    this.refreshEmpty();
    (next?.querySelector(".key-revoke") || this.el.name).focus();
    this.announce(`Key ${key.name} revoked.`);
  }

  // The form's values as the API's body, or null (with the reason shown) when one is not valid.
  body() {
    const e = this.el;
    const name = e.name.value.trim();
    if (!name) return this.invalid(e.name, "Give the key a name, to know it again in the list.");
    const body = { name };
    if (e.expires.value) {
      const at = endOfDay(e.expires.value);
      if (!at || new Date(at) <= new Date()) return this.invalid(e.expires, "Pick a day from today on for the key to expire.");
      body.expires_at = at;
    }
    const limit = e.limit.value.trim();
    if (limit) {
      const money = isMoneyUnit(this.budgetUnit());
      // money: the decimal string as typed (checked exactly); tokens: a whole number
      const value = money ? (toNanos(limit) === null ? null : limit) : /^\d+$/.test(limit) ? Number(limit) : null;
      if (value === null || (!money && !Number.isSafeInteger(value))) {
        return this.invalid(e.limit, money ? "The limit is an amount of money, e.g. 5 or 0.50." : "The limit is a whole number of tokens, e.g. 100000.");
      }
      body.limit = value;
    }
    const models = [...e.modelsList.querySelectorAll("input:checked")].map((i) => i.value);
    if (models.length) body.models = models;
    return body;
  }

  invalid(input, text) {
    input.setAttribute("aria-invalid", "true");
    input.addEventListener("input", () => input.removeAttribute("aria-invalid"), { once: true });
    this.showError(text);
    input.focus();
    return null;
  }

  async create() {
    this.hideError();
    const body = this.body();
    if (!body) return;
    this.el.create.disabled = true;
    try {
      const key = await api("POST", "/api/keys", body);
      this.el.form.reset();
      for (const box of this.el.modelsList.querySelectorAll("input")) box.checked = false;
      this.showSecret(key);
      this.el.list.prepend(this.row(key)); // the row is built from the fields a list shows
      this.refreshEmpty();
    } catch (exc) {
      this.report(exc);
    } finally {
      this.el.create.disabled = false;
    }
  }

  // The secret, once: in a read-only field (selected, to copy by hand too) until "I have
  // copied it" or the dialog closes; then it is gone from the page.
  showSecret(key) {
    const e = this.el;
    e.secretName.textContent = `“${key.name}”`;
    e.secretValue.value = key.key;
    e.secret.hidden = false;
    e.form.hidden = true;
    e.secretValue.focus();
    e.secretValue.select();
    this.announce("Key created. Copy it now: you will not see it again.");
  }

  hideSecret(refocus) {
    const e = this.el;
    e.secretValue.value = "";
    e.secret.hidden = true;
    e.form.hidden = false;
    e.secretCopy.textContent = "Copy";
    if (refocus) e.name.focus();
  }

  async copySecret() {
    const button = this.el.secretCopy;
    try {
      await copyText(this.el.secretValue.value);
      button.textContent = "Copied";
      this.announce("The key is copied to the clipboard.");
    } catch {
      button.textContent = "Copy failed";
      this.el.secretValue.select();
      this.announce("Could not copy: the browser refused. Select the key and copy it by hand.");
    }
  }
}
