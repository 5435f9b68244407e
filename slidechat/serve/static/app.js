// slidechat serve: slide list, OpenSeadragon viewer with a canvas overlay, chat with per-patch heatmaps.
"use strict";

const api = (path) => fetch(path).then((r) => (r.ok ? r.json() : Promise.reject(r)));
// an error's message: FastAPI's {"detail": ...}, or the status line when the body is not JSON (a crash)
const detail = (r) => r.json().then((b) => (typeof b.detail === "string" ? b.detail : JSON.stringify(b.detail)),
  () => `${r.status} ${r.statusText}`);
const $ = (id) => document.getElementById(id);
const slidePath = (id) => "/api/slides/" + encodeURIComponent(id);

const state = {
  slideId: null,
  tissue: null,        // GeoJSON FeatureCollection (level-0 px)
  patches: null,       // {coords: [[x, y]...], size: [w, h]}
  heat: null,          // display values in [0, 1], one per patch, of the active answer
  focus: null,         // index of the patch last zoomed to
  chats: {},           // slide id -> [{question, answer, display, top}]
  pollers: {},         // slide id -> interval id of a preprocessing job
};

const viewer = OpenSeadragon({
  id: "viewer",
  prefixUrl: "/static/openseadragon/images/",
  drawer: "canvas",
  showNavigator: true,
  navigatorPosition: "BOTTOM_RIGHT",
  maxZoomPixelRatio: 2,
  gestureSettingsMouse: { clickToZoom: true },
});

// ---------------------------------------------------------------------------------------------- overlay

const overlay = $("overlay");
const ctx = overlay.getContext("2d");

function heatColour(v) {
  // YlOrRd-like ramp; alpha grows with the value so cold patches stay see-through
  const stops = [[255, 237, 160], [254, 178, 76], [240, 59, 32], [128, 0, 38]];
  const t = Math.min(Math.max(v, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(t), stops.length - 2), f = t - i;
  const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * f));
  return `rgba(${c[0]},${c[1]},${c[2]},${(0.15 + 0.7 * v).toFixed(3)})`;
}

