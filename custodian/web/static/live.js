// Live values: every element with data-live="KEY" takes the value of KEY from the page's live values
// (the same URL with ?format=live: the JSON twin's "live" part), fetched twice a second. Without JavaScript the page still reads;
// it only stops refreshing.
"use strict";
(function () {
  const fields = document.querySelectorAll("[data-live]");
  if (fields.length === 0) return;
  const url = new URL(window.location.href);
  url.searchParams.set("format", "live");
  async function refresh() {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) return;
      const live = (await response.json()).live || {};
      for (const element of fields) {
        const value = live[element.dataset.live];
        if (value !== undefined && element.textContent !== value) element.textContent = value;
      }
      document.body.dataset.refreshed = String(Date.now());
    } catch (error) {
      // The custodian went away or the session ended; the next tick tries again.
    }
  }
  window.setInterval(refresh, 500);
})();
