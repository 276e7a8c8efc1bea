// omnidaemon dashboard: the live parts of its pages. Pages are whole without this script;
// it only keeps them current. No library: fetch, EventSource and the DOM.
"use strict";

// An element with data-live="/ui/live/..." is replaced, every data-every ms, by what that
// URL serves (a fragment of the same page). Paused while the tab is hidden; a 401 means the
// sign-in ended, so the page reloads into the sign-in form.
function followLive(element) {
  const url = element.dataset.live;
  const every = Number(element.dataset.every || 2000);
  let timer = null;
  async function refresh() {
    timer = null;
    if (document.hidden) return;
    try {
      const response = await fetch(url, {
        headers: { "X-Omnidaemon-Fragment": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.status === 401) { window.location.reload(); return; }
      // Gone (a run's trace expired while its page was open): nothing more will come.
      if (response.status === 404) return;
      if (response.ok) {
        const html = await response.text();
        // Keep keyboard focus where it was when the part holding it is replaced.
        const focused = document.activeElement && document.activeElement.id;
        element.innerHTML = html;
        if (focused) { const again = document.getElementById(focused); if (again) again.focus(); }
        element.dispatchEvent(new CustomEvent("omnidaemon:updated", { bubbles: true }));
        if (element.dataset.stopWhen && element.querySelector(element.dataset.stopWhen)) return;
      }
    } catch (error) {
      // The server is restarting or the network dropped: try again at the next tick.
    }
    schedule();
  }
  function schedule() { if (timer === null) timer = window.setTimeout(refresh, every); }
  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(); });
  schedule();
}

// An element with data-stream="/ui/events/<id>/stream" shows an event's streamed output as
// it comes (Server-Sent Events, as GET /v1/events/<id>/stream sends them): chunks
// ({agent, attempt, index, data}) are appended to its [data-chunks] child; a restart (a retry
// began) clears them; the end ({status, result | error}) says how the event ended and closes
// the stream. After a `timeout` event the server closes the stream and the browser
// reconnects by itself with Last-Event-ID, so nothing is lost or shown twice.
function followStream(element) {
  const chunks = element.querySelector("[data-chunks]");
  const state = element.querySelector("[data-stream-state]");
  const source = new EventSource(element.dataset.stream);
  let received = false;
  let ended = false;
  const say = (text) => { if (state) state.textContent = text; };
  const read = (event) => { received = true; return JSON.parse(event.data); };
  say("waiting for output…");
  source.addEventListener("chunk", (event) => {
    const data = read(event);
    const text = typeof data.data === "string" ? data.data : JSON.stringify(data.data);
    chunks.append(document.createTextNode(text));
    say(`streaming (attempt ${data.attempt})…`);
  });
  source.addEventListener("restart", (event) => {
    const data = read(event);
    chunks.textContent = "";
    const why = data.error && data.error.message ? ` after ${data.error.message}` : "";
    say(`attempt ${data.attempt} ended${why}: a retry streams anew…`);
  });
  source.addEventListener("truncated", (event) => {
    read(event);
    say("output truncated (too long to keep)");
  });
  source.addEventListener("timeout", () => say("nothing new for a while: still waiting…"));
  source.addEventListener("end", (event) => {
    const data = read(event);
    ended = true;
    const error = data.error ? ` (${data.error.type || "error"}: ${data.error.message || ""})` : "";
    say(`ended: ${String(data.status).replace("_", " ")}${error}`);
    element.dataset.ended = data.status;
    source.close();
  });
  source.onerror = () => {
    if (ended) return;
    if (source.readyState === EventSource.CONNECTING) { say("reconnecting…"); return; }
    // Closed for good: a 404 (nothing streamed in time), a 204 (resumed after the end) or a
    // 401 (the sign-in ended).
    say(received
      ? "stream closed: reload the page to follow it again"
      : "no streamed output: the event is not handled yet, its agent does not stream, or " +
        "the output expired (reload the page to look again)");
  };
}

// Forms with data-confirm ask before they post (the server asks again for a purge).
function confirmForms() {
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
}

// A checkbox with data-select-all ticks every checkbox named by its value.
function selectAll() {
  document.querySelectorAll("input[data-select-all]").forEach((box) => {
    box.addEventListener("change", () => {
      document.querySelectorAll(`input[name="${box.dataset.selectAll}"]`).forEach((other) => {
        other.checked = box.checked;
      });
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(followLive);
  document.querySelectorAll("[data-stream]").forEach(followStream);
  confirmForms();
  selectAll();
});
