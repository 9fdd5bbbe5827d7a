// kdrun report.html: soft-target panels drawn from the stored logits, and the sortable table.
// Every probability is computed here from the logits of soft_targets.json: softmax(logits / T).
// Each bar carries its exact value in data-p (and in its tooltip); the panel's KL in data-kl.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("kdrun-report-data").textContent);
  var ALL_CLASSES_UP_TO = 20;  // more classes than this: the teacher's top ones, and the true class
  var TOP_CLASSES = 10;
  var PLAY_MS = 700;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key];
      else node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) { node.appendChild(child); });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    return node;
  }

  // log softmax(logits / T), stable; null when the run had a non-finite logit (stored as null)
  function logSoftmax(logits, T) {
    if (!logits || logits.some(function (z) { return z === null; })) return null;
    var scaled = logits.map(function (z) { return z / T; });
    var top = Math.max.apply(null, scaled);
    var sum = 0;
    scaled.forEach(function (s) { sum += Math.exp(s - top); });
    var lse = top + Math.log(sum);
    return scaled.map(function (s) { return s - lse; });
  }

  function probabilities(logp) { return logp ? logp.map(Math.exp) : null; }

  // KL(p || q) = sum p (log p - log q), from log-probabilities
  function kl(logp, logq) {
    if (!logp || !logq) return null;
    var total = 0;
    for (var i = 0; i < logp.length; i++) {
      var p = Math.exp(logp[i]);
      if (p > 0) total += p * (logp[i] - logq[i]);
    }
    return total;
  }

  function shownClasses(image, count) {
    var all = [];
    for (var c = 0; c < count; c++) all.push(c);
    if (count <= ALL_CLASSES_UP_TO) return all;
    var t1 = probabilities(logSoftmax(image.teacher_logits, 1)) || all.map(function () { return 0; });
    var top = all.sort(function (a, b) { return t1[b] - t1[a]; }).slice(0, TOP_CLASSES);
    if (top.indexOf(image.label) < 0) top.push(image.label);
    return top;
  }

  function percentText(p) {
    var v = 100 * p;
    return v >= 99.5 ? "100" : v >= 9.95 ? v.toFixed(0) : v >= 0.05 ? v.toFixed(1) : "0";
  }

  // The three distributions of one image side by side: a row per class (its name once, upright and
  // readable), a column per panel; set(role, p, title) shows the probabilities p (indexed by class)
  function distributionGrid(roles, classes, names, label) {
    var grid = el("div", {"class": "dist"});
    var headings = {}, bars = {};
    grid.appendChild(el("div", {"class": "corner", text: "class"}));
    roles.forEach(function (role) {
      headings[role] = el("div", {"class": "chart-title", "data-role": role});
      grid.appendChild(headings[role]);
      bars[role] = [];
    });
    classes.forEach(function (c) {
      var isTrue = c === label;
      grid.appendChild(el("div", {"class": isTrue ? "name true" : "name", title: names[c],
        text: names[c] + (isTrue ? " \u2713" : "")}));
      roles.forEach(function (role) {
        var bar = el("div", {"class": isTrue ? "bar true" : "bar", "data-class": String(c)});
        var value = el("span", {"class": "value"});
        var cell = el("div", {"class": "cell", "data-role": role}, [el("div", {"class": "track"}, [bar]), value]);
        grid.appendChild(cell);
        bars[role].push({c: c, bar: bar, value: value, cell: cell});
      });
    });
    return {
      node: grid,
      set: function (role, p, title) {
        headings[role].textContent = title;
        bars[role].forEach(function (b) {
          var v = p ? p[b.c] : null;
          b.bar.style.width = v === null ? "0" : (100 * v) + "%";
          b.bar.setAttribute("data-p", v === null ? "" : String(v));
          b.value.textContent = v === null ? "n/a" : percentText(v);
          b.cell.title = names[b.c] + (b.c === label ? " (true class)" : "") + ": " +
            (v === null ? "not finite" : v.toPrecision(9));
        });
      }
    };
  }

  // KL over the epochs at the current T, the current epoch marked
  function klChart() {
    var W = 170, H = 64, PAD = 4;
    var root = svg("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, "class": "kl-chart",
      role: "img"});
    var line = svg("polyline", {fill: "none", stroke: "#1f77b4", "stroke-width": 2});
    var dot = svg("circle", {r: 4, fill: "#d62728"});
    root.appendChild(svg("line", {x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD, stroke: "#bbb"}));
    root.appendChild(line);
    root.appendChild(dot);
    return {
      node: root,
      set: function (values, current) {
        var finite = values.filter(function (v) { return v !== null && isFinite(v); });
        var top = Math.max.apply(null, finite.concat([1e-12]));
        var x = function (i) { return PAD + (W - 2 * PAD) * (values.length > 1 ? i / (values.length - 1) : 0.5); };
        var y = function (v) { return H - PAD - (H - 2 * PAD) * v / top; };
        var points = [];
        values.forEach(function (v, i) { if (v !== null && isFinite(v)) points.push(x(i) + "," + y(v)); });
        line.setAttribute("points", points.join(" "));
        var v = values[current];
        dot.setAttribute("visibility", v === null || !isFinite(v) ? "hidden" : "visible");
        if (v !== null && isFinite(v)) { dot.setAttribute("cx", x(current)); dot.setAttribute("cy", y(v)); }
      }
    };
  }

  function formatT(T) { return String(+T.toFixed(4)); }

  function setupRun(run) {
    var holder = document.querySelector('.soft[data-run="' + run.id + '"]');
    if (!holder) return;
    var st = run.soft_targets, names = st.class_names, epochs = st.epochs;
    var state = {T: st.T, index: epochs.length - 1, timer: null};
    var tMax = Math.max(20, Math.ceil(2 * st.T));

    var tSlider = el("input", {type: "range", "class": "t-slider", min: "0.5", max: String(tMax), step: "0.1",
      value: String(st.T), "aria-label": "temperature T"});
    var tNumber = el("input", {type: "number", "class": "t-number", min: "0.01", step: "any",
      value: String(st.T), "aria-label": "temperature T, typed"});
    var tReset = el("button", {type: "button", "class": "t-reset", text: "run's T = " + formatT(st.T)});
    var eSlider = el("input", {type: "range", "class": "epoch-slider", min: "0", max: String(epochs.length - 1),
      step: "1", value: String(state.index), "aria-label": "epoch"});
    var eLabel = el("span", {"class": "epoch-label"});
    var play = el("button", {type: "button", "class": "play", text: "\u25b6 play"});
    holder.appendChild(el("div", {"class": "controls"}, [
      el("label", {}, [el("span", {text: "T "}), tSlider, tNumber]), tReset,
      el("label", {}, [el("span", {text: "epoch "}), eSlider, eLabel]), play]));

    var samples = st.images.map(function (image, i) {
      var classes = shownClasses(image, names.length);
      var grid = distributionGrid(["teacher", "soft", "student"], classes, names, image.label);
      var klText = el("div", {"class": "kl"});
      var klPlot = klChart();
      var thumb = el("img", {alt: "test image " + image.position, src: "data:image/png;base64," + image.png});
      thumb.addEventListener("load", function () {
        if (thumb.naturalWidth < 64) thumb.classList.add("pixelated");
      });
      var caption = el("figcaption", {}, [el("span", {text: "true: "}),
        el("b", {"class": "true-label", text: names[image.label]}),
        el("div", {"class": "position", text: "test image #" + image.position})]);
      var partial = classes.length < names.length ?
        [el("div", {"class": "partial", text: "top " + TOP_CLASSES + " of " + names.length +
          " classes (teacher, T=1) and the true class"})] : [];
      var node = el("div", {"class": "sample", "data-image": String(i)}, [
        el("figure", {"class": "thumb"}, [thumb, caption]), grid.node,
        el("div", {"class": "kl-box"}, [el("div", {"class": "kl-label", text: "KL(soft targets \u2016 student)"}),
          klText, klPlot.node, el("div", {"class": "kl-axis",
          text: "epoch " + epochs[0].epoch + " \u2026 " + epochs[epochs.length - 1].epoch})].concat(partial))]);
      holder.appendChild(node);
      var teacherLog1 = logSoftmax(image.teacher_logits, 1);
      grid.set("teacher", probabilities(teacherLog1), "teacher, T=1");
      return {image: image, i: i, grid: grid, klText: klText, klPlot: klPlot};
    });

    function update() {
      var T = state.T, entry = epochs[state.index];
      holder.setAttribute("data-t", String(T));
      holder.setAttribute("data-epoch", String(entry.epoch));
      eLabel.textContent = entry.epoch + " / " + epochs[epochs.length - 1].epoch +
        (entry.epoch === 0 ? " (before training)" : "");
      samples.forEach(function (s) {
        var target = logSoftmax(s.image.teacher_logits, T);
        var studentLog = logSoftmax(entry.student_logits[s.i], T);
        s.grid.set("soft", probabilities(target), "soft targets, T=" + formatT(T));
        s.grid.set("student", probabilities(studentLog), "student, T=" + formatT(T) + ", epoch " + entry.epoch);
        var value = kl(target, studentLog);
        s.klText.setAttribute("data-kl", value === null ? "" : String(value));
        s.klText.textContent = value === null ? "n/a" : Math.max(0, value).toFixed(4);  // never "-0.0000"
        s.klPlot.set(epochs.map(function (e) { return kl(target, logSoftmax(e.student_logits[s.i], T)); }),
          state.index);
      });
    }

    function setT(T, from) {
      if (!(T > 0) || !isFinite(T)) return;
      state.T = T;
      if (from !== tSlider) tSlider.value = String(T);
      if (from !== tNumber) tNumber.value = formatT(T);
      update();
    }

    function stop() {
      if (state.timer !== null) clearInterval(state.timer);
      state.timer = null;
      play.textContent = "\u25b6 play";
    }

    tSlider.addEventListener("input", function () { setT(parseFloat(tSlider.value), tSlider); });
    tNumber.addEventListener("input", function () { setT(parseFloat(tNumber.value), tNumber); });
    tReset.addEventListener("click", function () { setT(st.T, null); tNumber.value = String(st.T); });
    eSlider.addEventListener("input", function () { stop(); state.index = parseInt(eSlider.value, 10); update(); });
    play.addEventListener("click", function () {
      if (state.timer !== null) { stop(); return; }
      if (state.index === epochs.length - 1) state.index = 0;
      play.textContent = "\u275a\u275a pause";
      var step = function () {
        eSlider.value = String(state.index);
        update();
        if (state.index === epochs.length - 1) stop(); else state.index += 1;
      };
      step();
      state.timer = setInterval(step, PLAY_MS);
    });
    update();
  }

  // Sortable table: click (or Enter on) a header; numbers sort as numbers, "-" always last
  function sortKey(cell) {
    var text = cell.textContent.trim();
    var number = parseFloat(text);
    return isNaN(number) ? text : number;
  }

  function setupSorting(table) {
    var headers = table.querySelectorAll("thead th");
    headers.forEach(function (th, column) {
      var sort = function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = sortKey(a.cells[column]), y = sortKey(b.cells[column]);
          if (x === "-" || y === "-") return (x === "-") - (y === "-");
          if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
          var order = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) { if (event.key === "Enter") sort(); });
    });
  }

  DATA.runs.forEach(setupRun);
  document.querySelectorAll("table.sortable").forEach(setupSorting);
})();
