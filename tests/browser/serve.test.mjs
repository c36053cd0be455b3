// The page of `lenet5 serve` in a real browser: headless Chromium (Debian's, driven by
// playwright-core) draws a "1" and a "7" as mouse strokes on the canvas and reads the predicted
// digit and the probability bars back from the page, each checked against the API's own answer
// for the same canvas; then the convolution view shows the 7 and runs. The page loads with its
// icon and no console error. It saves a screenshot of the page with
// the 7 ($SERVE_SCREENSHOT, default runs/browser/serve.png; scripts/make-pictures writes
// docs/serve.png) of the model $SERVE_MODEL (default: the shipped one). Run by scripts/test-browser, which installs what it needs or says why not.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(import.meta.dirname, '..', '..');
const BIN = process.env.LENET5_BIN ?? path.join(ROOT, 'target', 'release', 'lenet5');
const CHROMIUM = process.env.LENET5_CHROMIUM ?? '/usr/bin/chromium';
const SCREENSHOT = path.resolve(ROOT, process.env.SERVE_SCREENSHOT ?? path.join('runs', 'browser', 'serve.png'));
/** The model served [default: the binary's, the shipped one]. */
const MODEL = process.env.SERVE_MODEL ? ['--model', process.env.SERVE_MODEL] : [];
/** Longest wait for the server to print its address, or for the page to show an answer. */
const TIMEOUT_MS = 60_000;

let server;
let base;
let context;
let page;
let profile;
/** Console errors and uncaught exceptions of the page, from its first load on. */
const consoleErrors = [];

/** Starts `lenet5 serve --port 0` and resolves with its address once it prints it. */
function startServer() {
  return new Promise((resolve, reject) => {
    server = spawn(BIN, ['serve', '--port', '0', ...MODEL], { cwd: ROOT, env: { ...process.env, OMP_NUM_THREADS: '1' } });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => reject(new Error(`no address from lenet5 serve in ${TIMEOUT_MS} ms:\n${stderr}`)), TIMEOUT_MS);
    server.stdout.on('data', (chunk) => {
      stdout += chunk;
      const found = stdout.match(/http:\/\/(127\.0\.0\.1:\d+)\//);
      if (found) {
        clearTimeout(timer);
        resolve(`http://${found[1]}`);
      }
    });
    server.stderr.on('data', (chunk) => { stderr += chunk; });
    server.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`lenet5 serve exited (${code}) before serving:\n${stderr}`));
    });
  });
}

// Whatever happens, the server does not outlive the test.
process.on('exit', () => server?.kill('SIGKILL'));

