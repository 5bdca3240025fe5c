// progress-sse client: live task progress over one EventSource, no dependencies.
//
//   import { watch, bindProgress } from "/static/<version>/progress.js";
//   const w = watch([taskId], { onProgress: (e) => …, onSuccess: (e) => … });
//   w.add(otherId);  // same connection, nothing lost for the others
//   bindProgress(document.querySelector("progress"), taskId);
//   watch([taskId], handlers, { token, getToken });  // a server that wants tokens
//   const feed = watchFeed(["reports."], { onEvent: (e) => … });  // every task, as it is queued
//
// Every callback receives the event object of the protocol (task_id, name, state,
// current, total, percent, message, ts, …), never a DOM node. A notice the service
// broadcasts goes to `onNotice`, on any stream.
//
// Event ids (cursors) are strings of one of two forms. On a single Redis,
// `<epoch>-<n>`: `n` counts events within one history of the server's log, the
// epoch names that history. On a Redis Cluster the log is split into partitions,
// each with its own count and history, so an id is composite,
// `<digest>.<entry>(.<entry>)*`: the digest names the histories of the partitions
// listed, each entry a partition's count, the first one that of the event the id
// came with. Only ids of the same history compare; any other id is a new history
// (see `isAfter`).

export const TERMINAL_STATES = Object.freeze(["success", "failure", "revoked", "lost"]);
const STATES = ["queued", "started", "progress", "retry", ...TERMINAL_STATES];
const HANDLER_FOR = {
  queued: "onQueued",
  started: "onStarted",
  progress: "onProgress",
  retry: "onRetry",
  success: "onSuccess",
  failure: "onFailure",
  revoked: "onRevoked",
  lost: "onLost",
};
// The server's rule for task ids (src/progress_sse/keys.py).
const TASK_ID = /^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}$/;
const MAX_TASKS_PER_STREAM = 100;
// `<epoch>-<n>`, split at the last `-`; a bare `<n>` (a server from before epochs,
// or the cursor `0`) is of the epoch "". BigInt: `n` may pass 2^53, where Numbers
// stop telling ids apart.
const EVENT_ID = /^(?:(.*)-)?(\d+)$/;
// `<digest>.<entry>(.<entry>)*`, never with a `-`, so never taken for the form above.
// An entry is `<p><n>`: the partition `p` as one base62 digit, then its count `n`
// in base62 without leading zeros (so one count has one spelling). The first entry
// is the lead (the event's own partition), the rest follow by partition.
const COMPOSITE_ID = /^([a-z2-7]{8})((?:\.[0-9a-zA-Z](?:0|[1-9a-zA-Z][0-9a-zA-Z]*))+)$/;
// Digits, then lower case, then upper case: 'a' is 10, 'A' is 36.
const BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
// A connection open this long (ms) counts as healthy even without an event.
const HEALTHY_AFTER = 5000;

export function isTerminal(state) {
  return TERMINAL_STATES.includes(state);
}

export function isTaskId(value) {
  return typeof value === "string" && TASK_ID.test(value);
}

/**
 * Whether event id `id` comes after `than` (null: nothing yet). Within one epoch
 * the larger `n` is later; an id of another epoch always counts as later, since
 * it belongs to a new history and what came before no longer counts.
 * Composite ids of one digest compare by `id`'s lead: its partition's count
 * against `than`'s count for that partition. A partition `than` does not list has
 * nothing to be behind, and ids of different forms or digests, or that do not
 * parse, are of another history: later, as above.
 */
export function isAfter(id, than) {
  if (than == null) return true;
  const a = parseCompositeId(String(id));
  const b = parseCompositeId(String(than));
  if (a || b) {
    if (!a || !b || a.digest !== b.digest) return true; // not of this history
    const seen = b.counts.get(a.lead);
    if (seen == null) return true; // `than` knew nothing of this partition
    return a.counts.get(a.lead) > seen;
  }
  const x = EVENT_ID.exec(String(id));
  const y = EVENT_ID.exec(String(than));
  if (!x || !y || (x[1] ?? "") !== (y[1] ?? "")) return true; // not of this history
  return BigInt(x[2]) > BigInt(y[2]);
}

