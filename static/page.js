// The demo page and the one-task page: wires the API, the cards, the groups, the
// start forms and the recent list to one shared stream. The other modules do one
// job each and nothing on import; this one starts the page (see the end). Task
// text reaches the DOM only through textContent; the Content-Security-Policy
// allows no inline script either way.
//
// Access tokens (static/tokens.js): the page's own token, from its link, goes with
// every request and every stream; a 401 or 403 is shown as such, not as a generic
// failure. A task started here may come with a token of its own (POST /tasks's
// `token`). A stream carries one token, so the page keeps one Watch per token:
// a task rides the stream of the page's token when that token lists it (or is an
// operator's), else the stream of its own token. In open mode (no token) that is
// one stream for everything, as before. Each task's Watch is remembered, so a
// task stays on the stream it was added to.
//
// The demo page's All tasks view (feed.js) is one more stream, of GET /feed, with
// the page's token, opened when asked for. Every stream's broadcast notices go to
// one banner (notices.js), and a watched task that ends while the tab is hidden is
// told in the title and, if asked for, a desktop notification (notify.js).
import { accessProblem, ApiError, createApi } from "./api.js";
import { announcement, createCard, makeGroupCard, markHistoryLost, markUnknown, notice, showEvent, tick } from "./card.js";
import { FeedView } from "./feed.js";
import { InputError, valuesOf } from "./forms.js";
import { groupName, WatchedGroups } from "./groups.js";
import { NoticeBanner } from "./notices.js";
import { CompletionNotices } from "./notify.js";
import { isTaskId, isTerminal, watch } from "./progress.js";
import { renderRecent, showInRecent } from "./recent.js";
import { claimsOf, covers, takePageToken, TaskTokens } from "./tokens.js";
import { loadWatched, saveWatched } from "./watched.js";

// The page shows one connection status for all its streams: the most troubled one's.
const STATUS_RANK = ["reconnecting", "connecting", "live", "idle", "closed"];
const STATUS_TEXT = {
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  idle: "idle",
  closed: "closed",
};
const RECENT_LIMIT = 20;

const app = document.getElementById("app");
const list = document.getElementById("tasks");
const template = document.getElementById("bar-template");
const connection = document.getElementById("connection");
const announcer = document.getElementById("announcer");
const workerNotice = document.getElementById("worker-notice");
const accessNotice = document.getElementById("access-notice");
const recentBox = document.getElementById("recent"); // the demo page's only
const feedPanel = document.getElementById("feed-panel"); // the demo page's only
const single = app.dataset.task || null; // the one-task page's task
const base = app.dataset.base ?? ""; // a prefix when mounted inside another app
const cards = new Map(); // task id (or group id) -> card
const groups = new WatchedGroups();
const banner = new NoticeBanner(document.getElementById("notices"));
const completions = new CompletionNotices(document.getElementById("notify-toggle"));

// ---- access tokens and streams ---------------------------------------------

const pageToken = takePageToken(); // null: open mode
const taskTokens = new TaskTokens();
const apis = new Map(); // token ("" for none) -> api
const streams = new Map(); // token ("" for none) -> Watch
const statuses = new Map(); // Watch -> its status
const watchedBy = new Map(); // task id -> the Watch it was added to

function apiWith(token) {
  const key = token ?? "";
  if (!apis.has(key)) apis.set(key, createApi(base, { token }));
  return apis.get(key);
}

const api = apiWith(pageToken);

/** The task's own token when the page's does not cover it, or null. */
function ownToken(taskId) {
  const own = taskTokens.get(taskId);
  return own && own !== pageToken && !covers(pageToken, taskId) ? own : null;
}

const tokenFor = (taskId) => ownToken(taskId) ?? pageToken;
const apiFor = (taskId) => apiWith(tokenFor(taskId));

