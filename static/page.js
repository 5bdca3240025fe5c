// The demo page and the one-task page. Task text reaches the DOM only through
// textContent; the Content-Security-Policy allows no inline script either way.
import { applyToProgress, isTaskId, isTerminal, watch } from "./progress.js";

const STORAGE_KEY = "progress-sse:watched";
const MAX_WATCHED = 100;
// What each state reads as. `revoked` is the protocol's word; people say cancelled.
const WORDS = {
  queued: "queued",
  started: "started",
  progress: "running",
  retry: "retrying",
  success: "success",
  failure: "failure",
  revoked: "cancelled",
  lost: "lost",
  unknown: "unknown",
};
// Terminal states also get a symbol, so colour is never the only signal.
const SYMBOLS = { success: "✓", failure: "✗", revoked: "⊘", lost: "?" };
// A revoked event's message ("Task revoked", "Task terminated") said the cancelled way.
const CANCELLED = {
  revoked: "Cancelled.",
  terminated: "Cancelled while it ran: its process was stopped.",
  expired: "Cancelled: it expired before a worker ran it.",
};
const STATUS_TEXT = {
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  idle: "idle",
  closed: "closed",
};

const app = document.getElementById("app");
const list = document.getElementById("tasks");
const template = document.getElementById("bar-template");
const connection = document.getElementById("connection");
const announcer = document.getElementById("announcer");
const workerNotice = document.getElementById("worker-notice");
const single = app.dataset.task || null;
const base = app.dataset.base ?? ""; // the API's prefix when mounted inside another app
const cards = new Map(); // task id (or group id) -> card
const groups = new Map(); // group id -> { members: Map(task id -> latest event), size }
const groupOf = new Map(); // member task id -> group id

const stream = watch(
  [],
  {
    onEvent: (event) => {
      show(event); // its own card, if it has one
      showInRecent(event); // a group's members are listed there too
      if (groupOf.has(event.task_id)) showGroup(groupOf.get(event.task_id), event);
    },
    onUnknown: ({ task_id }) => markUnknown(task_id),
    onStatus: (status) => {
      connection.dataset.status = status;
      connection.textContent = STATUS_TEXT[status] ?? status;
    },
  },
  { base },
);

// ---- cards ---------------------------------------------------------------

function addCard(taskId, info = {}) {
  if (cards.has(taskId)) return cards.get(taskId);
  const node = template.content.firstElementChild.cloneNode(true);
  const q = (selector) => node.querySelector(selector);
  const card = {
    id: taskId,
    node,
    info,
    state: null,
    last: null,
    startedAt: info.started_at ?? null,
    finishedAt: info.finished_at ?? null,
    refs: {
      name: q(".task-name"),
      id: q(".task-id"),
      state: q(".task-state"),
      bar: q(".task-bar"),
      count: q(".task-count"),
      percent: q(".task-percent"),
      elapsed: q(".task-elapsed"),
      eta: q(".task-eta"),
      attempt: q(".task-attempt"),
      message: q(".task-message"),
      result: q(".task-result"),
      resultValue: q(".task-result-value"),
      error: q(".task-error"),
      errorType: q(".task-error-type"),
      errorMessage: q(".task-error-message"),
      traceback: q(".task-traceback"),
      notice: q(".task-notice"),
      cancel: q(".task-cancel"),
      link: q(".task-link"),
      remove: q(".task-remove"),
    },
  };
  const nameId = `task-name-${cards.size}-${Date.now()}`;
  card.refs.name.id = nameId;
  card.refs.bar.setAttribute("aria-labelledby", nameId);
  card.refs.name.textContent = info.name ?? "task";
  card.refs.id.textContent = taskId;
  card.refs.state.textContent = "…";
  card.refs.link.href = `${base}/tasks/${encodeURIComponent(taskId)}`;
  card.refs.cancel.addEventListener("click", () => cancel(card));
  if (single) {
    card.refs.remove.hidden = true;
  } else {
    card.refs.remove.addEventListener("click", () => removeCard(card));
  }
  cards.set(taskId, card);
  list.prepend(node); // newest first
  updateEmpty();
  if (info.state) show(info); // the state we already have, until the stream speaks
  return card;
}

