// Tiny line charts on canvases: train and eval loss over steps, and below it tokens/s and peak memory,
// live from the run's SSE stream, with a running export's step and percent. No dependencies, so the studio
// works offline and ships with the package.
(function () {
  const canvas = document.getElementById("chart");
  if (!canvas) return;
  const ctx = canvas.getContext("2d");
  const series = { loss: [], eval_loss: [] };
  const colors = { loss: "#1f77b4", eval_loss: "#d62728" };
  const logBox = document.getElementById("logscale");
  // x by optimizer step, or by tokens trained (metrics.jsonl's cumulative `tokens`, kept across resumes).
  const axis = document.getElementById("xaxis");
  const byTokens = () => axis && axis.value === "tokens";
  const xOf = (p) => (byTokens() ? p[2] : p[0]);
  const shown = (pts) => pts.filter((p) => xOf(p) !== undefined);
  const xLabel = (x) => (byTokens() ? x.toLocaleString("en-US") + " tokens" : "step " + x);
  const count = document.getElementById("points");
  const status = document.getElementById("status");
  const progress = document.getElementById("progress");
  const speedCanvas = document.getElementById("speed-chart");
  const speedText = document.getElementById("speed");
  const memoryText = document.getElementById("memory");
  // The same formats as the server's first render (app.py: speed, memory).
  const fmt = {
    tokens_per_s: (v) => v.toFixed(1) + " tokens/s",
    memory_bytes: (v) => (v / 2 ** 30).toFixed(2) + " GiB",
  };
  const usage = { tokens_per_s: [], memory_bytes: [] };
  const etaText = document.getElementById("eta");
  const timed = []; // [step, time logged] of rows that carry their time

  // Time left while the training job runs: the steps still to go at the pace of this job's rows so far
  // (rows logged since it started; evaluations and saves included), else of the last ten rows.
  function showEta() {
    if (!etaText) return;
    const started = Number(canvas.dataset.started || 0);
    const max = Number(canvas.dataset.maxSteps || 0);
    const rows = started ? timed.filter((r) => r[1] >= started) : timed.slice(-10);
    etaText.textContent = "";
    if (!started || !max || rows.length < 2) return;
    const [s0, t0] = rows[0], [s1, t1] = rows[rows.length - 1];
    if (s1 <= s0 || s1 >= max) return;
    const left = Math.round(((max - s1) * (t1 - t0)) / (s1 - s0));
    const m = Math.floor(left / 60), s = left % 60;
    etaText.textContent = " · about " + (m ? m + " min " : "") + s + " s left";
  }
  const usageColors = { tokens_per_s: "#2ca02c", memory_bytes: "#9467bd" };

  // Tokens/s and memory share the x axis; each has its own scale, tokens/s labelled left, memory right.
  function drawUsage() {
    if (!speedCanvas) return;
    const c = speedCanvas.getContext("2d");
    const W = speedCanvas.width, H = speedCanvas.height, pad = 40;
    c.clearRect(0, 0, W, H);
    const all = shown(usage.tokens_per_s.concat(usage.memory_bytes));
    speedCanvas.dataset.points = String(all.length);
    if (all.length === 0) return;
    let x0 = Math.min(...all.map(xOf)), x1 = Math.max(...all.map(xOf));
    if (x1 === x0) x1 = x0 + 1;
    const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
    c.strokeStyle = "#999"; c.strokeRect(pad, 10, W - 2 * pad, H - 10 - pad / 2);
    c.font = "11px sans-serif";
    for (const name of ["tokens_per_s", "memory_bytes"]) {
      const pts = shown(usage[name]);
      if (pts.length === 0) continue;
      let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
      if (y1 === y0) { y0 = y0 * 0.9; y1 = y1 * 1.1 || 1; }
      const sy = (y) => H - pad / 2 - ((y - y0) / (y1 - y0)) * (H - 10 - pad / 2);
      const left = name === "tokens_per_s";
      c.strokeStyle = usageColors[name]; c.fillStyle = usageColors[name]; c.beginPath();
      pts.forEach((p, i) => (i ? c.lineTo(sx(xOf(p)), sy(p[1])) : c.moveTo(sx(xOf(p)), sy(p[1]))));
      c.stroke();
      c.fillText(fmt[name](y1).split(" ")[0], left ? 2 : W - pad + 2, 18);
      c.fillText(fmt[name](y0).split(" ")[0], left ? 2 : W - pad + 2, H - pad / 2);
    }
  }

  function draw() {
    const W = canvas.width, H = canvas.height, pad = 40;
    ctx.clearRect(0, 0, W, H);
    const log = logBox && logBox.checked;
    const f = (v) => (log ? Math.log10(Math.max(v, 1e-12)) : v);
    const all = shown(series.loss.concat(series.eval_loss));
    if (count) count.textContent = String(all.length);
    canvas.dataset.points = String(all.length);
    canvas.dataset.axis = byTokens() ? "tokens" : "step";
    if (all.length === 0) return;
    let x0 = Math.min(...all.map(xOf)), x1 = Math.max(...all.map(xOf));
    let y0 = Math.min(...all.map((p) => f(p[1]))), y1 = Math.max(...all.map((p) => f(p[1])));
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
    const sy = (y) => H - pad - ((f(y) - y0) / (y1 - y0)) * (H - 2 * pad);
    ctx.strokeStyle = "#999"; ctx.strokeRect(pad, pad, W - 2 * pad, H - 2 * pad);
    ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
    ctx.fillText((log ? 10 ** y1 : y1).toPrecision(3), 2, pad + 4);
    ctx.fillText((log ? 10 ** y0 : y0).toPrecision(3), 2, H - pad);
    ctx.fillText(xLabel(x0), pad, H - pad + 14);
    ctx.textAlign = "right";
    ctx.fillText(xLabel(x1), W - pad, H - pad + 14);
    ctx.textAlign = "left";
    for (const name of ["loss", "eval_loss"]) {
      const pts = shown(series[name]);
      ctx.strokeStyle = colors[name]; ctx.fillStyle = colors[name]; ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(sx(xOf(p)), sy(p[1])) : ctx.moveTo(sx(xOf(p)), sy(p[1]))));
      ctx.stroke();
      pts.forEach((p) => ctx.fillRect(sx(xOf(p)) - 2, sy(p[1]) - 2, 4, 4));
    }
  }

  if (logBox) logBox.addEventListener("change", draw);
  if (axis) axis.addEventListener("change", () => { draw(); drawUsage(); });
  const source = new EventSource(canvas.dataset.events);
  source.addEventListener("reset", () => {
    series.loss = []; series.eval_loss = []; usage.tokens_per_s = []; usage.memory_bytes = []; timed.length = 0;
    draw(); drawUsage();
  });
  source.onmessage = (event) => {
    const row = JSON.parse(event.data);
    for (const name of ["loss", "eval_loss"]) if (name in row) series[name].push([row.step, row[name], row.tokens]);
    for (const name of ["tokens_per_s", "memory_bytes"]) if (name in row) usage[name].push([row.step, row[name], row.tokens]);
    if ("tokens_per_s" in row && speedText) speedText.textContent = fmt.tokens_per_s(row.tokens_per_s);
    if ("memory_bytes" in row && memoryText) memoryText.textContent = fmt.memory_bytes(row.memory_bytes);
    if (progress && canvas.dataset.maxSteps) progress.textContent = row.step + " / " + canvas.dataset.maxSteps;
    if ("time" in row) timed.push([row.step, row.time]);
    showEta();
    draw(); drawUsage();
  };
  // The page was rendered for one job state; when the job moves on (running, stopped, done), render it
  // again so the buttons, log and checkpoints match the real job.
  source.addEventListener("status", (event) => {
    if (status && status.textContent !== event.data) location.reload();
  });
  // Likewise when one of the run's jobs (an evaluation, a merge, an export) is queued, starts or ends.
  source.addEventListener("jobs", (event) => {
    if (canvas.dataset.jobs !== undefined && canvas.dataset.jobs !== event.data) location.reload();
  });
  // A running export's step and percent (the studio reads them from its log as the lines arrive).
  source.addEventListener("progress", (event) => {
    for (const [id, [step, percent]] of Object.entries(JSON.parse(event.data))) {
      const bar = document.getElementById("progress-" + id);
      const text = document.getElementById("step-" + id);
      if (!bar || !text) continue;
      if (percent === null) bar.removeAttribute("value");
      else bar.value = percent;
      text.textContent = percent === null ? step : step + " · " + percent + "%";
    }
  });
  draw(); drawUsage();
})();
