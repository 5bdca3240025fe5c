// The demo page's "All tasks" view: every task on the all-tasks feed (GET /feed),
// from its `queued` on, whoever started it (the API, beat, another task), each as a
// card like the watched ones (card.js), newest first. Finished tasks stay until
// FEED_LIMIT newer ones push them out. The feed is one EventSource (progress.js
// `watchFeed`), with its cursor, reconnects and resets; a name filter reopens it
// with `?name=`.
//
// It is opened by the person, not on load: a page already holds one stream for its
// watched tasks, and browsers allow 6 connections per origin across all its tabs.
// Once opened, it opens again on the next load (localStorage), until Stop.
//
// The feed needs an operator's token or one with the feed scope. An EventSource
// never learns why it was refused, so the view first asks with a HEAD of the same
// URL (api.js checkFeed), and says in words what the token does not allow.
import { ApiError } from "./api.js";
import { createCard, makeFeedCard, showEvent, tick } from "./card.js";
import { isTerminal, watchFeed } from "./progress.js";

const FEED_LIMIT = 100;
const STORAGE_KEY = "progress-sse:feed";
// The server's limits on a filter (src/progress_sse/task_names.py), checked here
// first so that the person reads what is wrong before any request.
const MAX_NAMES = 50;
const MAX_NAME_LENGTH = 200;

/** What the filter field asks for: its names, or an error that says what to fix. */
export function namesFrom(text) {
  const names = [...new Set(text.split(",").map((name) => name.trim()).filter((name) => name !== ""))];
  const wrong = names.find((name) => name.startsWith(".") || name.length > MAX_NAME_LENGTH);
  if (wrong !== undefined) {
    const shown = wrong.length > 40 ? `${wrong.slice(0, 40)}…` : wrong;
    return { names, error: `"${shown}" is not a task name, nor a prefix ending in a dot like demo.` };
  }
  if (names.length > MAX_NAMES) return { names, error: `At most ${MAX_NAMES} names or prefixes, not ${names.length}.` };
  return { names, error: null };
}

/** Why the feed of `names` was refused, in words; null for a status that is not a refusal. */
function refusal(status, names) {
  const which = names.length ? `the tasks named ${names.join(", ")}` : "every task";
  if (status === 401) return "All tasks cannot be shown: this page needs a valid access token; ask for a new link.";
  if (status === 403) {
    return `All tasks cannot be shown: this page's access token does not allow seeing ${which} (it needs the operator scope, or a feed scope that covers them).`;
  }
  if (status === 400) return "The server refuses that filter: give task names, or prefixes ending in a dot like demo., separated by commas.";
  return null;
}

