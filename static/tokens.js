// The page's access tokens, for a server that wants them (PROGRESS_SSE_SECRET or
// PROGRESS_SSE_PUBLIC_KEY set). Without any token the page runs in open mode, as
// before.
//
// - The page's own token comes with its link, as `#token=<jwt>` in the fragment
//   (which browsers never send to a server). On load it moves into this tab's
//   sessionStorage and out of the address bar, so it is not bookmarked, shared or
//   left in the history; a reload or a click to another page of the tab finds it
//   there. An empty `#token=` forgets it.
// - POST /tasks answers with a watch token for the task it started: a page holding
//   a start-only token needs it to watch that task. Those are kept per task id,
//   in sessionStorage too.
import { isTaskId } from "./progress.js";

export const TOKEN_KEY = "progress-sse-token";
const TASK_TOKENS_KEY = "progress-sse-task-tokens";
const MAX_TASK_TOKENS = 100;

/** The page's token: from the address's fragment (then removed from it), else the tab's stored one. */
export function takePageToken() {
  const parts = window.location.hash.replace(/^#/, "").split("&");
  const given = parts.find((part) => part.startsWith("token="));
  if (given === undefined) return read(TOKEN_KEY);
  let token = "";
  try {
    token = decodeURIComponent(given.slice("token=".length)).trim();
  } catch {
    // a malformed escape is no token
  }
  // The rest of the fragment stays as it was.
  const rest = parts.filter((part) => part !== "" && !part.startsWith("token=")).join("&");
  const { pathname, search } = window.location;
  history.replaceState(history.state, "", `${pathname}${search}${rest ? `#${rest}` : ""}`);
  write(TOKEN_KEY, token || null);
  return token || null;
}

/** The claims of a JWT, read without checking its signature (the server does that), or null. */
export function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** Whether `token` says it may watch the task: an operator's, or one that lists it. */
export function covers(token, taskId) {
  const claims = token ? claimsOf(token) : null;
  return claims?.operator === true || (Array.isArray(claims?.tasks) && claims.tasks.includes(taskId));
}

/** Per-task tokens (from POST /tasks), kept for the tab. */
export class TaskTokens {
  constructor() {
    this.tokens = new Map();
    try {
      const stored = JSON.parse(read(TASK_TOKENS_KEY) ?? "{}");
      for (const [id, token] of Object.entries(stored)) {
        if (isTaskId(id) && typeof token === "string" && token) this.tokens.set(id, token);
      }
    } catch {
      // a malformed entry holds nothing
    }
  }

  get(taskId) {
    return this.tokens.get(taskId) ?? null;
  }

  set(taskId, token) {
    this.tokens.delete(taskId); // newest last
    this.tokens.set(taskId, token);
    this._save();
  }

  delete(taskId) {
    if (this.tokens.delete(taskId)) this._save();
  }

  _save() {
    const newest = [...this.tokens].slice(-MAX_TASK_TOKENS);
    write(TASK_TOKENS_KEY, newest.length ? JSON.stringify(Object.fromEntries(newest)) : null);
  }
}

function read(key) {
  try {
    return sessionStorage.getItem(key) || null;
  } catch {
    return null; // storage disabled: the token lasts as long as the page
  }
}

function write(key, value) {
  try {
    if (value == null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, value);
  } catch {
    // storage disabled or full: the page still has the token in memory
  }
}
