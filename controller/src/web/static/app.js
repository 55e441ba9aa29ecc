// Canopy web console: live tables (server-sent events) and copy buttons. Served from the
// controller itself ('self' under the Content-Security-Policy); nothing inline, no CDN.
"use strict";

for (const el of document.querySelectorAll("[data-live]")) {
  const url = el.dataset.live;
  const events = new EventSource(url + "/events");
  let busy = false;
  events.addEventListener("changed", async () => {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      if (r.ok) el.innerHTML = await r.text(); // server-rendered, every value escaped there
    } finally {
      busy = false;
    }
  });
}

for (const b of document.querySelectorAll("button[data-copy]")) {
  b.addEventListener("click", async () => {
    const text = document.getElementById(b.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      b.textContent = "Copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents(document.getElementById(b.dataset.copy));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      b.textContent = "Selected: press Ctrl+C";
    }
  });
}