function streamWith(token) {
  const key = token ?? "";
  if (streams.has(key)) return streams.get(key);
  const stream = watch(
    [],
    {
      onEvent: (event) => {
        show(event); // its own card, if it has one
        if (recentBox) showInRecent(recentBox, event); // a group's members are listed there too
        const groupEvent = groups.record(event);
        if (groupEvent) show(groupEvent);
      },
      onUnknown: ({ task_id }) => {
        const card = cards.get(task_id);
        if (card) markUnknown(card);
      },
      onReset: showReset,
      onStatus: (status) => {
        statuses.set(stream, status);
        showStatus();
      },
      onTokenError: (error) => {
        const problem = accessProblem(error);
        if (problem) showPageNotice(problem);
      },
      onNotice: (broadcast) => banner.show(broadcast),
    },
    // The page cannot mint tokens. Its getToken asks, once per run of failed
    // connections, whether the token is what the server refuses: an EventSource
    // never sees the status. A 401 or 403 is then shown (onTokenError), and the
    // stream goes on trying with backoff; anything else reopens with the same token.
    { base, token, getToken: () => recheck(stream, token) },
  );
  streams.set(key, stream);
  return stream;
}

async function recheck(stream, token) {
  const [taskId] = stream.pending();
  if (taskId) await apiWith(token).describe(taskId); // throws the refusal
  return token;
}

function watchTask(taskId, seed = null) {
  if (watchedBy.has(taskId)) return;
  const stream = streamWith(tokenFor(taskId));
  watchedBy.set(taskId, stream);
  stream.add(taskId, seed);
}

function unwatchTask(taskId) {
  watchedBy.get(taskId)?.remove(taskId);
  watchedBy.delete(taskId);
}

// The server's history started over. The known tasks' current states follow as
// ordinary events and redraw their cards; a task with no state left shows that it
// waits for news, and its group no longer counts its old figures.
function showReset({ message, missing }) {
  for (const taskId of missing) {
    const card = cards.get(taskId);
    // An end (or an id the server never knew) stays as shown: no news will come.
    if (card && !isTerminal(card.state) && card.state !== "unknown") markHistoryLost(card);
    const groupEvent = groups.forget(taskId);
    if (groupEvent) show(groupEvent);
  }
  if (missing.length > 0) announcer.textContent = message;
}

function showStatus() {
  const all = [...statuses.values()];
  const status = STATUS_RANK.find((s) => all.includes(s)) ?? "idle";
  connection.dataset.status = status;
  connection.textContent = STATUS_TEXT[status] ?? status;
}

/** A sentence for the whole page: a refused token, a task that is not there. */
function showPageNotice(text) {
  if (!accessNotice) return;
  accessNotice.hidden = false;
  accessNotice.textContent = text;
}

// ---- cards -----------------------------------------------------------------

function addCard(taskId, info = {}) {
  if (cards.has(taskId)) return cards.get(taskId);
  const card = createCard(template, taskId, info, {
    base,
    onCancel: cancel,
    onRemove: single ? null : removeCard,
  });
  // A task watched with a token of its own: its link carries that token, since the
  // page's token does not let anyone watch it. Only a token that may do no more than
  // watch: a link gets copied and shared, and must not hand over the right to cancel.
  const own = ownToken(taskId);
  const claims = own ? claimsOf(own) : null;
  // (Not .hash: the card is not in the document yet, so its link has no base URL.)
  if (own && claims && !claims.cancel && !claims.operator) card.refs.link.href = `${card.refs.link.getAttribute("href")}#token=${encodeURIComponent(own)}`;
  cards.set(taskId, card);
  list.prepend(card.node); // newest first
  updateEmpty();
  if (info.state) show(info); // the state we already have, until the stream speaks
  return card;
}

function show(event) {
  const card = cards.get(event.task_id);
  if (!card) return;
  const before = card.state;
  const changed = showEvent(card, event);
  learnStart(card, event);
  if (changed && isTerminal(event.state)) {
    refreshRecentSoon();
    // An end seen happen, not the state a card was loaded with (a reload, a task
    // observed after it ended).
    if (before != null && !isTerminal(before) && before !== "unknown") {
      completions.taskEnded(event, card.refs.name.textContent, () => card.node.scrollIntoView({ block: "nearest" }));
    }
  }
  if (changed) announcer.textContent = announcement(card);
}

// Elapsed time counts from the task's real start, its first attempt. Only the
// server knows it when the card's first frame came later: a task observed mid-run,
// or one a worker picked up before the page's stream opened (its first frame is
// then a progress), or a started frame of a later attempt. So ask it, once.
function learnStart(card, event) {
  if (card.startedAt != null || card.askedStart || groups.has(card.id)) return;
  if (event.state === "queued") return; // nothing to count yet
  card.askedStart = true;
  apiFor(card.id)
    .describe(card.id)
    .then((info) => {
      if (!info) return;
      // created_at stands in for a task whose start was never recorded.
      card.startedAt ??= info.started_at ?? info.created_at;
      if (isTerminal(card.state)) card.finishedAt = info.finished_at ?? card.finishedAt;
      tick(card);
    })
    .catch(() => {
      card.askedStart = false; // ask again with its next frame
    });
}