before(async () => {
  base = await startServer();
  profile = mkdtempSync(path.join(tmpdir(), 'lenet5-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 1080 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(`${m.text()} (${m.location().url})`); });
  page.on('pageerror', (e) => consoleErrors.push(e.message));
  await page.goto(`${base}/`);
  await page.waitForFunction(() => document.body.dataset.ready === 'true', null, { timeout: TIMEOUT_MS });
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  if (server && server.exitCode === null) {
    const exited = new Promise((resolve) => server.once('exit', resolve));
    server.kill('SIGINT'); // Ctrl-C: the server stops cleanly
    const timer = setTimeout(() => server.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
});

/** Mouse strokes on the drawing pad, in its own 280x280 coordinates. */
async function draw(strokes) {
  const box = await page.locator('#pad').boundingBox();
  const at = ([x, y]) => [box.x + (x * box.width) / 280, box.y + (y * box.height) / 280];
  for (const stroke of strokes) {
    await page.mouse.move(...at(stroke[0]));
    await page.mouse.down();
    for (const p of stroke.slice(1)) await page.mouse.move(...at(p), { steps: 12 });
    await page.mouse.up();
  }
  // Every change has a version; the page marks the one whose answer it shows.
  await page.waitForFunction(() => document.body.dataset.rendered === document.body.dataset.drawn, null, { timeout: TIMEOUT_MS });
}

/** What the page shows: the predicted digit and the probability of each bar. */
async function shown() {
  const prediction = await page.locator('#prediction').textContent();
  const bars = await page.$$eval('#probabilities .bar', (els) => els.map((b) => ({ class: Number(b.dataset.class), p: Number(b.dataset.probability), best: b.classList.contains('best'), height: b.getBoundingClientRect().height })));
  return { prediction, bars };
}

/** The API's answer for the canvas as it is now. */
async function apiAnswer() {
  const url = await page.evaluate(() => document.getElementById('pad').toDataURL('image/png'));
  const png = Buffer.from(url.split(',')[1], 'base64');
  const response = await fetch(`${base}/api/predict`, { method: 'POST', headers: { 'Content-Type': 'image/png' }, body: png });
  assert.equal(response.status, 200);
  return response.json();
}

async function checkDigit(digit, strokes) {
  await page.click('#clear');
  assert.equal(await page.locator('#prediction').textContent(), '–');
  await draw(strokes);
  const { prediction, bars } = await shown();
  assert.equal(prediction, String(digit), `the page predicts ${prediction} for the drawn ${digit}`);
  assert.equal(bars.length, 10);
  const best = bars.reduce((a, b) => (b.p > a.p ? b : a));
  assert.equal(best.class, digit);
  assert.ok(best.best && best.p > 0.5, `the ${digit} bar: ${JSON.stringify(best)}`);
  assert.ok(bars.every((b) => b.height <= best.height), 'the tallest bar is the prediction');
  const sum = bars.reduce((s, b) => s + b.p, 0);
  assert.ok(Math.abs(sum - 1) < 1e-6, `softmax probabilities sum to ${sum}`);
  // The same canvas through the API directly: the same answer, to the last digit.
  const answer = await apiAnswer();
  assert.equal(answer.prediction, digit);
  bars.forEach((b) => assert.equal(b.p, answer.probabilities[b.class], `class ${b.class}`));
  // Every stage is drawn: 1 input, 6 filters, 6 + 6 + 16 + 16 maps, 120 + 84 units.
  const counts = await page.evaluate(() => ['stage-input', 'filters', 'stage-C1', 'stage-S2', 'stage-C3', 'stage-S4', 'stage-F5', 'stage-F6']
    .map((id) => document.getElementById(id).children.length));
  assert.deepEqual(counts, [1, 6, 6, 6, 16, 16, 120, 84]);
}

test('the page loads with its icon and no console error', async () => {
  const icon = await page.evaluate(async () => {
    const img = new Image();
    img.src = document.querySelector('link[rel="icon"]').href;
    await img.decode();
    return { src: img.src, width: img.naturalWidth, height: img.naturalHeight };
  });
  assert.deepEqual(icon, { src: `${base}/favicon.ico`, width: 32, height: 32 });
  // The browser's own request for the icon, if it made one, is done by now.
  await page.waitForLoadState('networkidle');
  assert.deepEqual(consoleErrors, []);
});

test('a 1 drawn with the mouse is read as a 1', async () => {
  await checkDigit(1, [[[140, 40], [138, 140], [136, 240]]]);
});

test('a 7 drawn with the mouse is read as a 7, and the page is photographed', async () => {
  await checkDigit(7, [[[70, 50], [140, 48], [215, 50], [170, 140], [125, 245]]]);
  mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
});

test('the convolution view shows the 7 as it opens, steps through the classic example and slides a filter over it', async () => {
  const { seen } = await apiAnswer();
  await page.click('.tab[data-view="convolution"]');
  // Before "Slide it": each of the 28x28 cells of "your digit" is the digit's pixel scaled to
  // 0-9, drawn from black (its lowest) to white (its highest).
  const cells = Array.from({ length: 28 * 28 }, (_, i) => Math.round(9 * seen[(Math.floor(i / 28) + 2) * 32 + (i % 28) + 2]));
  const [lo, hi] = [Math.min(...cells), Math.max(...cells)];
  assert.ok(hi > lo, 'the 7 is not blank');
  const shown = await page.$eval('#digit-input', (canvas) => {
    const zoom = canvas.width / 28;
    const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
    const at = (cell) => cell * zoom + Math.floor(zoom / 2);
    // Red and alpha: grey, and opaque where drawn.
    return Array.from({ length: 28 * 28 }, (_, i) => [0, 3].map((c) => data[4 * (at(Math.floor(i / 28)) * canvas.width + at(i % 28)) + c]));
  });
  const wrong = cells.filter((v, i) => shown[i].join() !== [Math.round((255 * (v - lo)) / (hi - lo)), 255].join()).length;
  assert.equal(wrong, 0, `${wrong} of the 784 cells of "your digit" are not the 7's`);
  for (let i = 0; i < 9; i++) await page.click('#classic-step');
  assert.equal(await page.locator('#classic-output span').first().textContent(), '4');
  assert.match(await page.locator('#classic-sum').textContent(), /^window \(0,0\): \(1\*1\) \+ .* = 4$/);
  for (let i = 0; i < 18; i++) await page.click('#classic-step');
  const firstRow = await page.$$eval('#classic-output span', (cells) => cells.slice(0, 3).map((c) => c.textContent));
  assert.deepEqual(firstRow, ['4', '3', '4']);
  await page.selectOption('#preset', 'edge');
  await page.click('#digit-play');
  await page.waitForFunction(() => /\(676 of 676 windows\)/.test(document.getElementById('digit-sum').textContent), null, { timeout: TIMEOUT_MS });
});

test('a picked test image is shown with its stages, and a file that is not an image gets its reason', async () => {
  await page.click('.tab[data-view="network"]');
  await page.fill('#index', '18');
  await page.click('#show-index');
  await page.waitForFunction(() => document.body.dataset.rendered === document.body.dataset.drawn, null, { timeout: TIMEOUT_MS });
  const answer = await (await fetch(`${base}/api/test-images/18`)).json();
  assert.equal(await page.locator('#prediction').textContent(), answer.label);
  assert.equal(await page.locator('#status').textContent(), `test image #18, a ${answer.class}`);
  await page.setInputFiles('#upload', { name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('this is not an image\n') });
  await page.waitForFunction(() => document.body.dataset.rendered === document.body.dataset.drawn, null, { timeout: TIMEOUT_MS });
  assert.match(await page.locator('#status.error').textContent(), /^the body: not an image this program reads/);
});
