// The page of `lenet5 serve` (src/serve/mod.rs): draw, upload or pick a digit and see what every
// stage of LeNet-5 computes; and the convolution walkthrough, animated. Plain JavaScript with
// no libraries, embedded in the binary, so the page works offline.
'use strict';

const $ = (id) => document.getElementById(id);
/** Milliseconds of quiet before a stroke in progress is sent for prediction. */
const DEBOUNCE_MS = 150;
/** Pixels per value of each picture, as `lenet5 visualize` draws them. */
const ZOOM = { input: 6, filters: 16, C1: 4, S2: 8, C3: 8, S4: 16 };
const state = { drawn: 0, timer: null, seen: null, card: null };

/** A JSON API call; a refusal becomes an Error carrying the server's one-line reason. */
async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

const fmt = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(2));
/** A line under the picker: what is shown, or (`error`) why nothing is. */
const status = (text, error = false) => {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
};

// ---- pictures --------------------------------------------------------------------------

/** Values (rows x cols) into a canvas with one pixel per value: from the minimum (black) to the
 *  maximum (white), or `signed`: gray = 0, white > 0, black < 0. Returns [min, max]. */
function paint(canvas, values, rows, cols, signed) {
  canvas.width = cols;
  canvas.height = rows;
  const ctx = canvas.getContext('2d');
  const image = ctx.createImageData(cols, rows);
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const scale = signed ? Math.max(Math.abs(lo), Math.abs(hi)) || 1 : hi - lo || 1;
  values.forEach((v, i) => {
    const g = signed ? 127.5 + (127.5 * v) / scale : (255 * (v - lo)) / scale;
    image.data.set([g, g, g, 255], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
  return [lo, hi];
}

/** `count` maps of rows x cols from `values`, each with a caption. */
function maps(container, values, count, rows, cols, zoom, signed, caption) {
  container.replaceChildren();
  for (let m = 0; m < count; m++) {
    const box = document.createElement('div');
    box.className = 'map';
    const canvas = document.createElement('canvas');
    canvas.style.width = `${cols * zoom}px`;
    canvas.style.height = `${rows * zoom}px`;
    const [lo, hi] = paint(canvas, values.slice(m * rows * cols, (m + 1) * rows * cols), rows, cols, signed);
    const label = document.createElement('span');
    label.textContent = caption(m, lo, hi);
    box.append(canvas, label);
    container.append(box);
  }
}

/** One bar per unit, as tall as its share of the largest value. */
function bars(container, values) {
  const top = Math.max(...values.map(Math.abs)) || 1;
  container.replaceChildren(...values.map((v, i) => {
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.style.height = `${(100 * Math.abs(v)) / top}%`;
    bar.title = `unit ${i + 1}: ${v.toFixed(3)}`;
    return bar;
  }));
}

/** The ten probabilities as labelled bars; the prediction's bar stands out. */
function probabilityBars(probabilities, classes, best) {
  $('probabilities').replaceChildren(...probabilities.map((p, c) => {
    const column = document.createElement('div');
    column.className = 'column';
    const value = document.createElement('div');
    value.className = 'value';
    value.textContent = `${(100 * p).toFixed(1)}%`;
    const bar = document.createElement('div');
    bar.className = c === best ? 'bar best' : 'bar';
    bar.style.height = `${Math.max(1, 80 * p)}px`;
    bar.dataset.class = String(c);
    bar.dataset.probability = String(p);
    const name = document.createElement('div');
    name.className = 'name';
    name.textContent = classes[c];
    column.append(value, bar, name);
    return column;
  }));
}

/** What each feature map is, in `lenet5 visualize`'s words. */
function describeStages(arch) {
  const [act, pool] = arch === 'classic' ? ['tanh', '2x2 average-pool'] : ['ReLU', '2x2 max-pool'];
  $('about-C1').textContent = `6 maps of 28x28: conv1 (5x5) + ${act}`;
  $('about-S2').textContent = `6 maps of 14x14: ${pool} of C1`;
  $('about-C3').textContent = `16 maps of 10x10: conv2 (5x5 over the 6 S2 maps) + ${act}`;
  $('about-S4').textContent = `16 maps of 5x5: ${pool} of C3`;
}

/** An answer of POST /api/predict?stages=true or GET /api/test-images/N?stages=true. */
function render(result) {
  const stage = Object.fromEntries(result.stages.map((s) => [s.name, s]));
  $('prediction').textContent = result.label;
  $('confidence').textContent = `${(100 * result.probabilities[result.prediction]).toFixed(1)}%`;
  probabilityBars(result.probabilities, state.card.classes, result.prediction);
  maps($('stage-input'), stage.input.values, 1, 32, 32, ZOOM.input, false, () => '32x32, normalised');
  for (const name of ['C1', 'S2', 'C3', 'S4']) {
    const [count, rows, cols] = stage[name].shape;
    maps($(`stage-${name}`), stage[name].values, count, rows, cols, ZOOM[name], false, (m, lo, hi) => `${m + 1}: ${fmt(lo)} to ${fmt(hi)}`);
  }
  bars($('stage-F5'), stage.F5.values);
  bars($('stage-F6'), stage.F6.values);
  state.seen = result.seen;
  if (!$('convolution').hidden) showDigit();
}

function clearResults() {
  $('prediction').textContent = '–';
  $('confidence').textContent = '';
  for (const id of ['probabilities', 'stage-input', 'stage-C1', 'stage-S2', 'stage-C3', 'stage-S4', 'stage-F5', 'stage-F6']) $(id).replaceChildren();
  state.seen = null;
}

// ---- inputs: every change gets a version; only the latest one's answer is shown ----------

function changed() {
  state.drawn += 1;
  document.body.dataset.drawn = String(state.drawn);
  return state.drawn;
}

function settled(version) {
  if (version === state.drawn) document.body.dataset.rendered = String(version);
}

async function show(request, version, note) {
  try {
    const result = await request;
    if (version === state.drawn) {
      render(result);
      status(note ? note(result) : '');
    }
  } catch (e) {
    if (version === state.drawn) status(e.message, true);
  } finally {
    settled(version);
  }
}

const pad = $('pad');
const ink = pad.getContext('2d');

function clearPad() {
  ink.fillStyle = '#fff';
  ink.fillRect(0, 0, pad.width, pad.height);
}

async function sendPad() {
  const version = state.drawn;
  const blob = await new Promise((resolve) => pad.toBlob(resolve, 'image/png'));
  show(api('/api/predict?stages=true', { method: 'POST', headers: { 'Content-Type': 'image/png' }, body: blob }), version);
}

function schedule(delay) {
  clearTimeout(state.timer);
  state.timer = setTimeout(sendPad, delay);
}

function point(event) {
  const r = pad.getBoundingClientRect();
  return [((event.clientX - r.left) * pad.width) / r.width, ((event.clientY - r.top) * pad.height) / r.height];
}

let last = null; // where the stroke in progress is, or null between strokes
function stroke(from, to) {
  ink.strokeStyle = '#000';
  ink.lineWidth = 18;
  ink.lineCap = 'round';
  ink.lineJoin = 'round';
  ink.beginPath();
  ink.moveTo(...from);
  ink.lineTo(...to);
  ink.stroke();
  changed();
  schedule(DEBOUNCE_MS);
}

// Pointer events cover the mouse, pens and touch alike.
pad.addEventListener('pointerdown', (e) => {
  pad.setPointerCapture(e.pointerId);
  last = point(e);
  stroke(last, last);
});
pad.addEventListener('pointermove', (e) => {
  if (!last) return;
  const p = point(e);
  stroke(last, p);
  last = p;
});
for (const end of ['pointerup', 'pointercancel']) {
  pad.addEventListener(end, () => {
    if (!last) return;
    last = null;
    schedule(0);
  });
}

$('clear').addEventListener('click', () => {
  clearTimeout(state.timer);
  clearPad();
  clearResults();
  status('');
  settled(changed());
});

$('upload').addEventListener('change', (e) => {
  const file = e.target.files[0];
  if (!file) return;
  clearPad();
  const version = changed();
  show(api('/api/predict?stages=true', { method: 'POST', body: file }), version, () => `${file.name}`);
  e.target.value = '';
});

function showTestImage(index) {
  clearPad();
  const version = changed();
  show(api(`/api/test-images/${index}?stages=true`), version, (r) => `test image #${r.index}, a ${state.card.classes[r.class]}`);
}

$('show-index').addEventListener('click', () => showTestImage($('index').value));

$('list').addEventListener('click', async () => {
  const query = new URLSearchParams({ limit: '200' });
  if ($('class').value !== '') query.set('class', $('class').value);
  if ($('mistakes').checked) query.set('mistakes', 'true');
  try {
    const list = await api(`/api/test-images?${query}`);
    $('picks').replaceChildren(...list.images.map((img) => {
      const b = document.createElement('button');
      b.type = 'button';
      const wrong = img.class !== img.predicted;
      b.textContent = wrong ? `#${img.index} ${img.class}→${img.predicted}` : `#${img.index}`;
      b.title = `test image #${img.index}: a ${img.class}, predicted ${img.predicted}`;
      b.addEventListener('click', () => showTestImage(img.index));
      return b;
    }));
    status(`${list.matching} matching test images${list.matching > list.images.length ? `, the first ${list.images.length} listed` : ''}`);
  } catch (e) {
    status(e.message, true);
  }
});

// ---- the convolution walkthrough -------------------------------------------------------

/** A matrix as a grid of cells; returns the cells, row by row. */
function grid(container, m) {
  container.style.gridTemplateColumns = `repeat(${m[0].length}, auto)`;
  const cells = m.map((row) => row.map((v) => {
    const cell = document.createElement('span');
    cell.textContent = fmt(v);
    return cell;
  }));
  container.replaceChildren(...cells.flat());
  return cells;
}

/** The classic example, one multiplication per step: the window lights up, the running sum
 *  grows term by term, and the output cell fills in when the window is done. */
const classic = { walk: null, step: 0, cells: null, out: null, timer: null };

function classicReset() {
  clearInterval(classic.timer);
  classic.timer = null;
  classic.step = 0;
  const w = classic.walk;
  classic.cells = grid($('classic-input'), w.input);
  grid($('classic-filter'), w.filter);
  classic.out = grid($('classic-output'), w.output.map((row) => row.map(() => 0)));
  classic.out.flat().forEach((c) => { c.textContent = ''; });
  $('classic-sum').innerHTML = '&nbsp;';
}

function classicStep() {
  const w = classic.walk;
  const k = w.filter.length;
  const l = w.filter[0].length;
  const terms = k * l;
  if (classic.step >= w.windows.length * terms) return false;
  const window = w.windows[Math.floor(classic.step / terms)];
  const t = classic.step % terms;
  const [y, x] = [window.row * w.stride, window.col * w.stride];
  classic.cells.flat().forEach((c) => c.classList.remove('lit'));
  for (let a = 0; a < k; a++) for (let b = 0; b < l; b++) classic.cells[y + a][x + b].classList.add('lit');
  const shown = window.terms.slice(0, t + 1);
  const running = shown.reduce((s, [v, f]) => s + v * f, 0);
  const text = shown.map(([v, f]) => `(${fmt(v)}*${fmt(f)})`).join(' + ');
  $('classic-sum').textContent = `window (${window.row},${window.col}): ${text} = ${fmt(running)}`;
  if (t === terms - 1) {
    const cell = classic.out[window.row][window.col];
    cell.textContent = fmt(window.sum);
    cell.classList.add('done');
  }
  classic.step += 1;
  return true;
}

$('classic-step').addEventListener('click', () => classicStep());
$('classic-reset').addEventListener('click', () => classicReset());
$('classic-play').addEventListener('click', () => {
  if (classic.step >= classic.walk.windows.length * 9) classicReset();
  clearInterval(classic.timer);
  classic.timer = setInterval(() => { if (!classicStep()) clearInterval(classic.timer); }, 180);
});

/** Cells of `m` into a canvas, `zoom` pixels each, with an optional box around a window. */
function drawCells(canvas, m, zoom, box) {
  const values = m.flat();
  const signed = values.some((v) => v < 0);
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const scale = signed ? Math.max(-lo, hi) || 1 : hi - lo || 1;
  canvas.width = m[0].length * zoom;
  canvas.height = m.length * zoom;
  const ctx = canvas.getContext('2d');
  m.forEach((row, y) => row.forEach((v, x) => {
    const g = Math.round(signed ? 127.5 + (127.5 * v) / scale : (255 * (v - lo)) / scale);
    ctx.fillStyle = Number.isNaN(v) ? '#eef' : `rgb(${g},${g},${g})`;
    ctx.fillRect(x * zoom, y * zoom, zoom, zoom);
  }));
  if (box) {
    ctx.strokeStyle = '#f5b400';
    ctx.lineWidth = 2;
    ctx.strokeRect(box[1] * zoom, box[0] * zoom, box[3] * zoom, box[2] * zoom);
  }
}

/** The 28x28 digit inside a 32x32 input `seen`, pixels scaled to 0-9 as `lenet5 conv --preset` does. */
const digitCells = (seen) => Array.from({ length: 28 }, (_, y) => Array.from({ length: 28 }, (_, x) => Math.round(9 * seen[(y + 2) * 32 + x + 2])));

function blank(canvas) {
  canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
}

/** The filter's slide over your digit: the digit it shows (`seen`) and its animation frame. */
const slide = { seen: null, animation: null };

/** "Your digit" as the network tab has it now, with no output yet; a slide over the same
 *  digit, done or under way, is left as it is. */
function showDigit() {
  if (slide.seen === state.seen) return;
  cancelAnimationFrame(slide.animation);
  slide.seen = state.seen;
  if (state.seen) drawCells($('digit-input'), digitCells(state.seen), 10);
  else blank($('digit-input'));
  blank($('digit-output'));
  $('digit-filter').replaceChildren();
  $('digit-sum').innerHTML = '&nbsp;';
}

$('digit-play').addEventListener('click', async () => {
  cancelAnimationFrame(slide.animation);
  if (!state.seen) {
    $('digit-sum').textContent = 'draw or pick a digit first (on the other tab)';
    return;
  }
  let walk;
  try {
    walk = await api('/api/conv', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ input: digitCells(state.seen), preset: $('preset').value }) });
  } catch (e) {
    $('digit-sum').textContent = e.message;
    return;
  }
  grid($('digit-filter'), walk.filter);
  const [k, l] = [walk.filter.length, walk.filter[0].length];
  const output = walk.output.map((row) => row.map(() => NaN));
  let next = 0;
  const frame = () => {
    // Four windows a frame: the 676 windows of a 28x28 digit take about three seconds.
    for (let i = 0; i < 4 && next < walk.windows.length; i++, next++) {
      const w = walk.windows[next];
      output[w.row][w.col] = w.sum;
    }
    const w = walk.windows[next - 1];
    drawCells($('digit-input'), walk.input, 10, [w.row * walk.stride, w.col * walk.stride, k, l]);
    drawCells($('digit-output'), output.map((row) => row.map((v) => (Number.isNaN(v) ? 0 : v))), 10);
    $('digit-sum').textContent = `window (${w.row},${w.col}) = ${fmt(w.sum)}   (${next} of ${walk.windows.length} windows)`;
    if (next < walk.windows.length) slide.animation = requestAnimationFrame(frame);
  };
  frame();
});