// {digest, lead, counts: Map(partition digit -> BigInt)}, or null for anything
// else (an id of today's form, or a malformed one). A partition listed twice has
// no one count, so that id is malformed; the order of the rest is not checked, as
// comparing does not depend on it.
function parseCompositeId(id) {
  const match = COMPOSITE_ID.exec(id);
  if (!match) return null;
  const entries = match[2].slice(1).split(".");
  const counts = new Map();
  for (const entry of entries) {
    if (counts.has(entry[0])) return null;
    counts.set(entry[0], fromBase62(entry.slice(1)));
  }
  return { digest: match[1], lead: entries[0][0], counts };
}

// BigInt: a partition's count may pass 2^53 like any other.
function fromBase62(digits) {
  let value = 0n;
  for (const digit of digits) value = value * 62n + BigInt(BASE62.indexOf(digit));
  return value;
}

/** Watch tasks on one EventSource. See `Watch` for the handlers and options. */
export function watch(taskIds = [], handlers = {}, options = {}) {
  return new Watch(taskIds, handlers, options);
}

/**
 * Follow the all-tasks feed (GET /feed) on one EventSource: every task, or those
 * whose names `names` lets through ("demo.count", or "reports." for every name
 * that starts so). See `Feed` for the handlers; the options are `watch`'s.
 */
export function watchFeed(names = [], handlers = {}, options = {}) {
  return new Feed(names, handlers, options);
}

/**
 * Drive a `<progress>` element from one task: indeterminate (no `value`) while the
 * total is unknown, `value`/`max` while it is known, full on success.
 * `options` are those of `watch`, plus its handlers (`onEvent`, `onSuccess`, …).
 */
export function bindProgress(element, taskId, options = {}) {
  const { onEvent, onUnknown, onReset } = options;
  return watch([taskId], {
    ...options,
    onEvent: (event) => {
      applyToProgress(element, event);
      onEvent?.(event);
    },
    onUnknown: (event) => {
      element.value = 0; // nothing to show: stop the indeterminate animation
      onUnknown?.(event);
    },
    onReset: (reset) => {
      if (reset.missing.includes(taskId)) element.value = 0; // its old progress is gone
      onReset?.(reset);
    },
  }, options);
}

/** Show an event on a `<progress>` element. */
export function applyToProgress(element, event) {
  const total = event.total;
  if (event.state === "success") {
    const max = total != null && total > 0 ? total : 1;
    element.max = max;
    element.value = max;
  } else if (total == null) {
    if (isTerminal(event.state)) {
      element.value = 0; // a stopped bar must not keep animating
    } else {
      element.removeAttribute("value"); // the browser animates an indeterminate bar
    }
  } else {
    const max = total > 0 ? total : 1;
    element.max = max;
    element.value = Math.min(Math.max(event.current ?? 0, 0), max);
  }
}

/**
 * What `Watch` and `Feed` share: one EventSource, reopened by the client itself
 * with backoff and its cursor, tokens, the status, and the frames that are not a
 * task's (`reset`, `notice`).
 *
 * Handlers both take (all optional): onReset({reason, message, missing}) when the
 * server lost the history the stream followed, or could not place its cursor in the
 * current one: the current states follow, applied whatever their ids;
 * onNotice({id, text, ts}) for a notice the service broadcasts to every stream
 * (POST /notices). A notice is not a task frame and moves no cursor, and a stream
 * that (re)connects is sent the latest notice again, so the same `id` comes more
 * than once;
 * onStatus(status) with "connecting", "live", "reconnecting", "idle" or "closed";
 * onTokenError(error) when `getToken` failed (threw, or gave no token; without this
 * handler it goes to console.warn).
 *
 * Options: base (URL prefix of the API, default ""), withCredentials,
 * initialBackoff / maxBackoff (ms, default 1000 / 30000) for reconnecting after
 * an error response, which ends an EventSource for good. Each delay is the backoff
 * times a random 0.5 to 1.5, so clients a deploy disconnected together come back
 * spread out. The backoff starts over only once a connection proved healthy (an
 * event came, or it stayed open HEALTHY_AFTER ms): a server that answers "retry
 * later" (a 200 that ends at once) is not hammered.
 *
 * Access tokens, for a server that wants them:
 * - token: the access token (a JWT string). It rides on the stream's URL as
 *   `token=<jwt>`, since an EventSource cannot send an Authorization header.
 * - getToken: an async function that returns a new token (from your own
 *   backend, say). A refused token (401: missing, invalid or expired) reaches an
 *   EventSource only as an error before it opens, and the server ends a stream
 *   when its token expires. So whenever a connection fails without having
 *   opened, getToken() is called once for that run of failures, and the stream
 *   reopens at once with the new token and the cursor: nothing is lost or
 *   repeated. If that fails as well, reconnecting backs off as usual; the next
 *   connection that opens makes getToken eligible again. A getToken() that
 *   throws or returns no string is reported (onTokenError, or console.warn) and
 *   the current token is kept, with the usual backoff.
 * Without getToken an expired token is retried with backoff until you call
 * setToken() or close().
 */
