// dbprov's web page: keeps lists and statuses current, and copies connection URIs.
// Plain script, no dependencies; the page works without it, only less live.
(function () {
  "use strict";

  var BUSY_EVERY = 1500;   // ms between polls while something is changing
  var IDLE_EVERY = 10000;  // ... and while nothing is
  var RETRY_EVERY = 5000;  // ... after a failed poll

  function meta(name) {
    var element = document.querySelector('meta[name="' + name + '"]');
    return element ? element.getAttribute("content") : "";
  }

  var csrf = meta("csrf-token");

  function get(url, accept) {
    return fetch(url, {
      headers: { "Accept": accept, "X-CSRF-Token": csrf },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      if (response.status === 401) {
        window.location.assign(meta("signin-url"));
        throw new Error("signed out");
      }
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      return response;
    });
  }

  function announce(text) {
    var region = document.getElementById("announce");
    if (region) {
      region.textContent = text;
    }
  }

  // Poll with fn, which resolves to the next delay; paused while the tab is hidden.
  function poll(fn, first) {
    var timer = null;
    function run() {
      timer = null;
      if (document.hidden) {
        return;
      }
      fn().then(schedule, function () { schedule(RETRY_EVERY); });
    }
    function schedule(delay) {
      if (timer === null) {
        timer = window.setTimeout(run, delay);
      }
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && timer === null) {
        run();
      }
    });
    schedule(first);
  }

  // The databases list: rows are fetched again and changed in place, so that
  // keyboard focus and the reading position stay where they are.
  function followRows(tbody) {
    function ids(rows) {
      return Array.prototype.map.call(rows, function (row) { return row.getAttribute("data-id") || ""; }).join(",");
    }
    function label(row) {
      var link = row.querySelector("th a");
      return link ? link.textContent : "A database";
    }
    function refresh() {
      return get(tbody.getAttribute("data-poll"), "text/html").then(function (response) {
        return response.text();
      }).then(function (html) {
        var template = document.createElement("template");
        template.innerHTML = html;
        var fresh = template.content.querySelectorAll("tr");
        if (ids(fresh) !== ids(tbody.rows)) {
          tbody.replaceChildren(template.content);
        } else {
          Array.prototype.forEach.call(fresh, function (row, index) {
            var current = tbody.rows[index];
            if (row.hasAttribute("data-busy")) {
              current.setAttribute("data-busy", "");
            } else {
              current.removeAttribute("data-busy");
            }
            row.querySelectorAll("[data-field]").forEach(function (cell) {
              var old = current.querySelector('[data-field="' + cell.getAttribute("data-field") + '"]');
              if (old && old.innerHTML !== cell.innerHTML) {
                if (cell.getAttribute("data-field") === "status") {
                  announce(label(current) + ": " + cell.textContent.trim());
                }
                old.innerHTML = cell.innerHTML;
              }
            });
          });
        }
        return tbody.querySelector("[data-busy]") ? BUSY_EVERY : IDLE_EVERY;
      });
    }
    poll(refresh, tbody.querySelector("[data-busy]") ? BUSY_EVERY : IDLE_EVERY);
  }

  // A database's page: once its status changes, the page is shown anew (by GET,
  // never re-sending a form), with the actions and log that fit the new status.
  function followStatus(badge) {
    function refresh() {
      return get(badge.getAttribute("data-poll-status"), "application/json").then(function (response) {
        return response.json();
      }).then(function (body) {
        if (body.status !== badge.getAttribute("data-status")) {
          announce("Status: " + body.status);
          window.location.replace(badge.getAttribute("data-page"));
        }
        return body.busy ? BUSY_EVERY : IDLE_EVERY;
      });
    }
    poll(refresh, badge.hasAttribute("data-busy") ? BUSY_EVERY : IDLE_EVERY);
  }

  function copyWithSelection(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    var done = document.execCommand("copy");
    document.body.removeChild(area);
    if (!done) {
      throw new Error("copy refused");
    }
  }

  // Copy buttons fetch the URI (it holds the password, so it is not in the page) and copy it.
  function copyButton(button) {
    var result = document.getElementById(button.getAttribute("aria-describedby"));
    function uri() {
      return get(button.getAttribute("data-copy"), "application/json").then(function (response) {
        return response.json();
      }).then(function (body) {
        return body.connection_uri;
      });
    }
    function say(text) {
      if (result) {
        result.textContent = text;
      }
    }
    button.addEventListener("click", function () {
      say("");
      var copied;
      if (navigator.clipboard && window.ClipboardItem) {
        // The item is handed over at once and filled when the URI arrives,
        // so browsers that want the click's user activation still have it.
        var blob = uri().then(function (text) { return new Blob([text], { type: "text/plain" }); });
        copied = navigator.clipboard.write([new window.ClipboardItem({ "text/plain": blob })]);
      } else if (navigator.clipboard) {
        copied = uri().then(function (text) { return navigator.clipboard.writeText(text); });
      } else {
        copied = uri().then(copyWithSelection);
      }
      copied.then(function () {
        say("Copied the connection URI, password included.");
      }, function () {
        say("Could not copy: use Reveal password and copy the URI by hand.");
      });
    });
    button.hidden = false;
  }

  function start() {
    var tbody = document.querySelector("tbody[data-poll]");
    if (tbody) {
      followRows(tbody);
    }
    var badge = document.querySelector("[data-poll-status]");
    if (badge) {
      followStatus(badge);
    }
    document.querySelectorAll("button[data-copy]").forEach(copyButton);
    // A log tail is read from its end.
    document.querySelectorAll("pre.log").forEach(function (log) { log.scrollTop = log.scrollHeight; });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
