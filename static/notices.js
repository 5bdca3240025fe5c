// The service's broadcast notices (POST /notices: a deploy coming, an incident), as
// a banner at the top of the page, each with a Dismiss button. Every stream of the
// page carries them (progress.js `onNotice`), and a stream that (re)connects is sent
// the latest one again: a notice is shown once per id, and one dismissed stays
// dismissed for the tab (sessionStorage), whatever reconnects or reloads follow.
// Its text reaches the DOM only through textContent.

const DISMISSED_KEY = "progress-sse:dismissed-notices";
const MAX_DISMISSED = 50; // the newest ids: older notices are not sent again anyway
const MAX_SHOWN = 3; // the newest, when several came before anyone looked

export class NoticeBanner {
  constructor(box) {
    this.box = box;
    this.seen = new Set(); // ids shown on this page: the same notice from another stream is the same
    this.dismissed = readDismissed();
  }

  /** Show a notice ({id, text, ts}) unless it is shown already or was dismissed. */
  show({ id, text, ts }) {
    if (!this.box || this.seen.has(id) || this.dismissed.includes(id)) return;
    this.seen.add(id);
    const item = document.createElement("div");
    item.className = "broadcast";
    item.dataset.noticeId = id;
    const words = document.createElement("p");
    words.className = "broadcast-text";
    words.textContent = text;
    item.append(words);
    if (ts != null) {
      const when = new Date(ts * 1000);
      const time = document.createElement("time");
      time.dateTime = when.toISOString();
      time.textContent = when.toLocaleTimeString();
      item.append(time);
    }
    const dismiss = document.createElement("button");
    dismiss.type = "button";
    dismiss.className = "secondary";
    dismiss.textContent = "Dismiss";
    dismiss.addEventListener("click", () => this.dismiss(id));
    item.append(dismiss);
    this.box.prepend(item); // newest first
    for (const old of [...this.box.children].slice(MAX_SHOWN)) old.remove();
  }

  /** Take the notice down, for this tab's life. */
  dismiss(id) {
    for (const item of this.box.querySelectorAll(".broadcast")) if (item.dataset.noticeId === id) item.remove();
    this.dismissed = [...this.dismissed.filter((d) => d !== id), id].slice(-MAX_DISMISSED);
    try {
      sessionStorage.setItem(DISMISSED_KEY, JSON.stringify(this.dismissed));
    } catch {
      // storage disabled: dismissed for as long as the page is open
    }
  }
}

function readDismissed() {
  try {
    const ids = JSON.parse(sessionStorage.getItem(DISMISSED_KEY) ?? "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return [];
  }
}
