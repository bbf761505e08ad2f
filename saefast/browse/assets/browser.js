/* saefast feature browser: renders index.html and latent.html from window.SAEFAST_INDEX (data/index.js) and the
   shard scripts (data/shard-NNNNN.js, each calling window.saefastShard). Plain JS, no libraries, no network: data
   arrives through <script> tags because Chromium refuses fetch/XHR from file://. The data contract is written in
   saefast/browse/site.py's module docstring. */
(function () {
  "use strict";

  var ROW = { member: 0, latent: 1, frequency: 2, max: 3, mean: 4, shard: 5 };
  var HUE = "245, 158, 11"; // amber: black text stays readable on it at every alpha

  /* ---------- small helpers ---------- */

  function $(id) { return document.getElementById(id); }

  function esc(value) {
    return String(value).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  /* A number in 4 significant digits; exponent form for the very small and very large. */
  function fmt(x) {
    if (x === null || x === undefined) return "—";
    if (!isFinite(x)) return String(x);
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return String(Number(x.toPrecision(4)));
  }

  /* A fraction as a percentage, e.g. 0.0123 -> "1.23%". */
  function pct(f) {
    if (!isFinite(f)) return String(f);
    var p = f * 100;
    if (p === 0) return "0%";
    if (Math.abs(p) < 0.01) return p.toExponential(1) + "%";
    return String(Number(p.toPrecision(3))) + "%";
  }

  function latentHref(member, latent) { return "latent.html#m=" + member + "&l=" + latent; }

  function showMessage(text) {
    var el = $("message");
    el.textContent = text;
    el.hidden = false;
  }

  function summaryHtml(pairs) {
    return pairs.map(function (p) {
      return "<div><dt>" + esc(p[0]) + "</dt><dd>" + esc(p[1]) + "</dd></div>";
    }).join("");
  }

  function modelLine(model) {
    var parts = [model.kind, model.members + (model.members === 1 ? " member" : " members") + " × " +
                 model.latents_per_member + " latents", model.activation + (model.k == null ? "" : " (k=" + model.k + ")")];
    if (model.chains > 1) parts.push(model.chains + " chains");
    return parts.join(" · ");
  }

  /* ---------- index page ---------- */

  function renderIndex(ix) {
    document.title = ix.title + " · saefast";
    $("title").textContent = ix.title;
    var pairs = [["Model", modelLine(ix.model)], ["Store", ix.data.store], ["Hook", ix.data.hook],
                 ["Tokens scanned", Number(ix.data.tokens).toLocaleString("en-US")]];
    if (ix.data.lm) pairs.push(["Language model", ix.data.lm]);
    pairs.push(["Latents", ix.rows.length.toLocaleString("en-US")], ["saefast", ix.generated.saefast]);
    $("summary").innerHTML = summaryHtml(pairs);
    renderEnsemble(ix);
    setUpTable(ix);
  }

  function renderEnsemble(ix) {
    var ens = ix.ensemble || {};
    var any = false;
    if (ens.shared_matrix && ix.model.members > 1) {
      $("shared").innerHTML = sharedMatrixSvg(ens.shared_matrix, ens.shared_threshold);
      $("shared").hidden = false;
      any = true;
    }
    if (ens.stage_variance && ens.stage_variance.length) {
      $("stages").innerHTML = stageBarsSvg(ens.stage_variance);
      $("stages").hidden = false;
      any = true;
    }
    if (ens.classes && Object.keys(ens.classes).length) {
      $("classes").innerHTML = "<h3>Latents by class</h3>" + Object.keys(ens.classes).map(function (name) {
        var links = ens.classes[name].map(function (p) {
          return '<li><a href="' + latentHref(p[0], p[1]) + '">member ' + p[0] + " · latent " + p[1] + "</a></li>";
        }).join("");
        return '<div class="class"><h4>' + esc(name) + " <small>(" + ens.classes[name].length + ")</small></h4>" +
               '<ul class="links">' + links + "</ul></div>";
      }).join("");
      $("classes").hidden = false;
      any = true;
    }
    $("ensemble").hidden = !any;
  }

  /* The member x member shared-feature matrix: a heatmap with each value written in its cell. */
  function sharedMatrixSvg(matrix, threshold) {
    var n = matrix.length;
    var cell = Math.max(30, Math.min(64, Math.floor(560 / n)));
    var left = 80, top = 36;
    var w = left + n * cell + 10, h = top + n * cell + 10;
    var out = ['<svg class="heatmap" role="img" viewBox="0 0 ' + w + " " + h + '" width="' + w + '" height="' + h +
               '" aria-label="Shared-feature matrix">'];
    for (var j = 0; j < n; j++) {
      out.push('<text class="axis" x="' + (left + j * cell + cell / 2) + '" y="' + (top - 8) +
               '" text-anchor="middle">m' + j + "</text>");
    }
    for (var i = 0; i < n; i++) {
      var y = top + i * cell;
      out.push('<text class="axis" x="' + (left - 8) + '" y="' + (y + cell / 2 + 4) + '" text-anchor="end">member ' +
               i + "</text>");
      for (j = 0; j < n; j++) {
        var v = matrix[i][j];
        var a = Math.max(0, Math.min(1, v));
        var x = left + j * cell;
        out.push('<g><title>member ' + i + " → member " + j + ": " + fmt(v) + "</title>" +
                 '<rect x="' + x + '" y="' + y + '" width="' + cell + '" height="' + cell +
                 '" fill="rgba(37, 99, 235, ' + (0.08 + 0.92 * a).toFixed(3) + ')" stroke="#fff"/>' +
                 '<text class="cell' + (a > 0.55 ? " light" : "") + '" x="' + (x + cell / 2) + '" y="' +
                 (y + cell / 2 + 4) + '" text-anchor="middle">' + (isFinite(v) ? v.toFixed(2) : String(v)) +
                 "</text></g>");
      }
    }
    out.push("</svg>");
    return "<h3>Shared features</h3>" + out.join("") +
      '<p class="caption">Row i, column j: the fraction of member i\'s latents whose nearest latent in member j ' +
      "has decoder cosine ≥ " + fmt(threshold) + ".</p>";
  }

  /* The boosting stages' variance fractions as a bar chart. */
  function stageBarsSvg(values) {
    var n = values.length;
    var bar = Math.max(14, Math.min(48, Math.floor(560 / n)));
    var left = 48, top = 18, plotH = 160, bottom = 40;
    var w = left + n * bar + 10, h = top + plotH + bottom;
    var vmax = Math.max.apply(null, values.map(function (v) { return isFinite(v) ? v : 0; }).concat([1e-12]));
    var out = ['<svg class="bars" role="img" viewBox="0 0 ' + w + " " + h + '" width="' + w + '" height="' + h +
               '" aria-label="Variance fraction per boosting stage">'];
    out.push('<line class="axis-line" x1="' + left + '" y1="' + (top + plotH) + '" x2="' + (w - 6) + '" y2="' +
             (top + plotH) + '"/>');
    out.push('<text class="axis" x="' + (left - 6) + '" y="' + (top + 4) + '" text-anchor="end">' + fmt(vmax) +
             "</text>");
    out.push('<text class="axis" x="' + (left - 6) + '" y="' + (top + plotH) + '" text-anchor="end">0</text>');
    for (var s = 0; s < n; s++) {
      var v = isFinite(values[s]) ? Math.max(0, values[s]) : 0;
      var bh = plotH * v / vmax;
      var x = left + s * bar;
      out.push('<g><title>stage ' + s + ": " + fmt(values[s]) + "</title>" +
               '<rect class="bar" x="' + (x + 2) + '" y="' + (top + plotH - bh) + '" width="' + (bar - 4) +
               '" height="' + bh + '"/></g>');
      if (bar >= 30) {  // the value above its bar, where there is room
        out.push('<text class="axis" x="' + (x + bar / 2) + '" y="' + (top + plotH - bh - 3) +
                 '" text-anchor="middle">' + fmt(values[s]) + "</text>");
      }
      out.push('<text class="axis" x="' + (x + bar / 2) + '" y="' + (top + plotH + 14) + '" text-anchor="middle">' +
               s + "</text>");
    }
    out.push('<text class="axis" x="' + (left + n * bar / 2) + '" y="' + (h - 6) + '" text-anchor="middle">stage</text>');
    out.push("</svg>");
    return "<h3>Variance explained per boosting stage</h3>" + out.join("");
  }

  /* The latent table: every row's <tr> is parsed once, in one innerHTML batch; sorting and filtering only move
     those elements into one DocumentFragment that replaces tbody's children, which keeps 100 k rows usable. */
  function setUpTable(ix) {
    var rows = ix.rows;
    var parser = document.createElement("tbody");
    parser.innerHTML = rows.map(function (r) {
      var href = latentHref(r[ROW.member], r[ROW.latent]);
      return '<tr><td>' + r[ROW.member] + '</td><td><a href="' + href + '">' + r[ROW.latent] + "</a></td>" +
             '<td class="num">' + pct(r[ROW.frequency]) + '</td><td class="num">' + fmt(r[ROW.max]) +
             '</td><td class="num">' + fmt(r[ROW.mean]) + "</td></tr>";
    }).join("");
    var trs = Array.prototype.slice.call(parser.rows);
    var order = rows.map(function (_, i) { return i; });
    var sort = { key: null, dir: 0 };
    var tbody = document.querySelector("#latent-table tbody");

    var select = $("member-filter");
    for (var j = 0; j < ix.model.members; j++) {
      var opt = document.createElement("option");
      opt.value = String(j);
      opt.textContent = "Member " + j;
      select.appendChild(opt);
    }

    function number(id) {
      var v = $(id).value;
      return v === "" ? null : Number(v);
    }

    function render() {
      var member = select.value === "" ? null : Number(select.value);
      var fmin = number("min-frequency"), fmax = number("max-frequency"), amin = number("min-max-activation");
      tbody.replaceChildren(); // detach all rows at once first: moving them one by one out of tbody is slower
      var shown = document.createDocumentFragment();
      var count = 0;
      for (var k = 0; k < order.length; k++) {
        var r = rows[order[k]];
        if (member !== null && r[ROW.member] !== member) continue;
        if (fmin !== null && !(r[ROW.frequency] * 100 >= fmin)) continue;
        if (fmax !== null && !(r[ROW.frequency] * 100 <= fmax)) continue;
        if (amin !== null && !(r[ROW.max] >= amin)) continue;
        shown.appendChild(trs[order[k]]);
        count++;
      }
      tbody.appendChild(shown);
      $("count").textContent = "Showing " + count.toLocaleString("en-US") + " of " +
        rows.length.toLocaleString("en-US") + " latents";
    }

    /* Numeric sort on one column; the first click on a statistic sorts descending, on member/latent ascending,
       and each further click toggles. Ties keep the rows' order. */
    function sortBy(key) {
      if (sort.key === key) sort.dir = -sort.dir;
      else { sort.key = key; sort.dir = key >= ROW.frequency ? -1 : 1; }
      order.sort(function (a, b) {
        var va = rows[a][key], vb = rows[b][key];
        va = isNaN(va) ? -Infinity : va; // NaN sorts as the smallest value
        vb = isNaN(vb) ? -Infinity : vb;
        return va < vb ? -sort.dir : va > vb ? sort.dir : a - b;
      });
      document.querySelectorAll("#latent-table thead th").forEach(function (th) {
        var k = Number(th.querySelector("button").dataset.key);
        th.setAttribute("aria-sort", k !== key ? "none" : sort.dir > 0 ? "ascending" : "descending");
      });
      render();
    }

    document.querySelectorAll("#latent-table thead button").forEach(function (button) {
      button.addEventListener("click", function () { sortBy(Number(button.dataset.key)); });
    });
    ["member-filter", "min-frequency", "max-frequency", "min-max-activation"].forEach(function (id) {
      $(id).addEventListener(id === "member-filter" ? "change" : "input", render);
    });
    render();
  }

  /* ---------- latent page ---------- */

  var shards = {};    // shard number -> {"member/latent": LATENT}
  var pending = {};   // shard number -> callbacks waiting for it
  var rowByKey = null;

  /* Called by each shard script as it loads. */
  window.saefastShard = function (shard, data) {
    shards[shard] = data;
    (pending[shard] || []).forEach(function (done) { done(null); });
    delete pending[shard];
  };

  /* Inject the shard's <script> once; `done(error)` runs when it has loaded (or failed). */
  function loadShard(shard, done) {
    if (shards[shard]) { done(null); return; }
    if (pending[shard]) { pending[shard].push(done); return; }
    pending[shard] = [done];
    var script = document.createElement("script");
    script.src = "data/shard-" + String(shard).padStart(5, "0") + ".js";
    script.onerror = function () {
      (pending[shard] || []).forEach(function (cb) { cb("could not load " + script.src); });
      delete pending[shard];
    };
    document.head.appendChild(script);
  }

  function parseHash() {
    var params = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv.length === 2) params[decodeURIComponent(kv[0])] = decodeURIComponent(kv[1]);
    });
    var m = params.m, l = params.l;
    if (!/^\d+$/.test(m || "") || !/^\d+$/.test(l || "")) return null;
    return { member: Number(m), latent: Number(l) };
  }

  function renderLatentPage(ix) {
    if (!rowByKey) {
      rowByKey = new Map();
      ix.rows.forEach(function (r) { rowByKey.set(r[ROW.member] + "/" + r[ROW.latent], r); });
    }
    var want = parseHash();
    $("message").hidden = true;
    $("latent").hidden = true;
    if (!want) {
      document.title = "No latent · " + ix.title;
      showMessage("No latent chosen: open latent.html#m=<member>&l=<latent>, or pick one from the list of all latents.");
      return;
    }
    var key = want.member + "/" + want.latent;
    var row = rowByKey.get(key);
    if (!row) {
      document.title = "Unknown latent · " + ix.title;
      showMessage("Unknown latent: member " + want.member + ", latent " + want.latent + " is not in this browser.");
      return;
    }
    loadShard(row[ROW.shard], function (error) {
      if (parseHash() === null || parseHash().member !== want.member || parseHash().latent !== want.latent) return;
      var entry = !error && shards[row[ROW.shard]] && shards[row[ROW.shard]][key];
      if (!entry) {
        showMessage(error ? "Could not load this latent's data (" + error + ")." :
                    "Unknown latent: member " + want.member + ", latent " + want.latent + " has no data.");
        return;
      }
      renderLatent(ix, entry);
    });
  }

  function renderLatent(ix, d) {
    document.title = "Member " + d.member + " · latent " + d.latent + " · " + ix.title;
    $("heading").textContent = "Member " + d.member + " · latent " + d.latent;
    $("stats").innerHTML = summaryHtml([
      ["Frequency", pct(d.frequency)], ["Max activation", fmt(d.max_activation)],
      ["Mean activation (when firing)", fmt(d.mean_activation)], ["Model", modelLine(ix.model)]]);
    $("histogram").innerHTML = histogramSvg(d.histogram);
    var scale = d.max_activation > 0 ? d.max_activation : 0;
    $("top").innerHTML = d.top.length ? d.top.map(function (c) { return contextHtml(c, scale); }).join("") :
      '<p class="empty">No examples: this latent never fired on the scanned tokens.</p>';
    $("quantiles-section").hidden = !d.quantiles.length;
    $("quantiles").innerHTML = d.quantiles.map(function (q) {
      return '<div class="quantile"><h3>Quantile ' + fmt(q.quantile) + '</h3><div class="contexts">' +
        q.examples.map(function (c) { return contextHtml(c, scale); }).join("") + "</div></div>";
    }).join("");
    $("logits-section").hidden = !d.logits;
    $("logits").innerHTML = d.logits ? logitTable("Promoted tokens", d.logits.promoted) +
      logitTable("Suppressed tokens", d.logits.suppressed) : "";
    $("neighbours-section").hidden = !d.neighbours.length;
    $("neighbours").innerHTML = d.neighbours.map(function (n) {
      return '<li><a href="' + latentHref(n.member, n.latent) + '">member ' + n.member + " · latent " + n.latent +
        '</a> <span class="cosine">cosine ' + fmt(n.cosine) + "</span></li>";
    }).join("");
    $("latent").hidden = false;
    window.scrollTo(0, 0);
  }

  /* Whitespace made visible, so a token of spaces or a newline still shows. */
  function visible(token) {
    var s = String(token).replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "");
    return s === "" ? "∅" : s;
  }

  /* One example: a row of token spans, shaded by activation / the latent's max activation (`scale`). */
  function contextHtml(c, scale) {
    var top = scale || Math.max.apply(null, c.activations.concat([0]));
    var spans = c.tokens.map(function (tok, i) {
      var a = c.activations[i];
      var alpha = top > 0 && isFinite(a) ? Math.max(0, Math.min(1, a / top)) : 0;
      return '<span class="tok' + (i === c.focus ? " focus" : "") + '" style="background-color: rgba(' + HUE +
        ", " + alpha.toFixed(3) + ')" data-activation="' + a + '" title="' + esc(JSON.stringify(tok)) + ": " +
        fmt(a) + '">' + esc(visible(tok)) + "</span>";
    }).join("");
    return '<div class="context"><span class="value" title="activation at the focus token">' + fmt(c.value) +
      '</span><span class="tokens">' + spans + "</span></div>";
  }

  function logitTable(caption, pairs) {
    return '<table class="logit-table"><caption>' + esc(caption) + "</caption><thead><tr><th>Token</th>" +
      '<th class="num">Logit</th></tr></thead><tbody>' + pairs.map(function (p) {
        return '<tr><td><code>' + esc(visible(p[0])) + '</code></td><td class="num">' + fmt(p[1]) + "</td></tr>";
      }).join("") + "</tbody></table>";
  }

  /* The activation histogram: bars, the edges' range on the x axis and the largest count on the y axis. */
  function histogramSvg(hist) {
    var counts = hist.counts, edges = hist.edges, n = counts.length;
    if (!n) return '<p class="empty">No histogram.</p>';
    var left = 56, top = 12, plotW = 600, plotH = 160, bottom = 40;
    var w = left + plotW + 16, h = top + plotH + bottom;
    var cmax = Math.max.apply(null, counts.concat([1]));
    var bw = plotW / n;
    var out = ['<svg class="histogram" role="img" viewBox="0 0 ' + w + " " + h + '" width="' + w + '" height="' +
               h + '" aria-label="Histogram of the activation over firing tokens">'];
    for (var b = 0; b < n; b++) {
      var bh = plotH * counts[b] / cmax;
      out.push('<g><title>' + fmt(edges[b]) + " – " + fmt(edges[b + 1]) + ": " + counts[b] + "</title>" +
               '<rect class="bar" x="' + (left + b * bw + 0.5) + '" y="' + (top + plotH - bh) + '" width="' +
               Math.max(0.5, bw - 1) + '" height="' + bh + '"/></g>');
    }
    out.push('<line class="axis-line" x1="' + left + '" y1="' + (top + plotH) + '" x2="' + (left + plotW) +
             '" y2="' + (top + plotH) + '"/>');
    out.push('<line class="axis-line" x1="' + left + '" y1="' + top + '" x2="' + left + '" y2="' + (top + plotH) + '"/>');
    var ticks = [0, Math.floor(n / 2), n];
    ticks.forEach(function (t) {
      out.push('<text class="axis" x="' + (left + t * bw) + '" y="' + (top + plotH + 14) +
               '" text-anchor="middle">' + fmt(edges[t]) + "</text>");
    });
    out.push('<text class="axis" x="' + (left - 6) + '" y="' + (top + 8) + '" text-anchor="end">' + cmax + "</text>");
    out.push('<text class="axis" x="' + (left - 6) + '" y="' + (top + plotH) + '" text-anchor="end">0</text>');
    out.push('<text class="axis" x="' + (left + plotW / 2) + '" y="' + (h - 4) + '" text-anchor="middle">activation</text>');
    out.push('<text class="axis" transform="rotate(-90)" x="' + -(top + plotH / 2) + '" y="14" ' +
             'text-anchor="middle">count</text>');
    out.push("</svg>");
    return out.join("");
  }

  /* ---------- start ---------- */

  function start() {
    var ix = window.SAEFAST_INDEX;
    if (!ix || ix.format !== "saefast-browser") {
      showMessage("The browser's data (data/index.js) is missing or not a saefast browser index.");
      return;
    }
    if (document.body.dataset.page === "index") {
      renderIndex(ix);
    } else {
      renderLatentPage(ix);
      // Links between latents change only the hash: render the new latent on the same page.
      window.addEventListener("hashchange", function () { renderLatentPage(ix); });
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
