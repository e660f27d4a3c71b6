// deepfit serve page for a regression model: a form with one field per feature column (a list for
// a one-hot column), or pasted CSV rows; POST to /v1/predict and show the predicted values.
// No external scripts or fonts: it works offline.
"use strict";

let model = null;

function field(column) {
  const label = document.createElement("label");
  label.textContent = column;
  const levels = model.categories[column];
  let input;
  if (levels) {
    input = document.createElement("select");
    for (const level of levels) input.append(new Option(level, level));
  } else {
    input = document.createElement("input");
    input.type = "text";
    input.inputMode = "decimal";
    input.required = true;
  }
  input.name = column;
  label.append(input);
  return label;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/model", { headers: headers({}) });
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    model = info;
    $("model-name").textContent = info.architecture + " · " + info.run;
    $("model-facts").textContent = `predicts ${info.target} from ${info.features.join(", ")} · backend ${info.backend}`;
    const shown = [...$("fields").querySelectorAll("[name]")].map((input) => input.name);
    if (shown.join("\n") !== info.features.join("\n")) $("fields").replaceChildren(...info.features.map(field)); // keep typed values
    $("csv").placeholder = info.features.join(",");
  } catch (err) {
    $("model-facts").textContent = "cannot describe the model: " + err.message;
  }
}

function showResults(target, rows, values) {
  const table = $("results");
  const columns = model ? model.features : [];
  const head = document.createElement("tr");
  for (const name of [...columns, target]) {
    const cell = document.createElement("th");
    cell.textContent = name;
    head.append(cell);
  }
  const body = rows.map((row, i) => {
    const line = document.createElement("tr");
    for (const name of columns) {
      const cell = document.createElement("td");
      cell.textContent = row[name] ?? "";
      line.append(cell);
    }
    const value = document.createElement("td");
    value.className = "value";
    value.textContent = values[i] === null ? "not finite" : Number(values[i].toPrecision(6)).toString();
    line.append(value);
    return line;
  });
  table.replaceChildren(head, ...body);
}

function parseCsv(text) {
  // Plain comma-separated cells; the server reads quoted cells too, this only echoes the inputs.
  const lines = text.split(/\r?\n/).filter((line) => line.trim());
  if (lines.length === 0) return [];
  const header = lines[0].split(",").map((name) => name.trim());
  return lines.slice(1).map((line) => Object.fromEntries(line.split(",").map((cell, i) => [header[i], cell])));
}

async function predict(body, type, rows, what) {
  setStatus("predicting " + what + "…");
  try {
    const response = await fetch("/v1/predict", { method: "POST", body, headers: headers({ "Content-Type": type }) });
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.error || response.statusText);
    const values = payload.predictions.map((p) => p.value);
    showResults(payload.target, rows, values);
    $("top-label").textContent = values.length === 1 && values[0] !== null ? Number(values[0].toPrecision(6)).toString() : "";
    setStatus(`${what}: ${values.length} ${payload.target} value${values.length === 1 ? "" : "s"}`);
  } catch (err) {
    $("top-label").textContent = "";
    $("results").replaceChildren();
    setStatus(err.message, true);
  }
}

function setUp() {
  $("row-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const row = Object.fromEntries(new FormData($("row-form")).entries());
    predict(JSON.stringify({ rows: [row] }), "application/json", [row], "the row");
  });
  $("predict-csv").addEventListener("click", () => {
    const text = $("csv").value;
    predict(text, "text/csv", parseCsv(text), "the pasted rows");
  });
  setUpKey(loadModel);
}

setUp();
loadModel();