class Stream {
  constructor(handlers = {}, options = {}) {
    this.handlers = handlers;
    this.base = options.base ?? "";
    this.withCredentials = options.withCredentials ?? false;
    this.initialBackoff = options.initialBackoff ?? 1000;
    this.maxBackoff = options.maxBackoff ?? 30000;
    this.backoff = this.initialBackoff;
    this.token = options.token || null;
    this.getToken = typeof options.getToken === "function" ? options.getToken : null;
    this.renewed = false; // getToken() was called for the current run of failures
    this.renewal = null; // the getToken() call in flight, if any
    this.cursor = null; // the latest event id seen (see isAfter): one cursor covers every task
    this.cursorLost = false; // a reset came: the next id starts the cursor over, whatever it is
    this.source = null;
    this.timer = null;
    this.closed = false;
    this.status = "idle";
  }

  /** Use another token from now on: the stream reopens with it, at its cursor. */
  setToken(token) {
    this.token = token || null;
    this.renewal = null; // a getToken() still running must not undo this
    this._schedule(0);
  }

  /** Stop for good. */
  close() {
    this.closed = true;
    this.renewal = null;
    clearTimeout(this.timer);
    this.source?.close();
    this.source = null;
    this._setStatus("closed");
  }

  // Adds and removes made together reopen the stream once.
  _schedule(delay = 20) {
    if (this.closed) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this._open(), delay);
  }

  // What the subclass streams: its path and query, or null when there is nothing
  // to stream (the stream is then idle).
  _request() {
    throw new Error("not implemented");
  }

  _open() {
    this.source?.close();
    this.source = null;
    const request = this._request();
    if (request == null) {
      this._setStatus("idle");
      return;
    }
    const { path, params } = request;
    if (this.token) params.set("token", this.token);
    let opened = false;
    const source = new EventSource(`${this.base}${path}?${params}`, { withCredentials: this.withCredentials });
    this.source = source;
    this._setStatus("connecting");
    let openedAt = null;
    source.onopen = () => {
      opened = true;
      openedAt = Date.now();
      this.renewed = false;
      this._setStatus("live");
    };
    source.onerror = () => {
      if (source !== this.source || this.closed) return;
      if (openedAt != null && Date.now() - openedAt >= HEALTHY_AFTER) this.backoff = this.initialBackoff;
      // Reconnect ourselves, whatever the browser would do: an error response (a
      // 503 during a deploy, a 401 for an expired token) ends an EventSource for
      // good, and the browser's own retry would reuse this URL, whose query (a
      // fresh= list, the token) is out of date by now.
      if (!opened && this.getToken && !this.renewed) this._renew();
      else this._retry();
    };
    // EventSource keeps the last `id:` for frames that have none, so a frame whose
    // lastEventId is the previous frame's carried no id (a reset, a notice, an
    // unknown, a state that survived an older history).
    let previousId = "";
    const listen = (type, receive) =>
      source.addEventListener(type, (message) => {
        if (source !== this.source) return;
        const id = message.lastEventId !== previousId ? message.lastEventId : null;
        previousId = message.lastEventId;
        receive(message, id);
      });
    for (const state of [...STATES, "unknown"]) listen(state, (message, id) => this._receive(message, id));
    listen("reset", (message) => this._reset(JSON.parse(message.data)));
    listen("notice", (message) => this._notice(message));
  }

  _retry() {
    this.source?.close();
    this.source = null;
    this._setStatus("reconnecting");
    const delay = this.backoff * (0.5 + Math.random());
    this.backoff = Math.min(this.backoff * 2, this.maxBackoff);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this._open(), delay);
  }

  // A connection failed before opening, perhaps for its token: ask for a new one
  // once, then reopen at once from the cursor.
  async _renew() {
    this.renewed = true;
    this.source?.close();
    this.source = null;
    clearTimeout(this.timer);
    this._setStatus("reconnecting");
    const renewal = {};
    this.renewal = renewal;
    let token = null;
    let failure = null;
    try {
      token = await this.getToken();
    } catch (error) {
      failure = error;
    }
    if (this.closed || this.renewal !== renewal) return; // closed, or setToken() since
    this.renewal = null;
    if (typeof token === "string" && token !== "") {
      this.token = token;
      clearTimeout(this.timer);
      this._open();
      return;
    }
    failure ??= new Error("getToken() returned no token");
    if (typeof this.handlers.onTokenError === "function") this._call("onTokenError", failure);
    else console.warn("progress-sse: getToken failed; reconnecting with the current token", failure);
    this._retry();
  }

  // A task frame's id: the stream's place from now on. The states that follow a
  // reset start the cursor over, in the new history.
  _advance(id) {
    if (this.cursorLost || isAfter(id, this.cursor)) this.cursor = id;
    this.cursorLost = false;
  }

  // The server's history started over: the cursor stays (a reopen before the next
  // id is told of the reset again), and the next id replaces it, a position in the
  // new history.
  _reset(reset) {
    this.backoff = this.initialBackoff;
    this.cursorLost = true;
    const missing = Array.isArray(reset.missing) ? reset.missing : [];
    this._forget(missing);
    this._call("onReset", { reason: reset.reason, message: reset.message ?? "", missing });
  }

  // What the subclass forgets on a reset, before onReset is called.
  _forget() {}

  // Not a task's frame, and no sign of a healthy stream either: the server sends
  // its latest notice to every stream it opens, so a server that answers and at
  // once ends would otherwise reset the backoff and be hammered.
  _notice(message) {
    let notice;
    try {
      notice = JSON.parse(message.data);
    } catch {
      return; // not a notice this client can read: ignored, as the protocol asks of unknown frames
    }
    if (!notice || typeof notice.id !== "string" || typeof notice.text !== "string") return;
    this._call("onNotice", { id: notice.id, text: notice.text, ts: typeof notice.ts === "number" ? notice.ts : null });
  }

  _call(name, ...args) {
    const handler = this.handlers[name];
    if (typeof handler !== "function") return;
    try {
      handler(...args);
    } catch (error) {
      console.error(`progress-sse: ${name} handler failed`, error); // one bad handler must not stop the stream
    }
  }

  _setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    this._call("onStatus", status);
  }
}