async function cancel(card) {
  card.refs.cancel.disabled = true;
  try {
    await apiFor(card.id).cancel(card.id);
  } catch (error) {
    const problem = accessProblem(error);
    if (problem) notice(card, problem);
    else if (error instanceof ApiError) notice(card, error.reason ?? `Cancel failed (${error.status}).`);
    else notice(card, "Could not reach the server to cancel; try again.");
  } finally {
    card.refs.cancel.disabled = false;
  }
}

function removeCard(card) {
  cards.delete(card.id);
  card.node.remove();
  unwatchTask(card.id);
  taskTokens.delete(card.id);
  if (groups.has(card.id)) {
    for (const member of groups.drop(card.id)) {
      if (!cards.has(member)) unwatchTask(member); // a member with its own card stays
    }
  }
  rememberWatched();
  updateEmpty();
}

function updateEmpty() {
  const empty = document.getElementById("empty");
  if (empty) empty.hidden = cards.size > 0;
}

// ---- watching --------------------------------------------------------------

function follow(taskId, info = {}) {
  addCard(taskId, info);
  watchTask(taskId, info.state ? info : null);
  rememberWatched();
}

// A group's bar sums its members' current/total, like GET /groups/<id>/events does
// on the server (static/groups.js); here the members ride the page's one shared stream.
function followGroup(info) {
  if (cards.has(info.group_id)) return;
  groups.add(info.group_id, info.members);
  const card = addCard(info.group_id, { ...info, task_id: info.group_id, name: groupName(info.tasks) });
  makeGroupCard(card);
  for (const id of info.members) {
    watchTask(id);
    const known = cards.get(id)?.last; // a member already watched on its own
    if (known) show(groups.record(known));
  }
  rememberWatched();
}

function rememberWatched() {
  if (!single) saveWatched([...cards.keys()]); // insertion order: oldest first
}

async function restore(ids) {
  const found = await Promise.all(ids.map((id) => apiFor(id).lookup(id)));
  ids.forEach((id, i) => {
    const what = found[i];
    if (what?.group) followGroup(what.group);
    else if (what?.task) follow(id, what.task);
    else if (what?.unreachable) follow(id, {}); // keep it: the stream tells its state once back
    else if (what?.refused) notice(addCard(id, {}), accessProblem(what.refused)); // kept, not streamed
  });
  rememberWatched();
}

// ---- the demo page's forms -------------------------------------------------

function showError(element, text) {
  element.hidden = !text;
  element.textContent = text ?? "";
}

async function start(form) {
  const errorBox = form.querySelector(".form-error");
  showError(errorBox, null);
  let kwargs;
  try {
    kwargs = valuesOf(form);
  } catch (error) {
    if (!(error instanceof InputError)) throw error;
    error.field.setAttribute("aria-invalid", "true");
    error.field.focus();
    showError(errorBox, error.message);
    return;
  }
  const name = form.dataset.taskName;
  let body;
  try {
    body = await api.start(name, kwargs);
  } catch (error) {
    const reached = error instanceof ApiError ? error.message : "Could not reach the server; try again.";
    showError(errorBox, accessProblem(error) ?? reached);
    return;
  }
  showWorkers(body);
  // The server's watch token for this task: the page's own may only start tasks.
  if (typeof body.token === "string" && body.token) taskTokens.set(body.id, body.token);
  follow(body.id, { task_id: body.id, name, state: "queued" });
  loadRecent();
}

// Whether a worker is alive: from /healthz once on load, then from every POST /tasks
// answer (no polling). A body without `workers` (an older server, or /healthz
// failing) says nothing, so the notice stays as it was.
function showWorkers(body) {
  if (typeof body?.workers !== "number") return;
  workerNotice.dataset.workers = String(body.workers);
  workerNotice.textContent = body.workers > 0 ? "" : (body.warning ?? ""); // the server words it
}

async function checkWorkers() {
  try {
    showWorkers(await api.healthz());
  } catch {
    // the notice is advice; the page works without it
  }
}

