// What both deepfit serve pages use (loaded before app.js or table.js): element lookup, the API
// key kept in this browser and sent as a Bearer header, and the status line.
"use strict";

const $ = (id) => document.getElementById(id);

function headers(extra) {
  const key = localStorage.getItem("deepfit-api-key") || "";
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "muted";
}

function setUpKey(onChange) {
  const input = $("api-key");
  input.value = localStorage.getItem("deepfit-api-key") || "";
  input.addEventListener("change", () => { localStorage.setItem("deepfit-api-key", input.value); onChange(); });
}
