// The demo page and the one-task page: wires the API, the cards, the groups, the
// start forms and the recent list to one shared stream. The other modules do one
// job each and nothing on import; this one starts the page (see the end). Task
// text reaches the DOM only through textContent; the Content-Security-Policy
// allows no inline script either way.
import { ApiError, createApi } from "./api.js";
import { announcement, createCard, makeGroupCard, markUnknown, notice, showEvent, tick } from "./card.js";
import { InputError, valuesOf } from "./forms.js";
import { groupName, WatchedGroups } from "./groups.js";
import { isTaskId, isTerminal, watch } from "./progress.js";
import { renderRecent, showInRecent } from "./recent.js";
import { loadWatched, saveWatched } from "./watched.js";

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
const recentBox = document.getElementById("recent"); // the demo page's only
const single = app.dataset.task || null; // the one-task page's task
const api = createApi(app.dataset.base ?? ""); // a prefix when mounted inside another app
const cards = new Map(); // task id (or group id) -> card
const groups = new WatchedGroups();

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
    onStatus: (status) => {
      connection.dataset.status = status;
      connection.textContent = STATUS_TEXT[status] ?? status;
    },
  },
  { base: app.dataset.base ?? "" },
);

// ---- cards -----------------------------------------------------------------

function addCard(taskId, info = {}) {
  if (cards.has(taskId)) return cards.get(taskId);
  const card = createCard(template, taskId, info, {
    base: app.dataset.base ?? "",
    onCancel: cancel,
    onRemove: single ? null : removeCard,
  });
  cards.set(taskId, card);
  list.prepend(card.node); // newest first
  updateEmpty();
  if (info.state) show(info); // the state we already have, until the stream speaks
  return card;
}

function show(event) {
  const card = cards.get(event.task_id);
  if (!card) return;
  const changed = showEvent(card, event);
  learnStart(card, event);
  if (changed && isTerminal(event.state)) refreshRecentSoon();
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
  api
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
    await api.cancel(card.id);
  } catch (error) {
    if (error instanceof ApiError) notice(card, error.reason ?? `Cancel failed (${error.status}).`);
    else notice(card, "Could not reach the server to cancel; try again.");
  } finally {
    card.refs.cancel.disabled = false;
  }
}

function removeCard(card) {
  cards.delete(card.id);
  card.node.remove();
  stream.remove(card.id);
  if (groups.has(card.id)) {
    for (const member of groups.drop(card.id)) {
      if (!cards.has(member)) stream.remove(member); // a member with its own card stays
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
  stream.add(taskId, info.state ? info : null);
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
    stream.add(id);
    const known = cards.get(id)?.last; // a member already watched on its own
    if (known) show(groups.record(known));
  }
  rememberWatched();
}

function rememberWatched() {
  if (!single) saveWatched([...cards.keys()]); // insertion order: oldest first
}

async function restore(ids) {
  const found = await Promise.all(ids.map(api.lookup));
  ids.forEach((id, i) => {
    const what = found[i];
    if (what?.group) followGroup(what.group);
    else if (what?.task) follow(id, what.task);
    else if (what?.unreachable) follow(id, {}); // keep it: the stream tells its state once back
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
    showError(errorBox, error instanceof ApiError ? error.message : "Could not reach the server; try again.");
    return;
  }
  showWorkers(body);
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
    const info = await api.describe(taskId);
    if (info === null) {
      const group = await api.describeGroup(taskId);
      if (group === null) {
        showError(errorBox, `There is no task or group ${taskId}, or its history has expired.`);
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
  } catch {
    return; // the list is a convenience; the page works without it
  }
  renderRecent(recentBox, tasks, async (task) => {
    const info = await api.describe(task.task_id);
    if (info) follow(task.task_id, info);
  });
}

// ---- start-up --------------------------------------------------------------

setInterval(() => {
  for (const card of cards.values()) if (!isTerminal(card.state)) tick(card);
}, 1000);

checkWorkers();
if (single) {
  if (list) {
    api.describe(single).then((info) => {
      if (info) follow(single, info);
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
}
