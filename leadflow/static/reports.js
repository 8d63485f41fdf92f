// The reports page: /api/v1/reports/funnel for a period and one or two dimensions, as a table and
// a funnel chart (the vendored Chart.js), and the same report as CSV. Every value from the server
// is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "leadflow.ops-token"; // the ops dashboard's: one login for both pages
const FUNNEL_STEPS = ["events", "leads", "queued", "assigned", "contacted", "converted"];
const AGENT_STEPS = ["assignments", "attempts", "contacted", "converted"];
let token = sessionStorage.getItem(TOKEN_KEY);
let chart = null;

// Dates are days of the call center (allocation.default_timezone), not of this browser: the
// first report is the server's default period, and the pickers show its days.
function query() {
  const by = [$("by").value, $("then").value].filter((v, i, all) => v && all.indexOf(v) === i);
  const params = new URLSearchParams({ by: by.join(",") });
  if ($("from").value) params.set("from", $("from").value);
  if ($("to").value) params.set("to", $("to").value);
  return params;
}

async function api(path, accept = "application/json") {
  const response = await fetch(path, { headers: { "Authorization": `Bearer ${token}`, "Accept": accept } });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    const error = new Error((data.error && data.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return response;
}

function show(column, value) {
  if (value === null || value === undefined) return "–";
  switch (column.kind) {
    case "rate": return `${(100 * value).toFixed(1)}%`;
    case "ratio": return value.toFixed(2);
    case "seconds": return seconds(value);
    case "hours": return value.toFixed(1);
    default: return String(value);
  }
}

function seconds(value) {
  if (value < 60) return `${value.toFixed(1)} s`;
  if (value < 3600) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

function cells(row, columns, item) {
  for (const column of columns) {
    const cell = row.insertCell();
    const value = item[column.name];
    cell.textContent = column.kind === "dimension" ? (value ?? "(none)") : show(column, value);
    cell.dataset.column = column.name;
    if (column.kind !== "dimension" && value !== null && value !== undefined) cell.dataset.value = String(value);
    if (column.kind !== "dimension") cell.className = "num";
  }
}

function render(report) {
  const columns = report.columns;
  const head = $("report-head");
  head.replaceChildren();
  for (const column of columns) {
    const th = document.createElement("th");
    th.textContent = column.label;
    th.title = column.name;
    head.appendChild(th);
  }
  const body = $("report-body");
  body.replaceChildren();
  for (const item of report.rows) cells(body.insertRow(), columns, item);
  const total = $("report-total");
  total.replaceChildren();
  const totalItem = { ...report.total };
  for (const name of report.by) totalItem[name] = null;
  cells(total, columns, totalItem);
  total.cells[0].textContent = "total";

  const agents = report.report === "agents";
  $("table-title").textContent = agents
    ? `Agents' work by ${report.by.join(" and ")}`
    : `Funnel by ${report.by.join(" and ")}`;
  $("rule").textContent = agents
    ? "Assignments made in the period, followed until now; available hours within the period."
    : "Leads created in the period, followed until now; rejects by when they were rejected.";
  $("as-of").textContent = `as of ${new Date(report.as_of).toLocaleString()}`;

  const steps = agents ? AGENT_STEPS : FUNNEL_STEPS;
  const labels = steps.map((name) => columns.find((c) => c.name === name).label);
  const values = steps.map((name) => report.total[name]);
  $("chart-title").textContent = agents ? "Assignments of the period" : "Funnel (all leads of the period)";
  if (!chart) {
    chart = new Chart($("c-funnel"), {
      type: "bar",
      data: { labels: [], datasets: [] },
      options: { indexAxis: "y", animation: false, responsive: true, maintainAspectRatio: false,
        plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true } } },
    });
  }
  chart.data.labels = labels;
  chart.data.datasets = [{ label: "total", data: values, backgroundColor: "#2463eb" }];
  chart.update();
  $("c-funnel").dataset.labels = JSON.stringify(steps);
  $("c-funnel").dataset.values = JSON.stringify(values);
}

async function load() {
  $("report-error").textContent = "";
  try {
    const response = await api(`/api/v1/reports/funnel?${query()}`);
    const report = await response.json();
    $("from").value = report.from.slice(0, 10);
    $("to").value = report.to.slice(0, 10);
    render(report);
    $("board").dataset.loaded = query().toString();
  } catch (error) {
    if (error.status === 401 || error.status === 403) return logout(error.message);
    $("report-error").textContent = error.message;
  }
}

async function download() {
  $("report-error").textContent = "";
  try {
    const params = query();
    params.set("format", "csv");
    const response = await api(`/api/v1/reports/funnel?${params}`, "text/csv");
    const disposition = response.headers.get("content-disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = match ? match[1] : "report.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  } catch (error) {
    if (error.status === 401 || error.status === 403) return logout(error.message);
    $("report-error").textContent = error.message;
  }
}

async function login(candidate) {
  token = candidate;
  try {
    await api("/api/v1/me");
    await api("/api/v1/queues"); // a route for supervisors and ops: agents are refused here
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").classList.add("hidden");
    $("board").classList.remove("hidden");
    $("logout").classList.remove("hidden");
    await load();
  } catch (error) {
    logout(error.message);
  }
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  $("board").classList.add("hidden");
  $("logout").classList.add("hidden");
  $("login").classList.remove("hidden");
  $("login-error").textContent = message || "";
}

$("pickers").addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
$("csv").addEventListener("click", download);
$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  login($("token").value.trim());
});
$("logout").addEventListener("click", () => logout());
const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromLink) history.replaceState(null, "", location.pathname);
if (fromLink || token) login(fromLink || token);
