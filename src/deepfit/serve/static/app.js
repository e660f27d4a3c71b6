// deepfit serve page: pick, drop or draw an image, POST it to /v1/predict, draw the top-k as bars.
// No external scripts or fonts: it works offline.
"use strict";

const TOPK = 5;

async function loadModel() {
  try {
    const response = await fetch("/v1/model", { headers: headers({}) });
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    const [c, h, w] = info.input_shape;
    $("model-name").textContent = info.architecture + " · " + info.run;
    $("model-facts").textContent = `${info.num_classes} classes (${info.classes.join(", ")}) · input ${c}×${h}×${w} · backend ${info.backend}`;
    $("draw-panel").hidden = c !== 1; // drawing makes sense for 1-channel models (digits, Fashion-MNIST)
  } catch (err) {
    $("model-facts").textContent = "cannot describe the model: " + err.message;
  }
}

function showResults(prediction) {
  $("top-label").textContent = prediction.label;
  $("top-label").dataset.index = prediction.index;
  const list = $("results");
  list.replaceChildren();
  for (const entry of prediction.topk) {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * entry.probability).toFixed(1) + "%";
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = (100 * entry.probability).toFixed(1) + "%";
    item.append(label, bar, pct);
    list.append(item);
  }
}

async function predict(body, type, what) {
  setStatus("classifying " + what + "…");
  try {
    const response = await fetch("/v1/predict?topk=" + TOPK, {
      method: "POST", body, headers: headers({ "Content-Type": type || "application/octet-stream" }),
    });
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.error || response.statusText);
    showResults(payload.predictions[0]);
    setStatus(what + ": " + payload.predictions[0].label);
  } catch (err) {
    $("top-label").textContent = "";
    $("results").replaceChildren();
    setStatus(err.message, true);
  }
}

function useFile(file) {
  if (!file) return;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  predict(file, file.type, file.name);
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => useFile(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
}

function setUpCanvas() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  const clear = () => { context.fillStyle = "#000"; context.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  context.strokeStyle = "#fff";
  context.lineWidth = 22;
  context.lineCap = "round";
  context.lineJoin = "round";
  let drawing = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    const [x, y] = point(event);
    context.beginPath();
    context.moveTo(x, y);
    context.lineTo(x, y);
    context.stroke();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const [x, y] = point(event);
    context.lineTo(x, y);
    context.stroke();
  });
  for (const name of ["pointerup", "pointerleave"]) canvas.addEventListener(name, () => { drawing = false; });
  $("clear").addEventListener("click", clear);
  $("predict-drawing").addEventListener("click", () => {
    canvas.toBlob((blob) => predict(blob, "image/png", "the drawing"), "image/png");
  });
}

setUpKey(loadModel);
setUpDrop();
setUpCanvas();
loadModel();
