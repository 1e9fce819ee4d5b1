// wsi-pipeline viewer: the slide list (sortable, filterable), one slide in OpenSeadragon with an overlay layer,
// its colour bar, its GeoJSON regions (SVG on top) and its details. Everything comes from the local server's JSON.
"use strict";

var state = {slides: [], sortKey: "slide_id", sortDir: 1, current: null, info: null, layer: null, overlay: null,
             opacity: 0.5, width: 1, stats: {slide: 0, overlay: 0, levels: {}}};
window.viewerState = state;
var viewer = null;
var svg = null;

function el(tag, text, cls) {
  var node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmtProb(p) { return p === null || p === undefined ? "" : Number(p).toFixed(3); }

function misclassified(s) { return s.prediction !== null && s.label !== null && String(s.prediction) !== String(s.label); }

function compare(a, b) {
  var x = a[state.sortKey], y = b[state.sortKey];
  if (x === null || x === undefined) return 1;
  if (y === null || y === undefined) return -1;
  if (typeof x === "number" && typeof y === "number") return (x - y) * state.sortDir;
  return String(x).localeCompare(String(y), undefined, {numeric: true}) * state.sortDir;
}

function renderList() {
  var text = document.getElementById("filter").value.trim().toLowerCase();
  var status = document.getElementById("status-filter").value;
  var rows = state.slides.filter(function (s) {
    if (status === "misclassified" ? !misclassified(s) : (status && s.status !== status)) return false;
    if (!text) return true;
    return [s.slide_id, s.status, s.label, s.prediction, s.failure].some(function (v) {
      return v !== null && String(v).toLowerCase().indexOf(text) >= 0;
    });
  }).sort(compare);
  var body = document.querySelector("#slides tbody");
  body.textContent = "";
  rows.forEach(function (s) {
    var tr = el("tr");
    tr.dataset.slide = s.slide_id;
    if (s.slide_id === state.current) tr.className = "current";
    tr.appendChild(el("td", s.slide_id));
    tr.appendChild(el("td", s.status, s.status === "failed" ? "failed" : ""));
    tr.appendChild(el("td", s.label));
    tr.appendChild(el("td", s.prediction, misclassified(s) ? "wrong" : ""));
    tr.appendChild(el("td", fmtProb(s.probability)));
    tr.title = s.failure || "";
    tr.addEventListener("click", function () { location.hash = "slide=" + encodeURIComponent(s.slide_id); });
    body.appendChild(tr);
  });
  document.getElementById("count").textContent = rows.length + " of " + state.slides.length + " slides";
  document.querySelectorAll("#slides th").forEach(function (th) {
    th.className = th.dataset.key === state.sortKey ? (state.sortDir > 0 ? "asc" : "desc") : "";
  });
}

function dzSource(dzi, url) {
  var copy = JSON.parse(JSON.stringify(dzi));
  copy.Image.Url = url;
  return copy;
}

function slideUrl(kind) { return "/slides/" + encodeURIComponent(state.current) + "/" + kind + "/"; }

function ensureViewer() {
  if (viewer) return viewer;
  viewer = OpenSeadragon({id: "osd", prefixUrl: "/static/openseadragon/images/", showNavigator: true,
                          maxZoomPixelRatio: 4, animationTime: 0.3, crossOriginPolicy: false, drawer: "canvas"});
  window.wsiViewer = viewer;
  viewer.addHandler("tile-loaded", function (e) {
    var which = e.tiledImage === state.overlay ? "overlay" : "slide";
    state.stats[which] += 1;
    var key = which + ":" + e.tile.level;
    state.stats.levels[key] = (state.stats.levels[key] || 0) + 1;
  });
  svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "regions");
  svg.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none";
  svg.appendChild(document.createElementNS("http://www.w3.org/2000/svg", "g"));
  viewer.canvas.appendChild(svg);
  ["open", "animation", "resize", "update-viewport"].forEach(function (ev) { viewer.addHandler(ev, placeRegions); });
  return viewer;
}

function placeRegions() {
  if (!viewer || !svg) return;
  var origin = viewer.viewport.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
  var scale = viewer.viewport.getContainerSize().x * viewer.viewport.getZoom(true);
  svg.firstChild.setAttribute("transform", "translate(" + origin.x + "," + origin.y + ") scale(" + scale + ")");
}

function drawRegions(collections) {
  var g = svg.firstChild;
  g.textContent = "";
  var w = state.width;
  collections.forEach(function (item) {
    (item.collection.features || []).forEach(function (f) {
      var geom = f.geometry || {};
      var polys = geom.type === "Polygon" ? [geom.coordinates] : geom.type === "MultiPolygon" ? geom.coordinates : [];
      var colour = ((f.properties || {}).classification || {}).color;
      polys.forEach(function (rings) {
        var d = rings.map(function (ring) {
          return "M" + ring.map(function (p) { return (p[0] / w) + " " + (p[1] / w); }).join("L") + "Z";
        }).join(" ");
        var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
        path.setAttribute("d", d);
        path.setAttribute("stroke", Array.isArray(colour) ? "rgb(" + colour.join(",") + ")" : "#00e0ff");
        var title = document.createElementNS("http://www.w3.org/2000/svg", "title");
        title.textContent = item.name + ((f.properties || {}).name ? ": " + f.properties.name : "");
        path.appendChild(title);
        g.appendChild(path);
      });
    });
  });
  g.style.display = document.getElementById("regions").checked ? "" : "none";
  placeRegions();
}

