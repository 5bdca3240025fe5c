// The "Recent tasks" list: GET /tasks's latest tasks, each with a Watch button.
import { label } from "./card.js";

/** Replace the list with `tasks`; `onWatch(task)` runs when one's Watch button is pressed. */
export function renderRecent(box, tasks, onWatch) {
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
      button.addEventListener("click", () => onWatch(task));
      item.append(name, " ", id, " ", state, " ", button);
      return item;
    }),
  );
}

/** A watched task's badge in the list follows its stream, between reloads of the list. */
export function showInRecent(box, event) {
  for (const item of box.children) {
    if (item.dataset.taskId !== event.task_id) continue;
    const badge = item.querySelector(".badge");
    badge.dataset.state = event.state;
    badge.textContent = label(event.state);
  }
}