function show(event) {
  const card = cards.get(event.task_id);
  if (!card) return;
  const { refs } = card;
  const changed = event.state !== card.state;
  card.state = event.state;
  card.last = event;
  card.node.dataset.state = event.state;
  if (event.name) refs.name.textContent = event.name;
  refs.state.textContent = label(event.state);
  applyToProgress(refs.bar, event);

  refs.count.textContent =
    event.total != null ? `${fmt(event.current)} of ${fmt(event.total)}` : event.current ? `${fmt(event.current)} done` : "";
  refs.percent.textContent = event.percent != null ? `${event.percent}%` : "";
  refs.message.textContent = messageOf(event);
  learnStart(card, event);
  if (event.state === "retry") {
    card.retries = event.retries;
    const at = event.eta ? `, next attempt at ${new Date(event.eta * 1000).toLocaleTimeString()}` : "";
    refs.attempt.textContent = `retry ${event.retries}${at}`;
  } else if (card.retries) {
    refs.attempt.textContent = `attempt ${card.retries + 1}`;
  }
  if (isTerminal(event.state)) {
    card.finishedAt = event.finished_at ?? event.ts;
    refs.cancel.hidden = true;
    refs.eta.textContent = "";
  }
  if (event.state === "success" && "result" in event) {
    refs.result.hidden = false;
    refs.resultValue.textContent = JSON.stringify(event.result);
  }
  if (event.state === "failure" && event.error) {
    refs.error.hidden = false;
    refs.errorType.textContent = event.error.type;
    refs.errorMessage.textContent = event.error.message;
    refs.traceback.textContent = event.error.traceback;
  }
  tick(card);
  if (changed && isTerminal(event.state)) refreshRecentSoon();
  if (changed) announce(`${refs.name.textContent} ${card.id.slice(0, 8)}: ${WORDS[event.state] ?? event.state}`);
}

function label(state) {
  const word = WORDS[state] ?? state;
  return SYMBOLS[state] ? `${SYMBOLS[state]} ${word}` : word;
}

function messageOf(event) {
  // A failure's message is its error's, shown below with the type.
  if (event.state === "failure" && event.error) return "";
  // Only a task's own revoked event has a reason; a group's message counts its tasks.
  if (event.state === "revoked" && event.reason) return CANCELLED[event.reason] ?? CANCELLED.revoked;
  return event.message ?? "";
}

