// The ids the demo page watches, kept in localStorage so that a reload restores them.
import { isTaskId } from "./progress.js";

const STORAGE_KEY = "progress-sse:watched";
const MAX_WATCHED = 100;

/** The stored ids, oldest first; nothing when the entry is missing or malformed. */
export function loadWatched() {
  try {
    const ids = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "[]");
    return Array.isArray(ids) ? ids.filter(isTaskId) : [];
  } catch {
    return [];
  }
}

/** Store `ids` (oldest first), keeping the newest MAX_WATCHED. */
export function saveWatched(ids) {
  localStorage.setItem(STORAGE_KEY, JSON.stringify(ids.slice(-MAX_WATCHED)));
}
