// The agent workbench: my open leads through the API, refreshed every second.
// Every value from the server is written with textContent, never as HTML.
"use strict";

const REFRESH_MS = 1000;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("leadflow.token");
let leads = [];
let openId = null;
let timer = null;

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new ApiError(response.status, error.code || "error", error.message || response.statusText);
  }
  return data;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

function slaText(deadline, contacted) {
  if (contacted) return ["contacted", "sla-ok"];
  if (!deadline) return ["–", ""];
  const seconds = Math.round((new Date(deadline) - Date.now()) / 1000);
  const abs = Math.abs(seconds);
  const text = `${Math.floor(abs / 60)}:${String(abs % 60).padStart(2, "0")}`;
  if (seconds < 0) return [`${text} late`, "sla-late"];
  return [`${text} left`, seconds < 60 ? "sla-soon" : "sla-ok"];
}

function render() {
  const body = $("leads");
  body.replaceChildren();
  for (const lead of leads) {
    const row = body.insertRow();
    row.dataset.id = lead.id;
    if (lead.id === openId) row.className = "selected";
    cell(row, String(lead.priority));
    cell(row, lead.customer_name || "(no name)");
    cell(row, lead.id === openId && $("d-phone").textContent ? $("d-phone").textContent : lead.phone_masked);
    cell(row, `${lead.business_line} · ${lead.segment}`);
    cell(row, lead.reason, "muted");
    const [sla, slaClass] = slaText(lead.sla_deadline, lead.first_contact_at);
    cell(row, sla, slaClass).dataset.sla = "1";
    const button = document.createElement("button");
    button.textContent = "open";
    button.addEventListener("click", () => openLead(lead.id));
    row.insertCell().append(button);
  }
  $("count").textContent = String(leads.length);
  $("empty").classList.toggle("hidden", leads.length > 0);
  const current = leads.find((l) => l.id === openId);
  if (openId && current) {
    const [sla, slaClass] = slaText(current.sla_deadline, current.first_contact_at);
    $("d-sla").textContent = sla;
    $("d-sla").className = slaClass;
  }
}

async function refresh() {
  try {
    leads = await api("GET", "/api/v1/me/assignments");
    if (openId && !leads.some((l) => l.id === openId)) closeDetail();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    render();
  } catch (error) {
    if (error.status === 401) return logout("your token is no longer valid");
    $("updated").textContent = `cannot refresh: ${error.message}`;
  }
}

function closeDetail() {
  openId = null;
  $("detail").classList.add("hidden");
  $("d-phone").textContent = "";
}

async function openLead(id) {
  $("act-error").textContent = "";
  try {
    const lead = await api("GET", `/api/v1/assignments/${encodeURIComponent(id)}`);
    openId = id;
    $("d-lead").textContent = `#${lead.lead_id}`;
    $("d-name").textContent = lead.customer_name || "(no name)";
    $("d-phone").textContent = lead.phone;
    $("d-line").textContent = `${lead.business_line} · ${lead.segment}`;
    $("d-reason").textContent = lead.reason;
    const events = $("d-events");
    events.replaceChildren();
    for (const e of lead.events) {
      const row = events.insertRow();
      cell(row, new Date(e.occurred_at).toLocaleString());
      cell(row, `${e.source} · ${e.event_type}`);
      cell(row, e.intake, "muted");
    }
    const history = $("d-history");
    history.replaceChildren();
    for (const h of lead.history) {
      const row = history.insertRow();
      cell(row, new Date(h.at).toLocaleString());
      cell(row, `${h.from_state || "–"} → ${h.to_state}`);
      cell(row, h.reason, "muted");
    }
    $("detail").classList.remove("hidden");
    render();
  } catch (error) {
    $("act-error").textContent = error.message;
    await refresh();
  }
}

async function act(path, body) {
  if (!openId) return;
  $("act-error").textContent = "";
  try {
    await api("POST", `/api/v1/assignments/${encodeURIComponent(openId)}/${path}`, body);
    if (path !== "contact") closeDetail();
  } catch (error) {
    $("act-error").textContent = error.message;
  }
  await refresh();
}

function note() {
  const text = $("note").value.trim();
  $("note").value = "";
  return text || null;
}

async function login(candidate) {
  token = candidate;
  try {
    const me = await api("GET", "/api/v1/me");
    if (me.role !== "agent") throw new ApiError(403, "forbidden", "this page is for agents' tokens");
    sessionStorage.setItem("leadflow.token", token);
    $("who").textContent = me.name ? `${me.name} (${me.agent_id})` : me.agent_id;
    $("status").value = me.status || "offline";
    for (const id of ["who", "status-box", "logout", "work"]) $(id).classList.remove("hidden");
    $("login").classList.add("hidden");
    await refresh();
    timer = setInterval(refresh, REFRESH_MS);
  } catch (error) {
    logout(error.message);
  }
}

function logout(message) {
  sessionStorage.removeItem("leadflow.token");
  token = null;
  clearInterval(timer);
  closeDetail();
  for (const id of ["who", "status-box", "logout", "work"]) $(id).classList.add("hidden");
  $("login").classList.remove("hidden");
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  login($("token").value.trim());
});
$("logout").addEventListener("click", () => logout());
$("status").addEventListener("change", async () => {
  try {
    await api("POST", "/api/v1/me/status", { status: $("status").value });
  } catch (error) {
    $("updated").textContent = error.message;
  }
});
$("act-contact").addEventListener("click", () => act("contact"));
for (const button of document.querySelectorAll("button[data-outcome]")) {
  button.addEventListener("click", () => act("disposition", { outcome: button.dataset.outcome, note: note() }));
}
$("act-callback").addEventListener("click", () => {
  const local = $("callback-at").value;
  if (!local) { $("act-error").textContent = "pick when to call back"; return; }
  act("disposition", { outcome: "callback", callback_at: new Date(local).toISOString(), note: note() });
});
$("act-reject").addEventListener("click", () => {
  const reason = $("reject-reason").value.trim();
  if (!reason) { $("act-error").textContent = "say why you hand it back"; return; }
  $("reject-reason").value = "";
  act("reject", { reason });
});
// The SLA countdown ticks between refreshes.
setInterval(render, 1000);

const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromLink) history.replaceState(null, "", location.pathname);
if (fromLink || token) login(fromLink || token);