function drawOverlay() {
  const box = $("viewer").getBoundingClientRect();
  const panel = $("viewer-panel").getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  overlay.style.left = box.left - panel.left + "px";
  overlay.style.top = box.top - panel.top + "px";
  overlay.style.width = box.width + "px";
  overlay.style.height = box.height + "px";
  overlay.width = Math.round(box.width * dpr);
  overlay.height = Math.round(box.height * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, box.width, box.height);
  const drawn = { tissue: 0, holes: 0, patches: 0, heat: 0 };
  const image = viewer.world.getItemAt(0);
  if (!image) { overlay.dataset.drawn = JSON.stringify(drawn); return; }
  // image (level-0) px -> viewer element px: an axis-aligned scale and offset
  const o = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const u = image.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 1000));
  const s = (u.x - o.x) / 1000, sy = (u.y - o.y) / 1000;
  const X = (x) => o.x + x * s, Y = (y) => o.y + y * sy;

  if (state.patches) {
    const [w, h] = state.patches.size;
    const coords = state.patches.coords;
    if ($("show-heat").checked && state.heat) {
      coords.forEach(([x, y], i) => {
        const v = state.heat[i];
        if (!(v > 0)) return;
        ctx.fillStyle = heatColour(v);
        ctx.fillRect(X(x), Y(y), w * s, h * sy);
        drawn.heat++;
      });
    }
    if ($("show-patches").checked) {
      ctx.strokeStyle = "rgba(255, 214, 0, 0.9)";
      ctx.lineWidth = 1;
      coords.forEach(([x, y]) => { ctx.strokeRect(X(x), Y(y), w * s, h * sy); drawn.patches++; });
    }
    if (state.focus !== null && coords[state.focus]) {
      const [x, y] = coords[state.focus];
      ctx.strokeStyle = "#00e5ff";
      ctx.lineWidth = 3;
      ctx.strokeRect(X(x), Y(y), w * s, h * sy);
    }
  }
  if (state.tissue) {
    const ring = (pts) => {
      ctx.beginPath();
      pts.forEach(([x, y], k) => (k ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
      ctx.closePath();
      ctx.stroke();
    };
    ctx.lineWidth = 2;
    for (const feature of state.tissue.features || []) {
      const [outer, ...holes] = feature.geometry.coordinates;
      if ($("show-tissue").checked) { ctx.strokeStyle = "#19c24a"; ring(outer); drawn.tissue++; }
      if ($("show-holes").checked) { ctx.strokeStyle = "#2f7bff"; holes.forEach((hole) => { ring(hole); drawn.holes++; }); }
    }
  }
  overlay.dataset.drawn = JSON.stringify(drawn);
}

["open", "animation", "update-viewport", "resize"].forEach((e) => viewer.addHandler(e, drawOverlay));
["show-tissue", "show-holes", "show-patches", "show-heat"].forEach((id) => $(id).addEventListener("change", drawOverlay));
window.addEventListener("resize", drawOverlay);

function patchAt(point) {
  if (!state.patches) return -1;
  const [w, h] = state.patches.size;
  return state.patches.coords.findIndex(([x, y]) => point.x >= x && point.x < x + w && point.y >= y && point.y < y + h);
}

function zoomToPatch(i) {
  const image = viewer.world.getItemAt(0);
  if (!image || !state.patches || !state.patches.coords[i]) return;
  const [x, y] = state.patches.coords[i];
  const [w, h] = state.patches.size;
  state.focus = i;
  viewer.viewport.fitBounds(image.imageToViewportRectangle(x - w, y - h, 3 * w, 3 * h));
  document.body.dataset.focus = String(i);
  drawOverlay();
}

// a click on a hot patch of the shown heatmap zooms to it (elsewhere the viewer's own click-to-zoom)
viewer.addHandler("canvas-click", (event) => {
  if (!event.quick || !state.heat || !$("show-heat").checked) return;
  const image = viewer.world.getItemAt(0);
  const i = image ? patchAt(image.viewerElementToImageCoordinates(event.position)) : -1;
  if (i >= 0 && state.heat[i] >= 0.5) {
    event.preventDefaultAction = true;
    zoomToPatch(i);
  }
});

// ---------------------------------------------------------------------------------------------- slides

function badge(text, cls) {
  const b = document.createElement("span");
  b.className = "badge " + (cls || "");
  b.textContent = text;
  return b;
}

async function refreshSlides() {
  const [status, slides] = await Promise.all([api("/api/status"), api("/api/slides")]);
  $("model-name").textContent = "model: " + status.model + (status.attribution ? "" : " (no heatmaps)");
  const list = $("slide-list");
  list.replaceChildren();
  for (const s of slides) {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    li.dataset.stage = s.stage;
    if (s.id === state.slideId) li.classList.add("selected");
    const row = document.createElement("div");
    row.className = "slide-row";
    const name = document.createElement("span");
    name.textContent = s.id;
    name.title = s.file;
    row.append(name, badge(s.available ? s.stage : "missing", s.stage === "ready" ? "ready" : ""));
    li.append(row);
    const job = s.job;
    if (job && (job.state === "queued" || job.state === "running" || job.state === "failed")) {
      li.append(jobView(job));
      if (job.state !== "failed") watchJob(s.id);
    } else if (s.stage !== "ready" && s.available) {
      const button = document.createElement("button");
      button.className = "preprocess";
      button.textContent = "Preprocess";
      button.disabled = !status.preprocess;
      button.title = status.preprocess ? "segment, tile and extract features (cached, as `slidechat ask`)"
        : status.preprocess_disabled_reason;
      button.addEventListener("click", (e) => { e.stopPropagation(); startPreprocess(s.id); });
      li.append(button);
    }
    li.addEventListener("click", () => selectSlide(s.id, s.stage));
    list.append(li);
  }
}

function jobView(job) {
  const box = document.createElement("div");
  box.className = "job";
  box.dataset.state = job.state;
  const bar = document.createElement("div");
  bar.className = "progress";
  const fill = document.createElement("div");
  const steps = { segmenting: 0.1, tiling: 0.25, features: 0.3 };
  let frac = job.state === "done" ? 1 : steps[job.step] || 0.02;
  if (job.step === "features" && job.total) frac = 0.3 + 0.7 * (job.done / job.total);
  fill.style.width = Math.round(frac * 100) + "%";
  bar.append(fill);
  const msg = document.createElement("div");
  msg.className = "job-message";
  msg.textContent = job.state === "failed" ? "failed: " + job.message
    : job.state + (job.step ? " · " + job.step : "") + (job.total ? ` ${job.done}/${job.total} patches` : "");
  if (job.state === "failed") box.append(badge("failed", "failed"));
  box.append(bar, msg);
  return box;
}

async function startPreprocess(id) {
  const r = await fetch(slidePath(id) + "/preprocess", { method: "POST" });
  if (!r.ok) { alert(await detail(r)); return; }
  await refreshSlides();
  watchJob(id);
}

function watchJob(id) {
  if (state.pollers[id]) return;
  state.pollers[id] = setInterval(async () => {
    let job;
    try { job = await api(slidePath(id) + "/job"); } catch (e) { return; }
    const li = document.querySelector(`#slide-list li[data-id="${CSS.escape(id)}"]`);
    if (li) { li.querySelector(".job")?.remove(); li.querySelector(".preprocess")?.remove(); li.append(jobView(job)); }
    if (job.state === "done" || job.state === "failed") {
      clearInterval(state.pollers[id]);
      delete state.pollers[id];
      await refreshSlides();
      if (id === state.slideId) selectSlide(id, job.state === "done" ? "ready" : "new");
    }
  }, 1000);
}

async function selectSlide(id, stage) {
  state.slideId = id;
  state.tissue = state.patches = state.heat = state.focus = null;
  document.body.dataset.slide = id;
  document.body.dataset.stage = stage;
  document.querySelectorAll("#slide-list li").forEach((li) => li.classList.toggle("selected", li.dataset.id === id));
  $("slide-title").textContent = id;
  viewer.open(slidePath(id) + "/image.dzi");
  const [tissue, patches] = await Promise.all([
    api(slidePath(id) + "/tissue").catch(() => null), api(slidePath(id) + "/patches").catch(() => null)]);
  if (state.slideId !== id) return;
  state.tissue = tissue;
  state.patches = patches;
  renderChat();
  drawOverlay();
}

// ---------------------------------------------------------------------------------------------- chat

function renderChat() {
  const id = state.slideId;
  const ready = document.body.dataset.stage === "ready" && state.patches && state.patches.source === "features";
  $("question").disabled = $("ask").disabled = !ready;
  $("chat-note").textContent = ready ? "Answers come with a heatmap: where the answer came from."
    : "This slide has no features yet: preprocess it (left) to ask about it.";
  const list = $("messages");
  list.replaceChildren();
  (state.chats[id] || []).forEach((turn, k) => {
    const q = document.createElement("li");
    q.className = "user";
    q.textContent = turn.question;
    list.append(q);
    list.append(answerView(turn, k));
  });
  list.scrollTop = list.scrollHeight;
}

function showHeat(turn, k) {
  state.heat = turn.display || null;
  document.querySelectorAll("#messages li.assistant").forEach((li) => li.classList.toggle("active", li.dataset.turn === String(k)));
  document.body.dataset.heatTurn = String(k);
  drawOverlay();
}

function answerView(turn, k) {
  const a = document.createElement("li");
  a.className = "assistant" + (turn.error ? " error" : "");
  a.dataset.turn = String(k);
  a.textContent = turn.pending ? "…" : turn.error || turn.answer;
  if (turn.pending) { a.classList.add("pending"); return a; }
  if (turn.display) {
    const meta = document.createElement("div");
    meta.className = "answer-meta";
    const dropped = turn.history_sent - turn.history_used;
    meta.textContent = `answer ${turn.answer_seconds}s, heatmap ${turn.attribution_seconds}s` +
      (dropped > 0 ? ` · the ${dropped} oldest turns were left out (history budget)` : "") + " · hottest patches:";
    const chips = document.createElement("div");
    chips.className = "top-patches";
    turn.top.forEach((i, rank) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "top-patch";
      b.dataset.patch = String(i);
      b.textContent = `#${rank + 1} (${state.patches.coords[i].join(", ")})`;
      b.title = "zoom to this patch";
      b.addEventListener("click", () => { showHeat(turn, k); zoomToPatch(i); });
      chips.append(b);
    });
    const show = document.createElement("button");
    show.type = "button";
    show.className = "show-heat";
    show.textContent = "show heatmap";
    show.addEventListener("click", () => showHeat(turn, k));
    a.append(meta, chips, show);
  }
  return a;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = state.slideId;
  const question = $("question").value.trim();
  if (!id || !question) return;
  const turns = (state.chats[id] = state.chats[id] || []);
  const history = turns.filter((t) => !t.error && !t.pending).map((t) => [t.question, t.answer]);
  const turn = { question, pending: true, history_sent: history.length };
  turns.push(turn);
  $("question").value = "";
  renderChat();
  $("queue").textContent = "thinking…";
  try {
    const r = await fetch(slidePath(id) + "/chat", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ question, history }) });
    if (!r.ok) throw new Error(await detail(r));
    Object.assign(turn, await r.json(), { pending: false });
  } catch (e) {
    Object.assign(turn, { pending: false, error: "error: " + e.message });
  }
  $("queue").textContent = "";
  if (state.slideId === id) {
    renderChat();
    if (turn.display) showHeat(turn, turns.indexOf(turn));
  }
});

$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});

setInterval(async () => {
  try {
    const s = await api("/api/status");
    if (s.waiting > 1) $("queue").textContent = `${s.waiting} questions in the queue`;
  } catch (e) { /* server restarting */ }
}, 3000);

refreshSlides().then(() => { document.body.dataset.loaded = "1"; });
