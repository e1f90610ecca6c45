// Drives the real ComfyUI frontend in Debian's Chromium (playwright-core, no browser download):
// opens every example workflow of the pack, shrinks it for a CPU (steps, image size, calibration
// runs), queues it, waits for the run, checks that FastGuidance's chart was drawn on the patch
// nodes, takes a screenshot, and reports page errors. Called by tests/comfy/test_browser.py.
//
//   node tests/browser/run_workflows.mjs <server url> <output folder> <chromium path> <pack folder>
//
// Prints one JSON object on stdout: {workflows: [{name, ok, error, charts, screenshot}], errors, reload}.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, outDir, executablePath, packFolder] = process.argv.slice(2);
const RUN_TIMEOUT_MS = 300_000;
//: node types whose runs send the chart (the calibrate node samples through an anonymous patch)
const CHART_NODES = new Set(["FastGuidance_AdaptiveGuidance", "FastGuidance_AdaptiveGuider",
  "FastGuidance_CompressGuidance", "FastGuidance_CompressGuider", "FastGuidance_LinearAG",
  "FastGuidance_LoadGuidanceAdapter"]);

mkdirSync(outDir, { recursive: true });
const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1700, height: 1000 } });
const errors = [];
page.on("pageerror", (error) => errors.push(`pageerror: ${error.message} @ ${String(error.stack || "").split("\n").slice(1, 4).join(" / ")}`));
page.on("console", (message) => {
  if (message.type() === "error") errors.push(`console: ${message.text()}`);
});

async function openApp() {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.api
    && window.LiteGraph?.registered_node_types?.["FastGuidance_AdaptiveGuidance"], null, { timeout: 120_000 });
  await page.waitForTimeout(1500); // extensions finish registering
}

async function loadTemplate(name) {
  // Through the template browser, as a user does: Templates → Custom Nodes → <pack> → the card.
  const dialogTitle = page.getByText("Get Started with a Template");
  if (!(await dialogTitle.count())) {
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    await dialogTitle.first().waitFor({ timeout: 30_000 });
  }
  await page.getByText(packFolder, { exact: true }).first().click();
  const card = page.locator(`[data-testid="template-workflow-${name}"]`).first();
  // the grid shows its first cards and loads more as it is scrolled
  for (let i = 0; i < 20 && !(await card.count()); i++) {
    await page.getByText(packFolder, { exact: true }).first().waitFor();
    await page.mouse.move(1000, 600);
    await page.mouse.wheel(0, 1500);
    await page.waitForTimeout(400);
  }
  await card.scrollIntoViewIfNeeded();
  await card.click();
  await page.waitForFunction((expected) => window.app.graph.nodes.length > 0
    && !document.body.innerText.includes("Get Started with a Template"), name, { timeout: 60_000 });
  await closeDialogs();
  return page.evaluate(() => window.app.graph.nodes.map((node) => node.type));
}