/**
 * Tasks on one connection (GET /events). Handlers (all optional), besides
 * Stream's: onEvent(event) for every event, then onQueued, onStarted, onProgress,
 * onRetry, onSuccess, onFailure, onRevoked, onLost by state; onUnknown({task_id})
 * for an id the server does not know; onReset as Stream says, where the current
 * state of every known task follows (through onEvent as usual, applied even if it
 * looks older than what came before), and the tasks in `missing` have no state
 * left (their `state` is null again: they keep streaming, and their next event, if
 * any, comes as usual); onDone() once every task has ended. Options: Stream's.
 */
export class Watch extends Stream {
  constructor(taskIds = [], handlers = {}, options = {}) {
    super(handlers, options);
    this.tasks = new Map(); // id -> { state, lastId, covered }
    this.streaming = new Set();
    for (const id of taskIds) this._track(id);
    this._schedule(0);
  }

  /**
   * Watch one more task on the same connection. `seed` ({state, cursor}, e.g. the
   * body of GET /tasks/<id>) skips what is already known; a terminal seed is not
   * streamed at all.
   */
  add(taskId, seed = null) {
    if (!isTaskId(taskId)) throw new TypeError(`not a task id: ${taskId}`);
    if (this.tasks.has(taskId)) return;
    this._track(taskId, seed);
    this._schedule();
  }

  /** Stop watching one task. */
  remove(taskId) {
    if (this.tasks.delete(taskId)) this._schedule();
  }

  /** The ids still streaming (not terminal, not unknown). */
  pending() {
    return [...this.tasks].filter(([, task]) => !isDone(task.state)).map(([id]) => id);
  }

