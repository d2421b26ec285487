// The review app's behaviour: a file of its own, so the pages' Content-Security-Policy allows no inline script.
"use strict";

function setUpUpload() {
  const drop = document.getElementById("drop"), form = document.getElementById("upload");
  if (!drop || !form) return;
  ["dragenter", "dragover"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", ev => {
    document.getElementById("files").files = ev.dataTransfer.files;
    document.getElementById("folder").disabled = true;
    form.submit();
  });
  form.addEventListener("submit", () => {
    for (const input of form.querySelectorAll("input[type=file]")) if (!input.files.length) input.disabled = true;
  });
}

function setUpComparison() {
  const known = document.getElementById("known"), zoom = document.getElementById("zoom");
  if (!known || !zoom) return;
  const panes = [document.querySelector("#pane-query img"), known];
  function compare(img) {
    known.src = "/photo/known/" + img.dataset.index + "?view=crop";
    document.getElementById("known-whole").href = "/photo/known/" + img.dataset.index;
    document.getElementById("compare-label").textContent = "query beside " + img.dataset.id;
  }
  zoom.addEventListener("input", ev => {
    for (const img of panes) img.style.transform = "scale(" + ev.target.value + ")";
    document.getElementById("zoom-value").textContent = ev.target.value + "×";
  });
  const candidates = document.querySelectorAll("#candidates img.known");
  for (const img of candidates) img.addEventListener("click", () => compare(img));
  if (candidates.length) compare(candidates[0]);
  const shown = document.getElementById("shown");
  if (shown) shown.addEventListener("change", () => shown.form.submit());
}

document.addEventListener("DOMContentLoaded", () => { setUpUpload(); setUpComparison(); });
