// The page at / of the hardened server: one image in, the top classes, Grad-CAM and the model card.
// It talks only to this server (KServe v1 :explain and /model-card); the token lives in `token`.
"use strict";

let token = "";
let card = null;
let image = "";  // the chosen file, base64

const $ = (id) => document.getElementById(id);

function show(id, visible) { $(id).hidden = !visible; }

function fail(message) {
  $("error").textContent = message;
  show("error", true);
}

async function call(path, body) {
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let answer = {};
  try { answer = await response.json(); } catch (error) { answer = {}; }
  if (response.status === 401 || response.status === 403) {
    show("token-box", true);
    throw new Error(answer.error || answer.message || "this server needs a token.");
  }
  if (!response.ok) throw new Error(answer.error || answer.message || "HTTP " + response.status);
  return answer;
}

function percent(p) { return (100 * p).toFixed(1) + "%"; }

function field(name, value) {
  if (value === null || value === undefined || value === "") return;
  const term = document.createElement("dt");
  term.textContent = name;
  const description = document.createElement("dd");
  if (value instanceof Node) description.append(value); else description.textContent = value;
  $("card-fields").append(term, description);
}

function showCard() {
  $("card-fields").replaceChildren();
  const accuracy = (a) => (typeof a === "number" ? a.toFixed(3) : null);
  field("registered model", card.registered_name);
  field("version", card.version);
  field("alias", card.alias);
  field("architecture", card.architecture);
  field("validation accuracy", accuracy(card.val_accuracy));
  field("test accuracy", accuracy(card.test_accuracy));
  field("training data", card.data);
  field("training images", card.train_images);
  field("data digest", card.data_digest);
  field("trained", card.trained);
  if (card.run_url) {
    const link = document.createElement("a");
    link.href = card.run_url;
    link.textContent = "the run in the MLflow UI";
    link.rel = "noopener noreferrer";
    field("run", link);
  } else {
    field("run", card.run_id);
  }
  show("card", true);
  $("classes").replaceChildren(...card.class_names.map((name) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = name;
    button.dataset.target = name;
    button.addEventListener("click", () => explain(name));
    return button;
  }));
}

async function loadCard() {
  try {
    card = await call("/model-card");
    showCard();
    show("token-box", false);
    show("error", false);
    $("status").textContent = `${card.name} version ${card.version} · ${card.architecture}`;
  } catch (error) {
    $("status").textContent = "Enter the server's token to use the model.";
    fail(error.message);
  }
}

function showTop(prediction) {
  const ranked = prediction.probabilities
    .map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  $("top").replaceChildren(...ranked.map(([p, i]) => {
    const item = document.createElement("li");
    item.dataset.target = card.class_names[i];
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = card.class_names[i];
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = percent(p);
    bar.append(fill);
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = percent(p);
    item.append(name, bar, share);
    item.addEventListener("click", () => explain(card.class_names[i]));
    return item;
  }));
}

async function explain(target) {
  if (!image || !card) return;
  show("error", false);
  $("status").textContent = target ? `Explaining ${target}…` : "Classifying…";
  try {
    const body = { instances: [image] };
    if (target) body.parameters = { target };
    const answer = await call(`/v1/models/${encodeURIComponent(card.name)}:explain`, body);
    const prediction = answer.predictions[0];
    const explanation = answer.explanations[0];
    if (!target) showTop(prediction);
    $("overlay").src = "data:image/png;base64," + explanation.heatmap_png;
    $("overlay-caption").textContent = "Grad-CAM for " + explanation.target_class;
    for (const button of $("classes").children) {
      button.classList.toggle("active", button.dataset.target === explanation.target_class);
    }
    show("answer", true);
    $("status").textContent = `${prediction.class_name} (${percent(Math.max(...prediction.probabilities))})`;
  } catch (error) {
    show("answer", false);
    $("status").textContent = "The server refused the image.";
    fail(error.message);
  }
}

function choose(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    image = url.slice(url.indexOf(",") + 1);
    $("input-image").src = url.startsWith("data:image/") ? url : "";
    explain("");
  };
  reader.readAsDataURL(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  $("token-use").addEventListener("click", () => { token = $("token").value.trim(); loadCard(); });
  $("token").addEventListener("keydown", (event) => { if (event.key === "Enter") $("token-use").click(); });
  loadCard();
});
