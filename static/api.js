// The HTTP API the page calls, one function per request. `base` is the API's
// prefix when the app is mounted inside another one ("" at the root).
// A request the server refuses throws ApiError; one that cannot reach the server
// throws fetch's own TypeError, so callers can word the two differently.
//
// A server that wants access tokens: createApi(base, { token }) sends
// `Authorization: Bearer <token>` with every request. `token` is a string, or a
// function called for each request that returns one (null or "" for none).

const JSON_ONLY = { Accept: "application/json" };

export const NEEDS_TOKEN = "This page needs a valid access token; ask for a new link.";

/** The server answered, but not with what was asked for. */
export class ApiError extends Error {
  constructor(status, reason) {
    super(reason ?? `The server answered ${status}.`);
    this.status = status;
    this.reason = reason; // the server's own sentence (its `error`), or null
  }

  /** 401 or 403: the request's token is missing, invalid, expired, or does not allow it. */
  get refusedAccess() {
    return this.status === 401 || this.status === 403;
  }
}

/**
 * What to tell a person about a refused token: a 401 asks for a new link, a 403
 * says the token does not allow this (with the server's sentence naming the
 * scope). Null for any other error.
 */
export function accessProblem(error) {
  if (!(error instanceof ApiError)) return null;
  if (error.status === 401) return NEEDS_TOKEN;
  if (error.status === 403) {
    return `This page's access token does not allow that.${error.reason ? ` ${error.reason}` : ""}`;
  }
  return null;
}

export function createApi(base = "", { token = null } = {}) {
  const url = (path) => `${base}${path}`;
  const task = (id) => url(`/tasks/${encodeURIComponent(id)}`);
  // Every request's headers: `extra` plus the bearer token, when there is one.
  const headers = (extra = {}) => {
    const current = typeof token === "function" ? token() : token;
    return current ? { ...extra, Authorization: `Bearer ${current}` } : extra;
  };

  // GET of one task or group: its body, or null when the server does not know it.
  async function describeAt(address) {
    const response = await fetch(address, { headers: headers(JSON_ONLY) });
    if (response.status === 404) return null;
    if (!response.ok) throw await refusal(response);
    return response.json();
  }

  const api = {
    /** POST /tasks: the accepted task's body ({id, workers, warning, …}). */
    async start(name, kwargs) {
      const response = await fetch(url("/tasks"), {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", ...JSON_ONLY }),
        body: JSON.stringify({ name, kwargs }),
      });
      if (response.status !== 202) throw await refusal(response);
      return response.json();
    },

    /** DELETE /tasks/<id>. */
    async cancel(taskId) {
      const response = await fetch(task(taskId), { method: "DELETE", headers: headers() });
      if (!response.ok) throw await refusal(response);
    },

    /** GET /tasks/<id>, or null for an unknown task. */
    describe: (taskId) => describeAt(task(taskId)),

    /** GET /groups/<id>, or null for an unknown group. */
    describeGroup: (groupId) => describeAt(url(`/groups/${encodeURIComponent(groupId)}`)),

    /** GET /healthz's body, whatever its status: a 503 still says how many workers. */
    async healthz() {
      const response = await fetch(url("/healthz"), { headers: headers(JSON_ONLY) });
      return response.json();
    },

    /**
     * HEAD /feed?name=…: whether this token may read the feed of `names`, asked
     * before an EventSource opens it, since an EventSource never sees a refusal's
     * status. Throws ApiError for a 400 (a name the server refuses), 401 or 403; a
     * HEAD has no body, so the error has no reason of the server's.
     */
    async checkFeed(names) {
      const query = new URLSearchParams(names.map((name) => ["name", name]));
      const response = await fetch(url(`/feed?${query}`), { method: "HEAD", headers: headers() });
      if (!response.ok) throw new ApiError(response.status, null);
    },

    /** GET /tasks?limit=: the latest tasks, newest first. */
    async recent(limit) {
      const response = await fetch(url(`/tasks?limit=${limit}`), { headers: headers(JSON_ONLY) });
      if (!response.ok) throw await refusal(response);
      return (await response.json()).tasks;
    },

    /**
     * What an id is now: { task }, { group }, null when the server no longer knows
     * it, { refused: ApiError } when the token does not let it say (401, 403), or
     * { unreachable } when it cannot say (a deploy, a network blip).
     */
    async lookup(id) {
      let refused = null; // a token for a group may not read it as a task, and the other way round
      for (const [kind, describe] of [["task", api.describe], ["group", api.describeGroup]]) {
        try {
          const found = await describe(id);
          if (found) return { [kind]: found };
        } catch (error) {
          if (!(error instanceof ApiError && error.refusedAccess)) return { unreachable: true };
          refused ??= error;
        }
      }
      return refused ? { refused } : null;
    },
  };
  return api;
}

async function refusal(response) {
  let reason = null;
  try {
    reason = (await response.json()).error ?? null;
  } catch {
    // a body that is not JSON says nothing more than its status
  }
  return new ApiError(response.status, reason);
}
