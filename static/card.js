// One task's card (or a group's): built from the page's <template id="bar-template">,
// updated from the task's events. Task text reaches the DOM only through textContent.
import { applyToProgress, isTerminal } from "./progress.js";

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
  "history-lost": "history lost", // not a protocol state: see markHistoryLost
};
// Terminal states also get a symbol, so colour is never the only signal.
const SYMBOLS = { success: "✓", failure: "✗", revoked: "⊘", lost: "?" };
// A revoked event's message ("Task revoked", "Task terminated") said the cancelled way.
const CANCELLED = {
  revoked: "Cancelled.",
  terminated: "Cancelled while it ran: its process was stopped.",
  expired: "Cancelled: it expired before a worker ran it.",
};

let cardsMade = 0; // numbers each card's name id, which its bar is labelled by

/** A state as a badge reads it: symbol (for terminal states) and word. */
export function label(state) {
  const word = WORDS[state] ?? state;
  return SYMBOLS[state] ? `${SYMBOLS[state]} ${word}` : word;
}

/** A terminal state's symbol (✓, ✗, ⊘, ?), or "" for any other. */
export function symbol(state) {
  return SYMBOLS[state] ?? "";
}

/**
 * A new card for a task, not yet in the page. `info` is what is already known
 * (GET /tasks/<id>'s body, say). Without `onRemove` the card has no
 * "Stop watching" button (the one-task page), without `onCancel` no Cancel button.
 */
export function createCard(template, taskId, info, { base, onCancel = null, onRemove = null }) {
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
      watch: q(".task-watch"),
    },
  };
  const nameId = `task-name-${(cardsMade += 1)}`;
  card.refs.name.id = nameId;
  card.refs.bar.setAttribute("aria-labelledby", nameId);
  card.refs.name.textContent = info.name ?? "task";
  card.refs.id.textContent = taskId;
  card.refs.state.textContent = "…";
  card.refs.link.href = `${base}/tasks/${encodeURIComponent(taskId)}`;
  if (onCancel) {
    card.refs.cancel.addEventListener("click", () => onCancel(card));
  } else {
    card.refs.cancel.hidden = true;
  }
  if (onRemove) {
    card.refs.remove.addEventListener("click", () => onRemove(card));
  } else {
    card.refs.remove.hidden = true;
  }
  return card;
}

/** A group's card: its tasks are cancelled one by one, and it has no page of its own. */
export function makeGroupCard(card) {
  card.refs.cancel.hidden = true;
  card.refs.link.hidden = true;
  card.node.classList.add("group");
}

/**
 * A card of the All tasks view: an overview of tasks nobody here may have started,
 * so it has no Cancel; its Watch button (`onWatch(card)`) takes the task to the
 * page's watched cards, where it streams every step and can be cancelled.
 */
export function makeFeedCard(card, onWatch) {
  card.refs.watch.hidden = false;
  card.refs.watch.addEventListener("click", () => onWatch(card));
  card.node.classList.add("feed-task");
}

/** Show an event on its card; returns whether the card's state changed. */
export function showEvent(card, event) {
  const { refs } = card;
  const changed = event.state !== card.state;
  if (card.state === "history-lost") refs.notice.hidden = true; // news at last
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
  return changed;
}

/** What a screen reader hears when a card's state changes. */
export function announcement(card) {
  return `${card.refs.name.textContent} ${card.id.slice(0, 8)}: ${WORDS[card.state] ?? card.state}`;
}

function messageOf(event) {
  // A failure's message is its error's, shown below with the type.
  if (event.state === "failure" && event.error) return "";
  // Only a task's own revoked event has a reason; a group's message counts its tasks.
  if (event.state === "revoked" && event.reason) return CANCELLED[event.reason] ?? CANCELLED.revoked;
  return event.message ?? "";
}

/** The server does not know the task: an `unknown` frame of the stream. */
export function markUnknown(card) {
  card.state = "unknown";
  card.node.dataset.state = "unknown";
  card.refs.state.textContent = label("unknown");
  card.refs.cancel.hidden = true;
  card.refs.bar.value = 0;
  notice(card, "The server does not know this task (its history may have expired).");
}

/**
 * The server lost the task's history and no state of it survived (a `reset` that
 * lists it as missing): the old figures no longer stand, and the task may still be
 * running, so the card empties its bar and waits for the task's next event.
 */
export function markHistoryLost(card) {
  const { refs } = card;
  card.state = "history-lost";
  card.last = null; // no estimate from figures that no longer stand
  card.node.dataset.state = "history-lost";
  refs.state.textContent = label("history-lost");
  refs.bar.max = 1;
  refs.bar.value = 0;
  for (const part of [refs.count, refs.percent, refs.eta, refs.attempt, refs.message]) part.textContent = "";
  notice(card, "The server lost this task's history; waiting for news of it.");
}

export function notice(card, text) {
  card.refs.notice.hidden = false;
  card.refs.notice.textContent = text;
}

/** Elapsed time and, for determinate work, an estimate of what is left; every second while it runs. */
export function tick(card) {
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

function fmt(n) {
  return typeof n === "number" ? n.toLocaleString() : String(n ?? "");
}

function duration(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  return m < 60 ? `${m} min ${s} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}
