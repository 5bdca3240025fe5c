// A start form's values as the task's kwargs. Each field's data-kind (set by
// templates/index.html from the task's parameter checks) says which JSON type to send.

/** A value the page refuses before any request, with a sentence saying what to fix. */
export class InputError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

/**
 * kwargs in the JSON types the task's checks expect: numbers, true/false, strings,
 * arrays. A field left blank whose default is None is left out: the server fills it
 * in. Throws InputError for the first field that cannot be read.
 */
export function valuesOf(form) {
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