// Elapsed time counts from the task's real start, its first attempt. Only the
// server knows it when the card's first frame came later: a task observed mid-run,
// or one a worker picked up before the page's stream opened (its first frame is
// then a progress), or a started frame of a later attempt. So ask it, once.
function learnStart(card, event) {
  if (card.startedAt != null || card.askedStart || groups.has(card.id)) return;
  if (event.state === "queued") return; // nothing to count yet
  card.askedStart = true;
  describe(card.id)
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

// A group's bar sums its members' current/total, like GET /groups/<id>/events does
// on the server; here the members ride the page's one shared stream instead.
function showGroup(groupId, event) {
  const group = groups.get(groupId);
  if (!group) return;
  group.members.set(event.task_id, event);
  const members = [...group.members.values()];
  const done = members.filter((m) => isTerminal(m.state)).length;
  const known = members.length === group.size && members.every((m) => m.total != null);
  const current = members.reduce((sum, m) => sum + (m.current ?? 0), 0);
  const total = known ? members.reduce((sum, m) => sum + m.total, 0) : null;
  let state = members.some((m) => m.state !== "queued") ? "progress" : "queued";
  if (done === group.size) {
    state = ["failure", "lost", "revoked"].find((s) => members.some((m) => m.state === s)) ?? "success";
  }
  show({
    task_id: groupId,
    name: `group of ${group.size} tasks`,
    state,
    current,
    total,
    percent: total ? Math.min(100, Math.round((10000 * current) / total) / 100) : null,
    message: `${done} of ${group.size} tasks done`,
    ts: event.ts,
  });
}

function followGroup(info) {
  if (cards.has(info.group_id)) return;
  groups.set(info.group_id, { members: new Map(), size: info.members.length });
  const card = addCard(info.group_id, { ...info, task_id: info.group_id, name: `group of ${info.tasks} tasks` });
  card.refs.cancel.hidden = true; // cancel its tasks one by one
  card.refs.link.hidden = true;
  card.node.classList.add("group");
  for (const id of info.members) {
    groupOf.set(id, info.group_id);
    stream.add(id);
    const known = cards.get(id)?.last; // a member already watched on its own
    if (known) showGroup(info.group_id, known);
  }
  saveWatched();
}

function markUnknown(taskId) {
  const card = cards.get(taskId);
  if (!card) return;
  card.state = "unknown";
  card.node.dataset.state = "unknown";
  card.refs.state.textContent = label("unknown");
  card.refs.cancel.hidden = true;
  card.refs.bar.value = 0;
  notice(card, "The server does not know this task (its history may have expired).");
}

function removeCard(card) {
  cards.delete(card.id);
  card.node.remove();
  stream.remove(card.id);
  const group = groups.get(card.id);
  if (group) {
    groups.delete(card.id);
    for (const [member, groupId] of groupOf) {
      if (groupId !== card.id) continue;
      groupOf.delete(member);
      if (!cards.has(member)) stream.remove(member);
    }
  }
  saveWatched();
  updateEmpty();
}

async function cancel(card) {
  card.refs.cancel.disabled = true;
  try {
    const response = await fetch(`${base}/tasks/${encodeURIComponent(card.id)}`, { method: "DELETE" });
    if (!response.ok) notice(card, (await errorOf(response)) ?? `Cancel failed (${response.status}).`);
  } catch {
    notice(card, "Could not reach the server to cancel; try again.");
  } finally {
    card.refs.cancel.disabled = false;
  }
}

function notice(card, text) {
  card.refs.notice.hidden = false;
  card.refs.notice.textContent = text;
}

// Elapsed time and, for determinate work, an estimate of what is left.
function tick(card) {
  const { refs, last } = card;
  if (card.startedAt == null) {
    refs.elapsed.textContent = "";
    return;
  }
  const end = card.finishedAt ?? Date.now() / 1000;
  const elapsed = Math.max(0, end - card.startedAt);
  refs.elapsed.textContent = `${duration(elapsed)} elapsed`;
  if (!isTerminal(card.state) && last?.total != null && last.current > 0 && last.current < last.total) {
    const left = (elapsed / last.current) * (last.total - last.current);
    refs.eta.textContent = `about ${duration(left)} left`;
  } else {
    refs.eta.textContent = "";
  }
}

setInterval(() => {
  for (const card of cards.values()) if (!isTerminal(card.state)) tick(card);
}, 1000);

function announce(text) {
  announcer.textContent = text;
}

function updateEmpty() {
  const empty = document.getElementById("empty");
  if (empty) empty.hidden = cards.size > 0;
}

function fmt(n) {
  return typeof n === "number" ? n.toLocaleString() : String(n ?? "");
}

function duration(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

// ---- watching --------------------------------------------------------------

async function describeGroup(groupId) {
  const response = await fetch(`${base}/groups/${encodeURIComponent(groupId)}`, { headers: { Accept: "application/json" } });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error((await errorOf(response)) ?? `The server answered ${response.status}.`);
  return response.json();
}

async function describe(taskId) {
  const response = await fetch(`${base}/tasks/${encodeURIComponent(taskId)}`, { headers: { Accept: "application/json" } });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error((await errorOf(response)) ?? `The server answered ${response.status}.`);
  return response.json();
}

function follow(taskId, info = {}) {
  addCard(taskId, info);
  stream.add(taskId, info.state ? info : null);
  saveWatched();
}

function loadWatched() {
  try {
    const ids = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "[]");
    return Array.isArray(ids) ? ids.filter(isTaskId) : [];
  } catch {
    return [];
  }
}

function saveWatched() {
  if (single) return;
  const ids = [...cards.keys()].slice(-MAX_WATCHED); // insertion order: oldest first
  localStorage.setItem(STORAGE_KEY, JSON.stringify(ids));
}

async function errorOf(response) {
  try {
    return (await response.json()).error ?? null;
  } catch {
    return null;
  }
}

function showError(element, text) {
  element.hidden = !text;
  element.textContent = text ?? "";
}

// ---- the demo page ---------------------------------------------------------

// A value the page refuses before any request, with a sentence saying what to fix.
class InputError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

// kwargs in the JSON types the task's checks expect: numbers, true/false, strings,
// arrays. A field left blank whose default is None is left out: the server fills it in.
function valuesOf(form) {
  const kwargs = {};
  for (const field of form.querySelectorAll("[data-kind]")) {
    field.removeAttribute("aria-invalid");
    if ("optional" in field.dataset && field.value.trim() === "") continue;
    kwargs[field.name] = valueOf(field);
  }
  return kwargs;
}

function valueOf(field) {
  switch (field.dataset.kind) {
    case "integer":
    case "number":
      return field.valueAsNumber; // the browser has checked min, max and step
    case "boolean":
      return field.checked;
    case "string":
      return field.value;
    case "choice":
      return JSON.parse(field.value); // each option's value is its JSON
    case "list":
      return listOf(field);
    default:
      return jsonOf(field);
  }
}

function jsonOf(field) {
  try {
    return JSON.parse(field.value);
  } catch {
    // Numbers, true, false and null parse: what fails and opens no array, object or
    // string is almost always bare text, the commonest slip.
    const text = field.value.trim();
    const hint = text && !/^[[{"]/.test(text) ? ` Text needs quotes: ${JSON.stringify(text)}.` : "";
    throw new InputError(field, `${field.name} is not valid JSON.${hint}`);
  }
}

// "1, 2, 3" or a JSON array. Stray commas are ignored; every item must be of the kind asked.
function listOf(field) {
  const text = field.value.trim();
  if (text.startsWith("[")) {
    const value = jsonOf(field);
    if (!Array.isArray(value)) throw new InputError(field, `${field.name} must be a list.`);
    return value;
  }
  const items = text.split(",").map((item) => item.trim()).filter((item) => item !== "");
  if (field.dataset.item === "string") return items;
  return items.map((item) => {
    const value = Number(item);
    if (!Number.isFinite(value)) throw new InputError(field, `${field.name}: "${item}" is not a number.`);
    if (field.dataset.item === "integer" && !Number.isInteger(value)) {
      throw new InputError(field, `${field.name}: "${item}" is not a whole number.`);
    }
    return value;
  });
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
  try {
    const response = await fetch(`${base}/tasks`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ name, kwargs }),
    });
    if (response.status !== 202) {
      showError(errorBox, (await errorOf(response)) ?? `The server answered ${response.status}.`);
      return;
    }
    const body = await response.json();
    showWorkers(body);
    follow(body.id, { task_id: body.id, name, state: "queued" });
    loadRecent();
  } catch {
    showError(errorBox, "Could not reach the server; try again.");
  }
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
    const response = await fetch(`${base}/healthz`, { headers: { Accept: "application/json" } });
    showWorkers(await response.json());
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
    const info = await describe(taskId);
    if (info === null) {
      const group = await describeGroup(taskId);
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

let recentTimer = null;
function refreshRecentSoon() {
  clearTimeout(recentTimer);
  recentTimer = setTimeout(loadRecent, 300);
}

// A watched task's badge in the recent list follows its stream, between reloads of the list.
function showInRecent(event) {
  const box = document.getElementById("recent");
  if (!box) return;
  for (const item of box.children) {
    if (item.dataset.taskId !== event.task_id) continue;
    const badge = item.querySelector(".badge");
    badge.dataset.state = event.state;
    badge.textContent = label(event.state);
  }
}

async function loadRecent() {
  const box = document.getElementById("recent");
  if (!box) return;
  try {
    const response = await fetch(`${base}/tasks?limit=20`, { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const { tasks } = await response.json();
    box.replaceChildren(
      ...tasks.map((task) => {
        const item = document.createElement("li");
        item.dataset.taskId = task.task_id;
        const name = document.createElement("span");
        name.textContent = task.name ?? "task";
        const id = document.createElement("code");
        id.textContent = task.task_id;
        const state = document.createElement("span");
        state.className = "badge";
        state.dataset.state = task.state;
        state.textContent = label(task.state);
        const button = document.createElement("button");
        button.type = "button";
        button.className = "secondary";
        button.textContent = "Watch";
        button.addEventListener("click", async () => {
          const info = await describe(task.task_id);
          if (info) follow(task.task_id, info);
        });
        item.append(name, " ", id, " ", state, " ", button);
        return item;
      }),
    );
  } catch {
    // the list is a convenience; the page works without it
  }
}

// What a watched id is now: { task }, { group }, null when the server no longer
// knows it, or { unreachable } when it cannot say (a deploy, a network blip).
async function lookup(id) {
  try {
    const task = await describe(id);
    if (task) return { task };
    const group = await describeGroup(id);
    return group ? { group } : null;
  } catch {
    return { unreachable: true };
  }
}

async function restore(ids) {
  const found = await Promise.all(ids.map(lookup));
  ids.forEach((id, i) => {
    const what = found[i];
    if (what?.group) followGroup(what.group);
    else if (what?.task) follow(id, what.task);
    else if (what?.unreachable) follow(id, {}); // keep it: the stream tells its state once back
  });
  saveWatched();
}

checkWorkers();
if (single) {
  if (list) {
    describe(single).then((info) => {
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