function renderLegend(layer) {
  var box = document.getElementById("legend");
  box.textContent = "";
  if (!layer) return;
  var legend = layer.legend;
  box.appendChild(el("div", legend.label));
  if (legend.kind === "gradient") {
    var bar = el("div", null, "bar");
    bar.style.background = "linear-gradient(to right," + legend.stops.join(",") + ")";
    box.appendChild(bar);
    var ends = el("div", null, "ends");
    ends.appendChild(el("span", legend.min));
    ends.appendChild(el("span", legend.max));
    box.appendChild(ends);
  } else {
    legend.items.forEach(function (item) {
      var row = el("div");
      var sw = el("span", null, "swatch");
      sw.style.background = item[0];
      row.appendChild(sw);
      row.appendChild(document.createTextNode(item[1]));
      box.appendChild(row);
    });
  }
}

function setLayer(name) {
  state.layer = name;
  document.body.dataset.overlay = name || "none";
  if (state.overlay) { viewer.world.removeItem(state.overlay); state.overlay = null; }
  var info = state.info, layer = (info.layers || []).filter(function (l) { return l.name === name; })[0];
  renderLegend(layer);
  if (!layer) return;
  var base = info.slide.available;
  viewer.addTiledImage({tileSource: dzSource(layer.dzi, slideUrl(name)), x: 0, y: 0, width: 1,
                        opacity: base ? state.opacity : 1,
                        success: function (e) { state.overlay = e.item; document.body.dataset.overlayReady = name; }});
}

function setOpacity(value) {
  state.opacity = Number(value);
  document.body.dataset.opacity = String(state.opacity);
  if (state.overlay && state.info.slide.available) state.overlay.setOpacity(state.opacity);
}

function renderDetails(info) {
  var table = document.getElementById("details");
  table.textContent = "";
  Object.keys(info.details).forEach(function (key) {
    var tr = el("tr");
    tr.appendChild(el("td", key));
    tr.appendChild(el("td", info.details[key]));
    table.appendChild(tr);
  });
}

function openSlide(slideId) {
  state.current = slideId;
  renderList();
  fetch("/api/slides/" + encodeURIComponent(slideId)).then(function (r) {
    if (!r.ok) return r.text().then(function (t) { throw new Error(t); });
    return r.json();
  }).then(function (info) {
    state.info = info;
    document.getElementById("title").textContent = info.slide_id + (info.label !== null ? " · label " + info.label : "")
      + (info.prediction !== null ? " · predicted " + info.prediction + " (" + fmtProb(info.probability) + ")" : "");
    var messages = [];
    info.failures.forEach(function (f) { messages.push("Failed at " + f.stage + " (" + f.code + "): " + f.message); });
    if (!info.slide.available) messages.push(info.slide.message);
    var box = document.getElementById("message");
    box.hidden = messages.length === 0;
    box.textContent = messages.join(" ");
    renderDetails(info);
    var first = info.layers.length ? info.layers[0].name : null;
    var layers = document.getElementById("layers");
    layers.textContent = "";
    ["none"].concat(info.layers.map(function (l) { return l.name; })).forEach(function (name) {
      var label = el("label"), input = el("input");
      input.type = "radio"; input.name = "layer"; input.value = name;
      input.checked = name === (first || "none");
      input.addEventListener("change", function () { setLayer(name === "none" ? null : name); });
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + name.replace("_", " ")));
      layers.appendChild(label);
    });
    ensureViewer();
    state.overlay = null;
    state.stats = {slide: 0, overlay: 0, levels: {}};
    delete document.body.dataset.overlayReady;
    state.width = info.slide.available ? info.slide.width : (info.grid ? info.grid.width : 1);
    viewer.addOnceHandler("open", function () {
      setLayer(first);
      fetch("/api/slides/" + encodeURIComponent(slideId) + "/regions").then(function (r) { return r.json(); })
        .then(drawRegions);
      document.body.dataset.slide = slideId;
    });
    if (info.slide.available) viewer.open(dzSource(info.slide.dzi, slideUrl("image")));
    else if (first) viewer.open({type: "image", url: "data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==",
                                 buildPyramid: false}, {width: 1});
    else { viewer.close(); document.body.dataset.slide = slideId; renderLegend(null); }
  }).catch(function (err) {
    var box = document.getElementById("message");
    box.hidden = false;
    box.textContent = String(err.message || err);
  });
}

function route() {
  var m = /slide=([^&]+)/.exec(location.hash);
  if (m) openSlide(decodeURIComponent(m[1]));
}

document.addEventListener("DOMContentLoaded", function () {
  document.getElementById("filter").addEventListener("input", renderList);
  document.getElementById("status-filter").addEventListener("change", renderList);
  document.querySelectorAll("#slides th").forEach(function (th) {
    th.addEventListener("click", function () {
      state.sortDir = state.sortKey === th.dataset.key ? -state.sortDir : 1;
      state.sortKey = th.dataset.key;
      renderList();
    });
  });
  document.getElementById("opacity").addEventListener("input", function (e) { setOpacity(e.target.value); });
  document.getElementById("regions").addEventListener("change", function (e) {
    if (svg) svg.firstChild.style.display = e.target.checked ? "" : "none";
  });
  window.addEventListener("hashchange", route);
  fetch("/api/run").then(function (r) { return r.json(); }).then(function (run) {
    state.slides = run.slides;
    var m = run.metrics, parts = Object.keys(m).map(function (k) { return k + " " + Number(m[k]).toFixed(3); });
    document.getElementById("run").textContent = run.run_name + (parts.length ? " · " + parts.join(", ") : "");
    renderList();
    document.body.dataset.ready = "1";
    route();
  });
});