// ---- tabs and start-up -----------------------------------------------------------------

for (const tab of document.querySelectorAll('.tab')) {
  tab.addEventListener('click', () => {
    document.querySelectorAll('.tab').forEach((t) => t.classList.toggle('active', t === tab));
    document.querySelectorAll('.view').forEach((v) => { v.hidden = v.id !== tab.dataset.view; });
    if (tab.dataset.view === 'convolution') showDigit();
  });
}

async function start() {
  clearPad();
  try {
    const [card, filters, walk] = await Promise.all([api('/api/model'), api('/api/filters'), api('/api/conv')]);
    state.card = card;
    const accuracy = card.metrics ? `, ${(100 * card.metrics.test_accuracy).toFixed(2)}% on the test set` : '';
    $('model-line').textContent = `LeNet-5 (${card.model.arch}, ${card.model.head} head) trained on ${card.dataset}${accuracy}; the direct engine answers`;
    $('class').append(...card.classes.map((name, c) => new Option(name, String(c))));
    describeStages(card.model.arch);
    const [count, , rows, cols] = filters.shape;
    maps($('filters'), filters.weight, count, rows, cols, ZOOM.filters, true, (m) => `${m + 1}: bias ${fmt(filters.bias[m])}`);
    classic.walk = walk;
    classicReset();
    document.body.dataset.ready = 'true';
  } catch (e) {
    status(`cannot reach the server: ${e.message}`, true);
  }
}

start();
