// Completion notices: a watched task, or one in the All tasks view, that ends while
// the tab is hidden says so in
// the tab's title ("✓ demo.count — progress-sse", restored once the tab is seen
// again) and, when the person asked for them, in a desktop notification. Nothing
// is shown while the tab is visible: the card says it there.
//
// The browser's permission is asked only when the "Notify me when tasks end" button
// is pressed: browsers ignore, or hold against the site, a request no gesture made.
// The button is a toggle (aria-pressed); turned off, it is remembered, since a page
// cannot take a permission back.
import { symbol } from "./card.js";

const PREFERENCE_KEY = "progress-sse:notify"; // "off" once turned off; absent: on when permitted
const OUTCOME = { success: "succeeded", failure: "failed", revoked: "was cancelled", lost: "was lost" };
const MAX_BODY = 200;
const TOLD_KEPT = 1000; // tasks remembered as told of: a feed brings new ones for ever

export class CompletionNotices {
  constructor(button) {
    this.button = button;
    this.title = null; // the page's own title while ours stands in for it
    this.ended = 0; // tasks ended since the tab was hidden
    this.told = new Set(); // tasks already told of: one may be both watched and in the view
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this._restoreTitle();
    });
    if (button && supported()) {
      button.hidden = false;
      button.addEventListener("click", () => this._toggle());
    }
    this._render();
  }

  /**
   * A task ended (`event`, its terminal event; `name`, what its card calls it).
   * `onClick` runs when its notification is clicked. `tag`: the notification's;
   * by default its own task's. The All tasks view gives its tasks one tag, so each
   * of their notifications replaces the one before: a busy feed shows one, not a
   * pile (the title counts them).
   */
  taskEnded(event, name, onClick = null, tag = `progress-sse:${event.task_id}`) {
    if (document.visibilityState !== "hidden" || this.told.has(event.task_id)) return;
    this.told.add(event.task_id);
    if (this.told.size > TOLD_KEPT) this.told.delete(this.told.values().next().value); // the oldest
    this._showInTitle(event, name);
    if (this._enabled()) notify(event, name, onClick, tag);
  }

  _showInTitle(event, name) {
    this.title ??= document.title;
    this.ended += 1;
    const more = this.ended > 1 ? ` (+${this.ended - 1})` : "";
    document.title = `${symbol(event.state) || "•"} ${name}${more} — ${this.title}`;
  }

  _restoreTitle() {
    if (this.title == null) return;
    document.title = this.title;
    this.title = null;
    this.ended = 0;
  }

  _enabled() {
    return supported() && Notification.permission === "granted" && preference() !== "off";
  }

  async _toggle() {
    if (this._enabled()) {
      setPreference("off");
    } else {
      setPreference(null);
      if (Notification.permission === "default") {
        try {
          await Notification.requestPermission();
        } catch {
          // an old browser's callback-only form: the button says what came of it below
        }
      }
    }
    this._render();
  }

  _render() {
    const { button } = this;
    if (!button || !supported()) return;
    const denied = Notification.permission === "denied";
    button.setAttribute("aria-pressed", String(this._enabled()));
    button.disabled = denied;
    button.title = denied ? "This browser blocks notifications from this site: allow them in its site settings." : "";
  }
}

function notify(event, name, onClick, tag) {
  try {
    const notification = new Notification(`${name} ${OUTCOME[event.state] ?? event.state}`, {
      body: bodyOf(event),
      tag,
      renotify: true, // a replacement still says so
    });
    notification.onclick = () => {
      window.focus();
      onClick?.();
      notification.close();
    };
  } catch (error) {
    // Some browsers (Chrome on Android) allow notifications only from a service
    // worker; the title has said it all the same.
    console.warn("progress-sse: no desktop notification", error);
  }
}

// What the task said last: the error of a failure, else its message, else the result.
function bodyOf(event) {
  let text = event.message ?? "";
  if (event.state === "failure" && event.error) {
    text = event.error.message ? `${event.error.type}: ${event.error.message}` : event.error.type;
  } else if (!text && event.state === "success" && event.result !== undefined) {
    text = `Result: ${JSON.stringify(event.result)}`;
  }
  return text.length > MAX_BODY ? `${text.slice(0, MAX_BODY - 1)}…` : text;
}

function supported() {
  return typeof window.Notification === "function";
}

function preference() {
  try {
    return localStorage.getItem(PREFERENCE_KEY);
  } catch {
    return null;
  }
}

function setPreference(value) {
  try {
    if (value == null) localStorage.removeItem(PREFERENCE_KEY);
    else localStorage.setItem(PREFERENCE_KEY, value);
  } catch {
    // storage disabled: the toggle lasts as long as the page
  }
}