export class FeedView {
  /**
   * `section`: the view's panel (templates/index.html); `api`: api.js's, with the
   * page's token; `onWatch(event, card)`: watch the task closely; `onEnded(event,
   * card)`: a task was seen to end (completion notices); `onStatus` and `onNotice`:
   * the stream's, for the page's connection status and its notices.
   */
  constructor(section, { template, api, base, token, onWatch, onEnded = () => {}, onStatus, onNotice }) {
    this.section = section;
    this.template = template;
    this.api = api;
    this.base = base;
    this.token = token;
    this.onWatch = onWatch;
    this.onEnded = onEnded;
    this.onStatus = onStatus;
    this.onNotice = onNotice;
    this.form = section.querySelector("#feed-form");
    this.field = section.querySelector("#feed-names");
    this.stopButton = section.querySelector("#feed-stop");
    this.problem = section.querySelector("#feed-problem");
    this.empty = section.querySelector("#feed-empty");
    this.list = section.querySelector("#feed");
    this.cards = new Map(); // task id -> card, oldest first
    this.stream = null;
    this.run = null; // the current open(): a check still running for an older one is dropped
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this._submit();
    });
    this.stopButton.addEventListener("click", () => this.stop());
  }

  /** Open the feed again if it was open when the page was last left. */
  restore() {
    const names = remembered();
    if (names == null) return;
    this.field.value = names.join(", ");
    this.open(names);
  }

  /** Show the feed of `names` (none: every task), from the current states of the newest tasks. */
  async open(names) {
    this._close();
    remember(names);
    this._setState("on");
    const run = {};
    this.run = run;
    const refused = await this._check(names);
    if (this.run !== run) return; // stopped, or opened with another filter meanwhile
    if (refused) {
      this._refuse(refused);
      return;
    }
    this.stream = watchFeed(
      names,
      {
        onEvent: (event) => this._show(event),
        // The states that follow are the view from now on: whatever it showed may
        // have changed unseen (the history was lost, or the feed's log moved on).
        onReset: () => this._clear(),
        onStatus: (status) => this.onStatus(status),
        onNotice: (notice) => this.onNotice(notice),
        // The recheck has said whatever there was to say (and in open mode there is
        // no token to give back): the stream just tries again, with backoff.
        onTokenError: () => {},
      },
      // A connection that fails before opening may be a refusal (an expired token):
      // asked once per run of failures, as the page's other streams do.
      { base: this.base, token: this.token, getToken: () => this._recheck(run, names) },
    );
  }

  /** Close the feed and empty the view, for good (until Show again). */
  stop() {
    this._close();
    remember(null);
    this._setState("off");
  }

  /** Elapsed times, every second, of the tasks still running. */
  tick() {
    for (const card of this.cards.values()) if (!isTerminal(card.state)) tick(card);
  }

  _submit() {
    const { names, error } = namesFrom(this.field.value);
    if (error) {
      this.field.setAttribute("aria-invalid", "true");
      this._say(error);
      this.field.focus();
      return;
    }
    this.field.removeAttribute("aria-invalid");
    this.open(names);
  }

  // The refusal's words, or null when the feed may be opened (or the server could not
  // say: the stream then reconnects by itself until it can).
  async _check(names) {
    try {
      await this.api.checkFeed(names);
      return null;
    } catch (error) {
      return error instanceof ApiError ? refusal(error.status, names) : null;
    }
  }

  async _recheck(run, names) {
    const refused = await this._check(names);
    if (refused && this.run === run) this._refuse(refused);
    return this.token; // ignored once refused: the stream is closed
  }

  _refuse(words) {
    this._close();
    this._setState("refused");
    this._say(words);
  }

  _close() {
    this.run = null;
    this.stream?.close();
    this.stream = null;
    this.onStatus("closed");
    this._clear();
    this._say(null);
  }

  _show(event) {
    let card = this.cards.get(event.task_id);
    if (!card) card = this._add(event);
    // Elapsed time counts from the task's start, when the feed saw it (no request per
    // task for it: a feed may bring hundreds).
    if (event.state === "started") card.startedAt ??= event.ts;
    const before = card.state;
    const changed = showEvent(card, event);
    // An end seen happen, not a state the feed started with.
    if (changed && isTerminal(event.state) && before != null && !isTerminal(before)) this.onEnded(event, card);
  }

  _add(event) {
    const card = createCard(this.template, event.task_id, { name: event.name }, { base: this.base });
    makeFeedCard(card, () => this.onWatch(card.last ?? event, card));
    this.cards.set(event.task_id, card);
    this.list.prepend(card.node); // newest first
    while (this.cards.size > FEED_LIMIT) this._drop();
    this._updateEmpty();
    return card;
  }

  // The oldest card that has ended goes first; one still running is still news,
  // unless every card is.
  _drop() {
    const all = [...this.cards.values()];
    const card = all.find((c) => isTerminal(c.state)) ?? all[0];
    this.cards.delete(card.id);
    card.node.remove();
  }

  _clear() {
    this.cards.clear();
    this.list.replaceChildren();
    this._updateEmpty();
  }

  _setState(state) {
    this.section.dataset.feed = state; // off, on or refused
    this.stopButton.hidden = state !== "on";
    this._updateEmpty();
  }

  _updateEmpty() {
    this.empty.hidden = this.section.dataset.feed !== "on" || this.cards.size > 0;
  }

  _say(text) {
    this.problem.hidden = !text;
    this.problem.textContent = text ?? "";
  }
}

// The filter the view was open with, or null when it was closed: read on the next load.
function remembered() {
  try {
    const names = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "null");
    return Array.isArray(names) && names.every((name) => typeof name === "string") ? names : null;
  } catch {
    return null;
  }
}

function remember(names) {
  try {
    if (names == null) localStorage.removeItem(STORAGE_KEY);
    else localStorage.setItem(STORAGE_KEY, JSON.stringify(names));
  } catch {
    // storage disabled: the view stays as it is for this page
  }
}