  _track(taskId, seed = null) {
    const lastId = seed?.cursor != null ? String(seed.cursor) : null;
    // `covered`: the stream's cursor accounts for this task, because the stream
    // delivered one of its frames. Until then a reopen asks for its current state.
    this.tasks.set(taskId, { state: seed?.state ?? null, lastId, covered: false });
  }

  _request() {
    // At most 100 tasks per stream; the rest wait for a slot (see _receive).
    const ids = this.pending().slice(0, MAX_TASKS_PER_STREAM);
    this.streaming = new Set(ids);
    if (ids.length === 0) return null;
    const params = new URLSearchParams();
    for (const id of ids) params.append("task", id);
    if (this.cursor != null) {
      // Reopening: every event after the cursor, and the current state of the
      // tasks the cursor does not cover yet (added since, or not heard from).
      params.set("last_event_id", this.cursor);
      for (const id of ids) if (!this.tasks.get(id).covered) params.append("fresh", id);
    }
    return { path: "/events", params };
  }

  // `id`: the frame's own event id, null if it had none.
  _receive(message, id) {
    this.backoff = this.initialBackoff; // a healthy connection: the next failure starts over
    const event = JSON.parse(message.data);
    const task = this.tasks.get(event.task_id);
    if (!task) return;
    task.covered = true;
    if (message.type === "unknown") {
      task.state = "unknown";
      this._call("onUnknown", event);
    } else {
      // A state without an id (one that survived an older history) is applied, but
      // names no position to resume from.
      if (id != null) {
        // The states of added tasks may come with older ids: the cursor never goes back.
        this._advance(id);
        if (task.lastId != null && !isAfter(id, task.lastId)) return; // seen already
        task.lastId = id;
      }
      task.state = event.state;
      this._call("onEvent", event);
      this._call(HANDLER_FOR[event.state], event);
    }
    const pending = this.pending();
    if (pending.length === 0) {
      this.source?.close();
      this.source = null;
      this._setStatus("idle");
      this._call("onDone");
    } else if (isDone(task.state) && pending.some((id) => !this.streaming.has(id))) {
      this._schedule(); // a slot is free for a task waiting beyond the first 100
    }
  }

  // What each task "has seen" no longer counts, so the current states that follow
  // are applied whatever their ids.
  _forget(missing) {
    for (const id of this.streaming) {
      const task = this.tasks.get(id);
      if (!task || isDone(task.state)) continue; // an end seen stays an end
      task.lastId = null;
      // A known task is covered again once its current state comes. A missing one
      // has no state to ask for: the reset was the stream's word on it, and its
      // next event comes after the cursor. Its state is null: not done, still streamed.
      task.covered = missing.includes(id);
      if (task.covered) task.state = null;
    }
  }
}

/**
 * The all-tasks feed (GET /feed): every task's changes as they happen, of every
 * task whose name `names` lets through (none: every task the token may see). It
 * starts with the current states of the newest tasks, then live frames; a task's
 * progress comes at most once per the server's feed interval, its state changes
 * always. It never ends by itself: close() it.
 *
 * Handlers (all optional), besides Stream's: onEvent(event) for every frame, then
 * onQueued … onLost by state, as for `watch`; onReset as Stream says, after which
 * the current states follow: whatever was shown before them is out of date, so a
 * view redraws from them. Options: Stream's.
 */
export class Feed extends Stream {
  constructor(names = [], handlers = {}, options = {}) {
    super(handlers, options);
    this.names = [...names];
    this._schedule(0);
  }

  _request() {
    const params = new URLSearchParams();
    for (const name of this.names) params.append("name", name);
    // Reopening: every entry after the cursor, exactly once.
    if (this.cursor != null) params.set("last_event_id", this.cursor);
    return { path: "/feed", params };
  }

  _receive(message, id) {
    this.backoff = this.initialBackoff; // a healthy connection: the next failure starts over
    if (message.type === "unknown") return; // the feed names no task, so none can be unknown
    const event = JSON.parse(message.data);
    if (id != null) this._advance(id);
    this._call("onEvent", event);
    this._call(HANDLER_FOR[event.state], event);
  }
}

function isDone(state) {
  return state === "unknown" || isTerminal(state);
}