async function observe(form) {
  const errorBox = document.getElementById("observe-error");
  const input = form.querySelector("input");
  const taskId = input.value.trim();
  showError(errorBox, null);
  if (!isTaskId(taskId)) {
    showError(errorBox, "That is not a task id: ids are letters, digits and - _ . : @ + =, like a UUID.");
    return;
  }
  try {
    // A token for a group may not read it as a task, and the other way round.
    let refused = null;
    const refusable = async (describe) => {
      try {
        return await describe(taskId);
      } catch (error) {
        if (!accessProblem(error)) throw error;
        refused ??= error;
        return null;
      }
    };
    const info = await refusable(api.describe);
    if (info === null) {
      const group = await refusable(api.describeGroup);
      if (group === null) {
        const problem = accessProblem(refused);
        showError(errorBox, problem ?? `There is no task or group ${taskId}, or its history has expired.`);
        return;
      }
      followGroup(group);
    } else {
      follow(taskId, info);
    }
    input.value = "";
  } catch (error) {
    showError(errorBox, error.message);
  }
}

// ---- the recent list -------------------------------------------------------

let recentTimer = null;
function refreshRecentSoon() {
  clearTimeout(recentTimer);
  recentTimer = setTimeout(loadRecent, 300); // one reload for a burst of endings
}

async function loadRecent() {
  if (!recentBox) return;
  let tasks;
  try {
    tasks = await api.recent(RECENT_LIMIT);
  } catch (error) {
    // The list is a convenience; the page works without it. Only an operator's
    // token may read it: for any other, the section goes.
    if (accessProblem(error)) recentBox.closest("section").hidden = true;
    return;
  }
  renderRecent(recentBox, tasks, async (task) => {
    try {
      const info = await apiFor(task.task_id).describe(task.task_id);
      if (info) follow(task.task_id, info);
    } catch {
      // nothing to watch yet; the button can be pressed again
    }
  });
}

// ---- the All tasks view ----------------------------------------------------

// Watching a task of the feed closely: it joins the watched cards, with every step
// on the page's own stream, its start time and Cancel, as from the recent list.
async function watchFromFeed(event, feedCard) {
  const taskId = event.task_id;
  if (!cards.has(taskId)) {
    try {
      const info = await apiFor(taskId).describe(taskId);
      if (!info) {
        notice(feedCard, "The server no longer knows this task: its history has expired.");
        return;
      }
      follow(taskId, info);
    } catch (error) {
      notice(feedCard, accessProblem(error) ?? "Could not reach the server to watch it; try again.");
      return;
    }
  }
  cards.get(taskId)?.node.scrollIntoView({ block: "nearest" });
}

const FEED_STATUS = "feed"; // the feed's entry among the page's stream statuses

function feedStatus(status) {
  if (status === "closed") statuses.delete(FEED_STATUS); // closed on purpose: no trouble to show
  else statuses.set(FEED_STATUS, status);
  showStatus();
}

const feedView = feedPanel
  ? new FeedView(feedPanel, {
      template,
      api,
      base,
      token: pageToken,
      onWatch: watchFromFeed,
      onEnded: (event, card) => completions.taskEnded(event, card.refs.name.textContent, null, "progress-sse:all-tasks"),
      onStatus: feedStatus,
      onNotice: (broadcast) => banner.show(broadcast),
    })
  : null;

// ---- start-up --------------------------------------------------------------

setInterval(() => {
  for (const card of cards.values()) if (!isTerminal(card.state)) tick(card);
  feedView?.tick();
}, 1000);

checkWorkers();
if (single) {
  if (list) {
    apiFor(single)
      .describe(single)
      .then((info) => {
        // A server that wants tokens serves this page for any id; the task may be gone.
        if (info) follow(single, info);
        else showPageNotice(`There is no task ${single}, or its history has expired.`);
      })
      .catch((error) => {
        const problem = accessProblem(error);
        if (problem) showPageNotice(problem); // no token, or not one for this task: no task data
        else follow(single, {}); // unreachable for now: the stream tells its state once back
      });
  }
} else {
  for (const form of document.querySelectorAll(".start-form")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      start(form);
    });
  }
  document.getElementById("observe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    observe(event.target);
  });
  restore(loadWatched());
  loadRecent();
  feedView?.restore();
}
