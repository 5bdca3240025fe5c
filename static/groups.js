// A Celery group as one bar: its members' latest events folded into one aggregate.
// Pure logic, no DOM: the server's copy is src/progress_sse/web/groups.py, and
// tests/group_cases.json holds both to the same table of cases (docs/protocol.md,
// "GET /groups/<id>", is the contract).
import { isTerminal } from "./progress.js";

/**
 * The group's bar from its members' latest events (any iterable; members not seen
 * yet are simply absent) and how many members the group has. The same fields as
 * the server's aggregate, less `group_id` and `ts`.
 */
export function aggregate(members, expected) {
  const latest = [...members];
  const counts = {};
  for (const member of latest) counts[member.state] = (counts[member.state] ?? 0) + 1;
  const done = latest.filter((member) => isTerminal(member.state)).length;
  const current = latest.reduce((sum, member) => sum + (member.current ?? 0), 0);
  // Unknown while any member's total is, or while a member has not been seen yet.
  const known = latest.length > 0 && latest.length >= expected && latest.every((member) => member.total != null);
  const total = known ? latest.reduce((sum, member) => sum + member.total, 0) : null;
  return {
    state: groupState(counts, done, expected),
    current,
    total,
    percent: percentOf(current, total),
    message: `${done} of ${expected} tasks done`,
    tasks: expected,
    done,
    counts,
  };
}

// `queued` until some member moves, then `progress`; once every member has ended,
// the worst ending wins: failure, then lost, then revoked.
function groupState(counts, done, expected) {
  if (done < expected) return counts.started || counts.progress || counts.retry || done ? "progress" : "queued";
  return ["failure", "lost", "revoked"].find((state) => counts[state]) ?? "success";
}

/** The protocol's percent: 100 * current / total, 2 places, clamped to 0..100; see events.percent_of. */
export function percentOf(current, total) {
  if (total == null) return null;
  if (total <= 0) return current >= total ? 100 : 0; // nothing to do counts as done
  return roundLikePython(Math.min(100, Math.max(0, (100 * current) / total)));
}

// Python's round(x, 2): the 2-place decimal nearest x's exact binary value, ties to
// even. toFixed rounds the same exact value but breaks ties upwards, and a double
// lies exactly halfway between two 2-place decimals only when 8x is an odd
// integer (0.125 → 0.12 in Python, "0.13" from toFixed).
function roundLikePython(x) {
  const eighths = x * 8; // exact: a power of two
  if (Number.isInteger(eighths) && eighths % 2 !== 0) {
    const below = Math.floor(x * 100); // x * 100 is exact here too
    return (below % 2 === 0 ? below : below + 1) / 100;
  }
  return Number(x.toFixed(2));
}

/**
 * The groups a page watches, members riding the page's one shared stream: which
 * group each member belongs to, and each member's latest event.
 */
export class WatchedGroups {
  constructor() {
    this.groups = new Map(); // group id -> { members: Map(task id -> latest event), size }
    this.groupOf = new Map(); // member task id -> group id
  }

  has(groupId) {
    return this.groups.has(groupId);
  }

  /** Start following a group, from GET /groups/<id>'s `group_id` and `members`. */
  add(groupId, memberIds) {
    this.groups.set(groupId, { members: new Map(), size: memberIds.length });
    for (const id of memberIds) this.groupOf.set(id, groupId);
  }

  /**
   * Forget a member's latest event (its history was lost). Returns the group's
   * event without it, or null for a task that is in no followed group.
   */
  forget(taskId) {
    const groupId = this.groupOf.get(taskId);
    const group = this.groups.get(groupId);
    if (!group) return null;
    group.members.delete(taskId);
    return this.bar(groupId, group, Date.now() / 1000);
  }

  /** Stop following a group; returns its member ids. */
  drop(groupId) {
    this.groups.delete(groupId);
    const released = [];
    for (const [member, group] of this.groupOf) {
      if (group !== groupId) continue;
      this.groupOf.delete(member);
      released.push(member);
    }
    return released;
  }

  /**
   * Fold a member's event into its group. Returns the event the group's card
   * shows (the aggregate, in the shape of a task event), or null for a task that
   * is in no followed group.
   */
  record(event) {
    const groupId = this.groupOf.get(event.task_id);
    const group = this.groups.get(groupId);
    if (!group) return null;
    group.members.set(event.task_id, event);
    return this.bar(groupId, group, event.ts);
  }

  // The group's card event, in the shape of a task event.
  bar(groupId, group, ts) {
    const bar = aggregate(group.members.values(), group.size);
    return {
      task_id: groupId,
      name: groupName(group.size),
      state: bar.state,
      current: bar.current,
      total: bar.total,
      percent: bar.percent,
      message: bar.message,
      ts,
    };
  }
}

export function groupName(size) {
  return `group of ${size} tasks`;
}
