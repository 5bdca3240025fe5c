// The HTTP API the page calls, one function per request. `base` is the API's
// prefix when the app is mounted inside another one ("" at the root).
// A request the server refuses throws ApiError; one that cannot reach the server
// throws fetch's own TypeError, so callers can word the two differently.

const JSON_ONLY = { Accept: "application/json" };

/** The server answered, but not with what was asked for. */
export class ApiError extends Error {
  constructor(status, reason) {
    super(reason ?? `The server answered ${status}.`);
    this.status = status;
    this.reason = reason; // the server's own sentence (its `error`), or null
  }
}

export function createApi(base = "") {
  const url = (path) => `${base}${path}`;
  const task = (id) => url(`/tasks/${encodeURIComponent(id)}`);

  // GET of one task or group: its body, or null when the server does not know it.
  async function describeAt(address) {
    const response = await fetch(address, { headers: JSON_ONLY });
    if (response.status === 404) return null;
    if (!response.ok) throw await refusal(response);
    return response.json();
  }

  const api = {
    /** POST /tasks: the accepted task's body ({id, workers, warning, …}). */
    async start(name, kwargs) {
      const response = await fetch(url("/tasks"), {
        method: "POST",
        headers: { "Content-Type": "application/json", ...JSON_ONLY },
        body: JSON.stringify({ name, kwargs }),
      });
      if (response.status !== 202) throw await refusal(response);
      return response.json();
    },

    /** DELETE /tasks/<id>. */
    async cancel(taskId) {
      const response = await fetch(task(taskId), { method: "DELETE" });
      if (!response.ok) throw await refusal(response);
    },

    /** GET /tasks/<id>, or null for an unknown task. */
    describe: (taskId) => describeAt(task(taskId)),

    /** GET /groups/<id>, or null for an unknown group. */
    describeGroup: (groupId) => describeAt(url(`/groups/${encodeURIComponent(groupId)}`)),

    /** GET /healthz's body, whatever its status: a 503 still says how many workers. */
    async healthz() {
      const response = await fetch(url("/healthz"), { headers: JSON_ONLY });
      return response.json();
    },

    /** GET /tasks?limit=: the latest tasks, newest first. */
    async recent(limit) {
      const response = await fetch(url(`/tasks?limit=${limit}`), { headers: JSON_ONLY });
      if (!response.ok) throw await refusal(response);
      return (await response.json()).tasks;
    },

    /**
     * What an id is now: { task }, { group }, null when the server no longer knows
     * it, or { unreachable } when it cannot say (a deploy, a network blip).
     */
    async lookup(id) {
      try {
        const found = await api.describe(id);
        if (found) return { task: found };
        const group = await api.describeGroup(id);
        return group ? { group } : null;
      } catch {
        return { unreachable: true };
      }
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
