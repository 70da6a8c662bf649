// The r2 serve page: upload or pick a video, follow its encoding, ground sentences, show the moments.
// It talks only to the JSON API of r2/serve/app.py and plays the video file the server serves back.
"use strict";

const TOP = 5; // moments drawn on the timeline and listed, per sentence
const POLL_MS = 250; // how often the encoding progress is asked for
const SVG = "http://www.w3.org/2000/svg";
const W = 1000; // timeline width in SVG units (stretched to the page's width)
const H = 120; // timeline height in SVG units

const $ = (id) => document.getElementById(id);
const player = $("player");
let current = null; // the video of the page: the API's video object once it is accepted
let ticket = 0; // bumped by every new video, so that answers about an older one are dropped
let playing = null; // the moment being played: {start, end}; the player pauses at its end

function el(tag, attrs = {}, text = "") {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

const seconds = (s) => `${Number(s).toFixed(1)} s`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`The server did not answer (${err.message}); is r2 serve still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `The server answered ${response.status} ${response.statusText}.`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

function setStatus(text, done, total) {
  const bar = $("progress");
  if (total) {
    bar.max = total;
    bar.value = Math.min(done, total);
  } else if (done === null) {
    bar.removeAttribute("value"); // indeterminate
  } else {
    bar.max = 1;
    bar.value = done;
  }
  $("status").textContent = text;
}

function showProgress(video) {
  if (video.state === "ready") {
    setStatus(`${video.name}: ${seconds(video.duration ?? video.total / video.fps)}, ${video.total} clips at ${video.fps} fps, ready`, video.total, video.total);
  } else if (video.total) {
    setStatus(`encoding ${video.name}: ${video.done} / ${video.total} clips`, video.done, video.total);
  } else {
    setStatus(`encoding ${video.name}: ${video.done} clips`, null);
  }
  $("progress").dataset.state = video.state;
}

async function addVideo(label, options) {
  const mine = ++ticket;
  current = null;
  playing = null;
  clearError();
  $("results").replaceChildren();
  $("ground").disabled = true;
  setStatus(`sending ${label}…`, null);
  try {
    let video = await api("/api/videos", options);
    if (mine !== ticket) return;
    player.src = video.url;
    for (;;) {
      showProgress(video);
      if (video.state === "ready") break;
      await sleep(POLL_MS);
      if (mine !== ticket) return;
      video = await api(`/api/videos/${video.id}`);
      if (mine !== ticket) return;
    }
    current = video;
    $("ground").disabled = false;
  } catch (err) {
    if (mine !== ticket) return;
    player.removeAttribute("src");
    player.load();
    setStatus("no video", 0);
    showError(err.message);
  }
}

function upload(file) {
  addVideo(file.name, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    body: file,
  });
}

function useSample() {
  const name = $("sample").value;
  if (!name) return;
  addVideo(name, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sample: name }),
  });
}

async function ground() {
  const sentences = $("sentences").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!sentences.length) {
    showError("Type a sentence to ground first.");
    return;
  }
  if (!current) return;
  const mine = ticket;
  clearError();
  $("ground").disabled = true;
  $("ground-status").textContent = sentences.length > 1 ? `grounding ${sentences.length} sentences…` : "grounding…";
  const started = performance.now();
  try {
    const answer = await api("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ video_id: current.id, sentences }),
    });
    if (mine !== ticket) return;
    $("results").replaceChildren(...answer.records.map((record) => result(record, answer.duration, answer.fps)));
    $("ground-status").textContent = `done in ${Math.round(performance.now() - started)} ms`;
  } catch (err) {
    if (mine !== ticket) return;
    $("ground-status").textContent = "";
    showError(err.message);
  } finally {
    if (mine === ticket) $("ground").disabled = false;
  }
}

// One sentence's answer: heading, timeline (saliency curve + top moments as bands), ranked list.
function result(record, duration, fps) {
  const moments = record.pred_relevant_windows.slice(0, TOP);
  const section = el("section", { class: "panel result" });
  section.append(el("h3", {}, `“${record.query}”`));
  section.append(timeline(record.pred_saliency_scores, moments, duration, fps));
  const axis = el("div", { class: "axis" });
  for (const f of [0, 0.25, 0.5, 0.75, 1]) axis.append(el("span", {}, seconds(f * duration)));
  section.append(axis);
  const list = el("ol", { class: "moments" });
  moments.forEach(([start, end, score], i) => {
    const item = el("li");
    const button = el("button", {
      type: "button", class: "moment", "data-rank": i + 1, "data-start": start, "data-end": end, "data-score": score,
    });
    button.append(el("span", { class: "when" }, `${seconds(start)} – ${seconds(end)}`));
    button.append(el("span", { class: "score" }, `score ${Number(score).toFixed(3)}`));
    button.addEventListener("click", () => play(start, end));
    hoverable(button, section, i + 1, start, end, score);
    item.append(button);
    list.append(item);
  });
  if (!moments.length) {
    const scores = record.pred_saliency_scores;
    const peak = scores.indexOf(Math.max(...scores));
    list.append(el("li", { class: "muted" }, `no moment; most salient clip at ${seconds(peak / fps)}`));
  }
  section.append(list);
  return section;
}

function timeline(saliency, moments, duration, fps) {
  const svg = el("svg:svg", { class: "timeline", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const x = (t) => (Math.min(Math.max(t, 0), duration) / duration) * W;
  svg.append(el("svg:rect", { class: "track", x: 0, y: 0, width: W, height: H }));
  // best moment drawn last, on top
  moments.map((m, i) => [m, i]).reverse().forEach(([[start, end, score], i]) => {
    const band = el("svg:rect", {
      class: `band rank-${i + 1}`, x: x(start), y: 0, width: Math.max(x(end) - x(start), 1), height: H,
      "data-rank": i + 1, "data-start": start, "data-end": end, "data-score": score,
    });
    band.append(el("svg:title", {}, `#${i + 1}: ${seconds(start)} – ${seconds(end)}, score ${Number(score).toFixed(3)}`));
    band.addEventListener("click", (event) => {
      event.stopPropagation();
      play(start, end);
    });
    svg.append(band);
  });
  if (saliency.length) {
    const low = Math.min(...saliency);
    const span = Math.max(...saliency) - low || 1;
    const y = (s) => H - 8 - ((s - low) / span) * (H - 16);
    const points = saliency.map((s, t) => `${x((t + 0.5) / fps).toFixed(1)},${y(s).toFixed(1)}`);
    svg.append(el("svg:polygon", { class: "saliency-area", points: `${x(0.5 / fps)},${H} ${points.join(" ")} ${x((saliency.length - 0.5) / fps)},${H}` }));
    svg.append(el("svg:polyline", { class: "saliency", points: points.join(" ") }));
  }
  svg.append(el("svg:line", { class: "playhead", x1: 0, x2: 0, y1: 0, y2: H }));
  svg.addEventListener("click", (event) => {
    const box = svg.getBoundingClientRect();
    playing = null;
    player.currentTime = ((event.clientX - box.left) / box.width) * duration;
  });
  svg.dataset.duration = duration;
  return svg;
}

