// crackscan page: upload a photo to /scan, show the verdict, and redraw the probability map at any
// threshold in the browser from the map's values in the answer, without uploading again.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  drop: $("drop"), file: $("file"), patch: $("patch-size"), busy: $("busy"), busyText: $("busy-text"),
  error: $("error"), result: $("result"), verdict: $("verdict"), summary: $("summary"), canvas: $("overlay"),
  slider: $("threshold"), sliderValue: $("threshold-value"), regions: $("regions"), regionCount: $("region-count"),
  download: $("download"), serverThreshold: $("server-threshold"), timing: $("timing"), modelInfo: $("model-info"),
};

// The server's heat scale (crackscan.scan._RAMP): dark purple -> red -> yellow.
const RAMP = [[40, 11, 84], [120, 28, 109], [196, 55, 84], [240, 110, 40], [252, 190, 40], [252, 255, 164]];
let maxUpload = 30 * 1024 * 1024;
let current = null; // {scan, values: Float64Array rows*cols, rows, cols, photo: HTMLImageElement}

function heat(value) {
  const pos = Math.min(Math.max(value, 0), 1) * (RAMP.length - 1);
  const low = Math.min(Math.floor(pos), RAMP.length - 2);
  const f = pos - low;
  return RAMP[low].map((c, i) => Math.round(c * (1 - f) + RAMP[low + 1][i] * f));
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

// The spinner and, for screen readers, the drop zone's aria-busy: one state, set in one place.
function setBusy(text) {
  els.busy.hidden = !text;
  if (text) {
    els.busyText.textContent = text;
    els.drop.setAttribute("aria-busy", "true");
  } else {
    els.drop.removeAttribute("aria-busy");
  }
}

async function loadImage(src) {
  const image = new Image();
  image.src = src;
  await image.decode();
  return image;
}

async function describeModel() {
  try {
    const [health, model] = await Promise.all([fetch("/health"), fetch("/model")]);
    if (health.ok) maxUpload = (await health.json()).max_upload_bytes;
    if (model.ok) {
      const meta = await model.json();
      // Scans judge their maps at the model's scan threshold; older models have only the patch threshold.
      const scanThreshold = meta.scan_threshold ?? meta.threshold;
      els.modelInfo.textContent = `Model ${meta.file}: ${meta.architecture}, ${meta.input_size} px input, ` +
        `scan threshold ${Number(scanThreshold).toFixed(2)}.`;
      els.slider.value = scanThreshold;
    }
  } catch (err) {
    els.modelInfo.textContent = "The server did not answer; is crackscan serve running?";
  }
}

// Only the latest upload's answer is shown: a slow scan that ends after a newer one must not replace it,
// and the page stops waiting for it (the server still finishes it: one slot of its queue).
let latest = 0;
let lastFile = null;
let inFlight = null;
let rescanTimer = 0;

// Probabilities shown rounded down, as the server's overlay shows them: 0.999997 is not "1.00".
const down2 = (p) => (Math.floor(p * 100 + 1e-9) / 100).toFixed(2);

async function upload(file) {
  els.error.hidden = true;
  if (!file) return;
  lastFile = file;
  clearTimeout(rescanTimer);
  const mine = ++latest;
  if (inFlight) inFlight.abort();
  inFlight = null;
  if (file.size > maxUpload) {
    setBusy("");
    showError(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB is over the ` +
      `${(maxUpload / 1048576).toFixed(1)} MB upload limit.`);
    return;
  }
  const form = new FormData();
  form.append("photo", file, file.name);
  form.append("patch_size", els.patch.value || "227");
  els.result.hidden = true; // never show the last photo's verdict beside a new upload
  setBusy(`Scanning ${file.name}…`);
  try {
    inFlight = new AbortController();
    const response = await fetch("/scan", { method: "POST", body: form, signal: inFlight.signal });
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
    if (mine !== latest) return; // a newer upload has been sent since
    if (!response.ok) {
      let message = (body && typeof body.detail === "string") ? body.detail : `${response.status} ${response.statusText}`;
      const retry = response.headers.get("Retry-After");
      if (response.status === 503 && retry) message += ` (retry in about ${retry} s)`;
      showError(message);
      return;
    }
    await show(body, mine);
  } catch (err) {
    if (mine === latest) showError(`The upload failed: ${err.message || err}. Is the server still running?`);
  } finally {
    if (mine === latest) setBusy("");
  }
}

async function show(scan, mine) {
  const photo = await loadImage(scan.photo);
  if (mine !== latest) return;
  const [rows, cols] = scan.map_shape;
  // The exact probabilities (the map PNG in the answer holds them rounded to 1/255).
  const values = Float64Array.from(scan.probability.flat());
  current = { scan, values, rows, cols, photo };

  els.canvas.width = photo.naturalWidth;
  els.canvas.height = photo.naturalHeight;
  els.slider.value = scan.threshold;
  els.download.href = scan.overlay;
  els.download.download = `${scan.file.replace(/\.[^.]*$/, "")}.overlay.jpg`;
  els.serverThreshold.textContent = Number(scan.threshold).toFixed(2);
  els.timing.textContent = `${scan.photo_size[0]}×${scan.photo_size[1]} px, ${rows}×${cols} cells, ` +
    `scanned in ${Number(scan.seconds).toFixed(2)} s`;
  els.result.hidden = false;
  render();
  els.verdict.scrollIntoView({ block: "start", behavior: "smooth" });
}

// Flagged cells at threshold t, grouped into 8-connected regions, as the server groups them.
function assess(t) {
  const { values, rows, cols, scan } = current;
  const xs = scan.cell_edges.x, ys = scan.cell_edges.y;
  const area = scan.photo_size[0] * scan.photo_size[1];
  const flagged = (i) => values[i] >= t;
  const seen = new Uint8Array(rows * cols);
  const regions = [];
  let flaggedArea = 0;
  for (let start = 0; start < values.length; start++) {
    if (seen[start] || !flagged(start)) continue;
    const stack = [start];
    seen[start] = 1;
    let r0 = rows, r1 = -1, c0 = cols, c1 = -1, max = 0, sum = 0, cells = 0, cellArea = 0;
    while (stack.length) {
      const i = stack.pop();
      const r = Math.floor(i / cols), c = i % cols, p = values[i];
      r0 = Math.min(r0, r); r1 = Math.max(r1, r); c0 = Math.min(c0, c); c1 = Math.max(c1, c);
      max = Math.max(max, p); sum += p; cells++;
      cellArea += (xs[c + 1] - xs[c]) * (ys[r + 1] - ys[r]);
      for (let dr = -1; dr <= 1; dr++) {
        for (let dc = -1; dc <= 1; dc++) {
          const rr = r + dr, cc = c + dc, j = rr * cols + cc;
          if (rr < 0 || rr >= rows || cc < 0 || cc >= cols || seen[j] || !flagged(j)) continue;
          seen[j] = 1;
          stack.push(j);
        }
      }
    }
    flaggedArea += cellArea;
    regions.push({
      box: [xs[c0], ys[r0], xs[c1 + 1], ys[r1 + 1]].map(Math.round),
      max_probability: max, mean_probability: sum / cells, cells, area_fraction: cellArea / area,
    });
  }
  regions.sort((a, b) => b.max_probability - a.max_probability || b.cells - a.cells);
  return { regions, flagged_fraction: flaggedArea / area, is_crack: regions.length > 0 };
}

function render() {
  if (!current) return;
  const { scan, values, rows, cols, photo } = current;
  const shown = Number(els.slider.value);
  els.sliderValue.textContent = shown.toFixed(2);
  // The slider moves in steps; on the step nearest the server's threshold (a scan threshold such as 0.7099
  // lies between two) judge at that threshold itself and show the server's figures; elsewhere recompute.
  const step = Number(els.slider.step) || 0.01;
  const atServer = Math.abs(shown - scan.threshold) <= step / 2 + 1e-9;
  const t = atServer ? scan.threshold : shown;
  const judged = atServer ? scan : assess(t);
  const max = scan.max_probability;

  const ctx = els.canvas.getContext("2d");
  const w = els.canvas.width, h = els.canvas.height;
  const fx = w / scan.photo_size[0], fy = h / scan.photo_size[1];
  const xs = scan.cell_edges.x.map((v) => Math.round(v * fx));
  const ys = scan.cell_edges.y.map((v) => Math.round(v * fy));
  ctx.drawImage(photo, 0, 0, w, h);
  ctx.globalAlpha = 0.5;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const p = values[r * cols + c];
      if (p < t) continue;
      const [red, green, blue] = heat(p);
      ctx.fillStyle = `rgb(${red},${green},${blue})`;
      ctx.fillRect(xs[c], ys[r], xs[c + 1] - xs[c], ys[r + 1] - ys[r]);
    }
  }
  ctx.globalAlpha = 1;
  ctx.strokeStyle = "rgb(255,32,32)";
  ctx.lineWidth = Math.max(2, Math.round(Math.max(w, h) / 400));
  for (const region of judged.regions) {
    const [x0, y0, x1, y1] = region.box;
    ctx.strokeRect(x0 * fx, y0 * fy, (x1 - x0) * fx, (y1 - y0) * fy);
  }

  const n = judged.regions.length;
  els.verdict.textContent = judged.is_crack ? "CRACK" : "NO CRACK";
  els.verdict.className = judged.is_crack ? "crack" : "clear";
  els.summary.textContent = judged.is_crack
    ? `${n} region${n === 1 ? "" : "s"} flagged, ${(100 * judged.flagged_fraction).toFixed(1)}% of the photo; ` +
      `highest crack probability ${down2(max)}.`
    : `No area reaches ${t.toFixed(2)} (highest crack probability ${down2(max)}).`;
  els.regionCount.textContent = `(${n})`;
  els.regions.replaceChildren(...judged.regions.map((region) => {
    const li = document.createElement("li");
    const [x0, y0, x1, y1] = region.box;
    li.textContent = `max ${down2(region.max_probability)}, mean ${down2(region.mean_probability)}, ` +
      `${(100 * region.area_fraction).toFixed(1)}% of the photo, box ${x0},${y0} – ${x1},${y1}`;
    return li;
  }));
}

els.file.addEventListener("change", () => {
  const file = els.file.files[0];
  els.file.value = ""; // so that choosing the same file again (after changing the patch size) scans it again
  upload(file);
});
// A new patch size scans the last photo again, once the field has stayed the same for a moment (each step of
// its arrows is a change).
els.patch.addEventListener("change", () => {
  clearTimeout(rescanTimer);
  if (lastFile) rescanTimer = setTimeout(() => upload(lastFile), 600);
});
els.slider.addEventListener("input", render);
for (const type of ["dragenter", "dragover"]) {
  els.drop.addEventListener(type, (event) => { event.preventDefault(); els.drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  els.drop.addEventListener(type, () => els.drop.classList.remove("over"));
}
els.drop.addEventListener("drop", (event) => {
  event.preventDefault();
  upload(event.dataTransfer.files[0]);
});
// A photo dropped beside the zone must not make the browser navigate away from the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());
describeModel();
