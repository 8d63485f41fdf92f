// The live ops dashboard: /api/v1/pipeline every two seconds, drawn with the vendored Chart.js.
// Every value from the server is written with textContent, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);
const COLORS = ["#2463eb", "#12805c", "#b54708", "#c01048", "#7a5af8", "#0e9384", "#667085", "#dd2590"];
let token = sessionStorage.getItem("leadflow.ops-token");
let timer = null;
const charts = {};

async function api(path) {
  const response = await fetch(path, { headers: { "Authorization": `Bearer ${token}` } });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function chart(id, type, options = {}) {
  if (!charts[id]) {
    charts[id] = new Chart($(id), {
      type,
      data: { labels: [], datasets: [] },
      options: { animation: false, responsive: true, maintainAspectRatio: false, ...options },
    });
  }
  return charts[id];
}

function draw(id, type, labels, datasets, options) {
  const c = chart(id, type, options);
  c.data.labels = labels;
  c.data.datasets = datasets.map((d, i) => ({
    backgroundColor: d.colors || COLORS[i % COLORS.length],
    borderColor: COLORS[i % COLORS.length],
    ...d,
  }));
  c.update();
  $(id).dataset.values = JSON.stringify(datasets.map((d) => d.data));
}

function rows(id, items, columns) {
  const body = $(id);
  body.replaceChildren();
  for (const item of items) {
    const row = body.insertRow();
    for (const value of columns(item)) row.insertCell().textContent = value ?? "";
  }
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function time(iso) { return iso ? new Date(iso).toLocaleTimeString() : "–"; }

function render(p) {
  $("window").textContent = String(p.window_minutes);
  const events = Object.values(p.intake.events_in_window).reduce((a, b) => a + b, 0);
  $("f-events").textContent = String(events);
  $("f-waiting").textContent = String(p.queues.reduce((a, q) => a + q.waiting, 0));
  $("f-open").textContent = String(p.queues.reduce((a, q) => a + q.open, 0));
  $("f-breached").textContent = String(p.sla.open_breached);
  $("f-expired").textContent = String(p.sla.expired_in_window);
  const s = p.speed_to_lead;
  $("f-speed").textContent = `${age(s.assign_p50_seconds)} / ${age(s.assign_p90_seconds)}`;
  $("f-contact").textContent = age(s.contact_p50_seconds);
  $("f-agents").textContent = String(p.agents.available.agents);
  const lag = p.intake.consumer_lag;
  $("f-lag").textContent = lag.total === null ? "unknown" : String(lag.total);
  $("f-lag").title = lag.error || "";

  const labels = p.intake.minutes.map((m) => new Date(m).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  draw("c-intake", "bar", labels,
    Object.entries(p.intake.events_per_minute).map(([intake, data]) => ({ label: intake, data })),
    { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } });

  const mix = p.classification.slice(0, 12);
  draw("c-mix", "bar", mix.map((m) => `${m.business_line} · ${m.segment}`),
    [{ label: "leads", data: mix.map((m) => m.leads) }],
    { indexAxis: "y", plugins: { legend: { display: false } } });

  const statuses = Object.keys(p.agents);
  draw("c-agents", "bar", statuses, [
    { label: "agents", data: statuses.map((k) => p.agents[k].agents) },
    { label: "open assignments", data: statuses.map((k) => p.agents[k].open) },
    { label: "capacity", data: statuses.map((k) => p.agents[k].capacity) },
  ]);

  const rejects = Object.entries(p.stream.dlq_by_code).map(([code, count]) => [`DLQ: ${code}`, count]);
  for (const [intake, codes] of Object.entries(p.intake.rejects_in_window)) {
    for (const [code, count] of Object.entries(codes)) rejects.push([`${intake}: ${code}`, count]);
  }
  draw("c-rejects", "bar", rejects.map((r) => r[0]), [{ label: "rejects", data: rejects.map((r) => r[1]) }],
    { plugins: { legend: { display: false } } });

  rows("queues", p.queues, (q) => [q.queue, q.waiting, q.due, age(q.oldest_seconds), q.open, q.sla_breached]);
  rows("pollers", p.pollers, (x) => [x.name, time(x.last_run_at), x.state,
    x.last_rows, x.watermark, x.consecutive_failures, x.last_error || ""]);
  rows("extracts", p.extracts, (e) => {
    const done = e.rows_loaded + e.rows_merged + e.rows_rejected;
    const share = e.rows_total ? `${Math.round((100 * done) / e.rows_total)}%` : "–";
    return [e.id, e.table_name, e.state, `${done} / ${e.rows_total} (${share})`,
      `${e.rows_loaded} / ${e.rows_merged} / ${e.rows_rejected}`];
  });
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  try {
    render(await api("/api/v1/pipeline"));
  } catch (error) {
    if (error.status === 401 || error.status === 403) return logout(error.message);
    $("updated").textContent = `cannot refresh: ${error.message}`;
  }
}

async function login(candidate) {
  token = candidate;
  try {
    render(await api("/api/v1/pipeline"));
    sessionStorage.setItem("leadflow.ops-token", token);
    $("login").classList.add("hidden");
    $("board").classList.remove("hidden");
    $("logout").classList.remove("hidden");
    timer = setInterval(refresh, REFRESH_MS);
  } catch (error) {
    logout(error.message);
  }
}

function logout(message) {
  sessionStorage.removeItem("leadflow.ops-token");
  token = null;
  clearInterval(timer);
  $("board").classList.add("hidden");
  $("logout").classList.add("hidden");
  $("login").classList.remove("hidden");
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  login($("token").value.trim());
});
$("logout").addEventListener("click", () => logout());
const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromLink) history.replaceState(null, "", location.pathname);
if (fromLink || token) login(fromLink || token);