// Hovering a moment (its band or its list entry) shows its score and lights both up.
function hoverable(button, section, rank, start, end, score) {
  const band = () => section.querySelector(`.band[data-rank="${rank}"]`);
  const tip = $("tooltip");
  const on = (event) => {
    button.classList.add("hot");
    band()?.classList.add("hot");
    tip.textContent = `#${rank}: ${seconds(start)} – ${seconds(end)} · score ${Number(score).toFixed(3)}`;
    tip.hidden = false;
    tip.style.left = `${event.pageX + 12}px`;
    tip.style.top = `${event.pageY + 12}px`;
  };
  const off = () => {
    button.classList.remove("hot");
    band()?.classList.remove("hot");
    tip.hidden = true;
  };
  for (const target of [button, band()]) {
    if (!target) continue;
    target.addEventListener("mousemove", on);
    target.addEventListener("mouseleave", off);
  }
}

function play(start, end) {
  playing = { start, end };
  player.currentTime = start;
  const started = player.play();
  if (started) started.catch(() => {}); // a browser may refuse to start playing; the seek stays
}

player.addEventListener("timeupdate", () => {
  const t = player.currentTime;
  if (playing && (t >= playing.end || t < playing.start - 0.5)) {
    if (t >= playing.end && t < playing.end + 1) player.pause();
    playing = null;
  }
  for (const svg of document.querySelectorAll(".timeline")) {
    const at = (Math.min(t, svg.dataset.duration) / svg.dataset.duration) * W;
    const line = svg.querySelector(".playhead");
    line.setAttribute("x1", at);
    line.setAttribute("x2", at);
  }
});

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  $("file").value = ""; // choosing the same file again is a new upload
  if (file) upload(file);
});
$("use-sample").addEventListener("click", useSample);
$("ground").addEventListener("click", ground);
$("sentences").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("ground").disabled) ground();
});

(async () => {
  try {
    const health = await api("/api/health");
    $("model").textContent = `${health.model} · ${health.dataset} · ${health.backbone} (${health.pretrained}, k=${health.layers}) · ${health.fps} fps · ${health.device}`;
    const { samples } = await api("/api/samples");
    $("sample").replaceChildren(...samples.map(({ name }) => el("option", { value: name }, name)));
  } catch (err) {
    showError(err.message);
  }
})();