async function closeDialogs() {
  // e.g. the frontend's "missing models" dialog, which lists the checkpoint's download address
  for (let i = 0; i < 3 && await page.locator(".p-dialog").count(); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

async function shrinkForCpu() {
  // Same graph, CPU-sized: 3 steps, 64×64 images, one calibration run.
  await page.evaluate(() => {
    const set = (node, name, value) => {
      const widget = node.widgets?.find((w) => w.name === name);
      if (widget) widget.value = value;
    };
    for (const node of window.app.graph.nodes) {
      if (["KSampler", "KSamplerAdvanced", "BasicScheduler", "FastGuidance_LinearAGCalibrate",
        "FastGuidance_Tune"].includes(node.type)) {
        set(node, "steps", 3);
      }
      if (node.type === "EmptyLatentImage") {
        set(node, "width", 64);
        set(node, "height", 64);
      }
      if (node.type === "FastGuidance_LinearAGCalibrate") set(node, "runs", 1);
      if (node.type === "FastGuidance_TrainGuidanceAdapter") {
        set(node, "trajectories", 2);
        set(node, "steps", 3);
        set(node, "train_steps", 2);
        set(node, "batch", 2);
        set(node, "width", 64);
        set(node, "height", 64);
      }
      if (node.type === "FastGuidance_TrainStepPredictor") {
        set(node, "iterations", 2);
        set(node, "batch", 2);
        set(node, "width", 96);
        set(node, "height", 96);
        set(node, "step_options", "2, 3");
      }
    }
  });
}

async function queueAndWait() {
  return page.evaluate((timeout) => new Promise((resolve) => {
    const api = window.app.api;
    let started = false;
    const finish = (result) => {
      api.removeEventListener("execution_start", onStart);
      api.removeEventListener("execution_success", onSuccess);
      api.removeEventListener("execution_error", onError);
      clearTimeout(timer);
      clearTimeout(startTimer);
      resolve(result);
    };
    const onStart = () => { started = true; };
    const onSuccess = () => finish({ ok: true });
    const onError = ({ detail }) => finish({ ok: false, error: `${detail?.node_type}: ${detail?.exception_message}` });
    const timer = setTimeout(() => finish({ ok: false, error: "timed out" }), timeout);
    // a workflow the server refuses (validation) never starts: say so instead of waiting for the timeout
    const startTimer = setTimeout(() => {
      if (!started) finish({ ok: false, error: "the run did not start (refused by validation?)" });
    }, 60_000);
    api.addEventListener("execution_start", onStart);
    api.addEventListener("execution_success", onSuccess);
    api.addEventListener("execution_error", onError);
    window.app.queuePrompt(0, 1).catch((error) => finish({ ok: false, error: `queue: ${error?.message || error}` }));
  }), RUN_TIMEOUT_MS);
}

async function charts() {
  return page.evaluate((chartNodes) => window.app.graph.nodes
    .filter((node) => chartNodes.includes(node.type))
    .map((node) => ({ id: node.id, type: node.type, summary: node.fastguidanceChart?.summary ?? null,
      calls: node.fastguidanceChart?.calls?.length ?? 0, height: node.size[1] })), [...CHART_NODES]);
}

async function stepCounts() {
  return page.evaluate(() => window.app.graph.nodes.filter((node) => node.type === "FastGuidance_StepPredictor")
    .map((node) => node.fastguidanceSteps ?? null));
}

async function chartCloseUps(name) {
  // A close-up of each node with a chart (the README shows them).
  const shots = [];
  const ids = await page.evaluate((chartNodes) => window.app.graph.nodes
    .filter((node) => (chartNodes.includes(node.type) && node.fastguidanceChart) || node.fastguidanceSteps)
    .map((node) => node.id), [...CHART_NODES]);
  for (const id of ids) {
    const box = await page.evaluate((nodeId) => {
      const canvas = window.app.canvas;
      const node = window.app.graph.getNodeById(nodeId);
      canvas.ds.scale = 1.4;
      canvas.centerOnNode(node);
      canvas.setDirty(true, true);
      const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
      const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
      const rect = canvas.canvas.getBoundingClientRect();
      return { x: rect.left + x - 10, y: rect.top + y - 10, width: node.size[0] * canvas.ds.scale + 20,
        height: (node.size[1] + title) * canvas.ds.scale + 20 };
    }, id);
    await page.waitForTimeout(300);
    const path = join(outDir, `${name}_chart_${id}.png`);
    await page.screenshot({ path, clip: box });
    shots.push(path);
  }
  return shots;
}

await openApp();
const startupErrors = errors.slice();
const templates = await page.evaluate(async () => (await fetch("/workflow_templates")).json());
// workflows that make a file (calibration, training) run before those that use it
const makesFile = (name) => (/calibrate|train/.test(name) ? 0 : 1);
const names = [...(templates[packFolder] || [])].sort((a, b) => makesFile(a) - makesFile(b) || a.localeCompare(b));
const workflows = [];
for (const name of names) {
  const entry = { name, ok: false, error: null, charts: [], screenshot: null, nodes: [], pageErrors: [] };
  const errorsBefore = errors.length;
  try {
    entry.nodes = await loadTemplate(name);
    await shrinkForCpu();
    const result = await queueAndWait();
    entry.ok = result.ok;
    entry.error = result.error ?? null;
    await page.waitForTimeout(500); // the run message arrives with or just after the end of the run
    entry.charts = await charts();
    entry.stepCounts = await stepCounts();
    await page.evaluate(() => window.app.canvas.setDirty(true, true));
    await page.waitForTimeout(300);
    entry.screenshot = join(outDir, `${name}.png`);
    await page.screenshot({ path: entry.screenshot });
    entry.chartShots = await chartCloseUps(name);
  } catch (error) {
    entry.error = String(error?.message || error);
  }
  entry.pageErrors = errors.slice(errorsBefore);
  workflows.push(entry);
  // a fresh cache for the next workflow: identical nodes would otherwise be served from this run's
  // cache (ComfyUI 0.3.64 leaves V3 node ids out of the cache key), and a cached run draws nothing
  await page.evaluate(() => fetch("/free", { method: "POST", body: JSON.stringify({ free_memory: true }) }));
  await page.waitForTimeout(1000);
}

// A reload must not raise errors (the chart data lives only in the page).
const before = errors.length;
await page.reload({ waitUntil: "domcontentloaded" });
await page.waitForFunction(() => window.app?.graph, null, { timeout: 120_000 });
await page.waitForTimeout(2000);
const reload = { errors: errors.slice(before) };

await browser.close();
process.stdout.write(JSON.stringify({ workflows, errors, startupErrors, reload }) + "\n");
