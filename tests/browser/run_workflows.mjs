// Drives the real ComfyUI frontend in Debian's Chromium (playwright-core, no browser download):
// opens every example workflow of the pack, shrinks it for a CPU (steps, image size, calibration
// runs), queues it, waits for the run, checks that FastGuidance's chart was drawn on the patch
// nodes and that the loaders list the files made earlier in the page session, takes a screenshot, and
// reports page errors. Called by tests/comfy/test_browser.py.
//
//   node tests/browser/run_workflows.mjs <server url> <output folder> <chromium path> <pack folder>
//
// Prints one JSON object on stdout: {workflows: [{name, ok, error, charts, loaders, laterRun, screenshot}],
// errors, reload}.
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
  // where it was logged: the frontend's /assets/ or the pack's /extensions/<pack>/ files
  const where = String(message.location()?.url || "").replace(/^https?:\/\/[^/]+/, "");
  if (message.type() === "error") errors.push(`console: ${message.text()} @ ${where}`);
});

async function openApp() {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.api
    && window.LiteGraph?.registered_node_types?.["FastGuidance_AdaptiveGuidance"], null, { timeout: 120_000 });
  await page.waitForTimeout(1500); // extensions finish registering
  // the screenshots show the nodes' text at any zoom (by default the frontend draws plain boxes once
  // text would be under 8 px, and a large workflow fits the window below that)
  await page.evaluate(() => window.app.extensionManager.setting?.set?.("LiteGraph.Canvas.MinFontSizeForLOD", 0));
}

async function execute(command) {
  await page.evaluate((id) => window.app.extensionManager.command.execute(id), command);
}

async function visible(locator) {
  return (await locator.count()) > 0 && locator.first().isVisible().catch(() => false);
}

async function openPackTemplates() {
  // Both frontends list the pack's example_workflows under its folder name: 1.27 in "Get Started with
  // a Template" (Custom Nodes → <pack>), 1.49 in "Templates" (Extensions → <pack>, a group that may be
  // folded; the dialog opens by itself at start). Go by what the page shows, not by its version.
  const packItem = page.getByText(packFolder, { exact: true });
  const deadline = Date.now() + 60_000;
  let asked = false;
  while (Date.now() < deadline) {
    if (await visible(packItem)) {
      await packItem.first().click();
      return;
    }
    const group = page.locator('[role="dialog"]').getByText(/^(Extensions|Custom Nodes)$/);
    if (await visible(group)) {
      await group.first().click();
    } else if (!asked && !(await visible(page.locator('[role="dialog"]')))) {
      await execute("Comfy.BrowseTemplates");
      asked = true;
    }
    await page.waitForTimeout(500);
  }
  throw new Error(`the template browser shows no "${packFolder}" entry`);
}

async function loadTemplate(name) {
  // Through the template browser, as a user does: Templates → <pack> → the card.
  await page.evaluate(() => { window.fastguidanceOldNodes = new Set(window.app.graph.nodes); });
  await openPackTemplates();
  const card = page.locator(`[data-testid="template-workflow-${name}"]`).first();
  // the grid shows its first cards and loads more as it is scrolled
  for (let i = 0; i < 20 && !(await card.count()); i++) {
    await page.mouse.move(1000, 600);
    await page.mouse.wheel(0, 1500);
    await page.waitForTimeout(400);
  }
  await card.scrollIntoViewIfNeeded();
  await card.click();
  // loaded: the graph holds new nodes and no template card is shown any more
  await page.waitForFunction(() => window.app.graph.nodes.length > 0
    && window.app.graph.nodes.every((node) => !window.fastguidanceOldNodes.has(node))
    && !document.querySelector('[data-testid^="template-workflow-"]'), null, { timeout: 60_000 });
  await page.waitForTimeout(500); // 1.49 checks the loaders' files just after the graph is configured
  await closeDialogs();
  return page.evaluate(() => window.app.graph.nodes.map((node) => node.type));
}

async function modelFiles() {
  // Every model-file choice of the workflow: whether the node's list has it, whether the node is flagged
  // (1.49 outlines a node whose file is not in its list in red; `has_errors` is that flag, also set by a
  // refused run), and whether the server has the file now (its /object_info lists each folder afresh).
  return page.evaluate(async () => {
    const app = window.app;
    const MODEL_FILE = /\.(safetensors|ckpt|pt|pth|bin|sft|gguf|onnx)$/i;
    const serverLists = {};
    const serverList = async (type, name) => {
      if (!(type in serverLists)) {
        const response = await app.api.fetchApi(`/object_info/${encodeURIComponent(type)}`);
        serverLists[type] = response.ok ? (await response.json())[type]?.input ?? {} : {};
      }
      const spec = serverLists[type].required?.[name] ?? serverLists[type].optional?.[name];
      if (Array.isArray(spec?.[0])) return spec[0]; // [[...files], options]
      return spec?.[0] === "COMBO" ? spec[1]?.options ?? [] : []; // ["COMBO", {options}] (V3 nodes on 0.33)
    };
    const files = [];
    for (const node of app.graph.nodes) {
      for (const widget of node.widgets || []) {
        if (widget.type !== "combo" || !MODEL_FILE.test(String(widget.value))) continue;
        files.push({ id: node.id, type: node.type, widget: widget.name, value: widget.value, muted: node.mode !== 0,
          pack: String(node.type).startsWith("FastGuidance_"),
          listed: Array.isArray(widget.options?.values) && widget.options.values.includes(widget.value),
          onServer: (await serverList(node.type, widget.name)).includes(widget.value),
          flagged: Boolean(node.has_errors) });
      }
    }
    return files;
  });
}

async function loaders() {
  // the pack's loaders (the host's own loaders are the host's business)
  return (await modelFiles()).filter((file) => file.pack);
}

async function unmuteAll() {
  // "muted for later runs": select the workflow's muted nodes and unmute them with the host's command
  return page.evaluate(async () => {
    const app = window.app;
    const muted = app.graph.nodes.filter((node) => node.mode === 2);
    if (!muted.length) return [];
    app.canvas.selectNodes(muted);
    await app.extensionManager.command.execute("Comfy.Canvas.ToggleSelectedNodes.Mute");
    app.canvas.deselectAll?.();
    return muted.filter((node) => node.mode === 0).map((node) => node.type);
  });
}

async function closeDialogs() {
  // e.g. the frontend's "missing models" dialog, which lists the checkpoint's download address
  for (let i = 0; i < 3 && await page.locator(".p-dialog").count(); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
  }
}

async function shrinkForCpu() {
  // Same graph, CPU-sized: 3 steps, 64×64 images (video latents: 5 frames), one calibration run.
  await page.evaluate(() => {
    const STEPS = 3;
    const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
    const set = (node, name, value) => {
      const widget = widgetOf(node, name);
      if (widget) widget.value = value;
    };
    for (const node of window.app.graph.nodes) {
      if (node.type === "KSamplerAdvanced") {
        // a two-stage workflow (Wan 2.2's high- and low-noise models) keeps each stage's share of the steps;
        // end_at_step 10000 means "to the end"
        const steps = widgetOf(node, "steps")?.value;
        const scale = (name) => {
          const widget = widgetOf(node, name);
          if (widget && steps && widget.value < steps) widget.value = Math.round((widget.value * STEPS) / steps);
        };
        scale("start_at_step");
        scale("end_at_step");
      }
      if (["KSampler", "KSamplerAdvanced", "BasicScheduler", "FastGuidance_LinearAGCalibrate",
        "FastGuidance_Tune"].includes(node.type)) {
        set(node, "steps", STEPS);
      }
      if (/^Empty.*Latent/.test(node.type)) { // EmptyLatentImage, EmptySD3LatentImage, Empty…LatentVideo
        set(node, "width", 64);
        set(node, "height", 64);
        set(node, "length", 5);
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

async function freshCache() {
  // A fresh cache for the next workflow: identical nodes would otherwise be served from this run's cache
  // (ComfyUI 0.3.64 leaves V3 node ids out of the cache key; 0.33 keeps results across prompts), and a cached
  // run draws nothing. POST /free only sets a flag that the server's worker reads after its next prompt (or
  // when idle), so a workflow queued at once could still run on the old cache on a busy machine. A tiny
  // prompt queued behind the request closes that race: the worker reads the flag in the same turn in which
  // it finishes this prompt, before it takes the next one. Its messages go to a client id no page has.
  await page.evaluate(async () => {
    await fetch("/free", { method: "POST", body: JSON.stringify({ free_memory: true }) });
    const prompt = { 1: { class_type: "EmptyImage", inputs: { width: 8, height: 8, batch_size: 1, color: 0 } },
      2: { class_type: "PreviewImage", inputs: { images: ["1", 0] } } };
    const queued = await fetch("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt, client_id: "fastguidance-browser-test-cache-reset" }) });
    const { prompt_id: id } = await queued.json();
    for (let i = 0; i < 1200; i++) {
      if ((await (await fetch(`/history/${id}`)).json())[id]) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error("the cache reset's prompt did not finish within 2 minutes");
  });
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
  const entry = { name, ok: false, error: null, charts: [], screenshot: null, nodes: [], loaders: [], pageErrors: [] };
  const errorsBefore = errors.length;
  try {
    entry.nodes = await loadTemplate(name);
    // files made by the workflows run before (calibration, training) are in the loaders' lists
    const files = await modelFiles();
    entry.loaders = files.filter((file) => file.pack);
    // a workflow for models this server lacks (e.g. Wan 2.2) is opened and checked, not run
    entry.missingModels = files.filter((file) => !file.muted && !file.onServer).map((file) => file.value);
    if (entry.missingModels.length) {
      entry.notRun = true;
      entry.screenshot = join(outDir, `${name}.png`);
      await page.screenshot({ path: entry.screenshot });
      throw new Error(`not run: the server has no ${entry.missingModels.join(", ")}`);
    }
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
    // nodes muted "for later runs" (Tune's preset loader): unmuted in the same page, they list the file
    // this run wrote, are not flagged, and run
    const unmuted = entry.ok ? await unmuteAll() : [];
    if (unmuted.length) {
      await page.waitForTimeout(1000); // 1.49 checks an unmuted node's files at once
      const later = { unmuted, loaders: await loaders() };
      Object.assign(later, await queueAndWait());
      entry.laterRun = later;
    }
  } catch (error) {
    entry.error = String(error?.message || error);
  }
  entry.pageErrors = errors.slice(errorsBefore);
  workflows.push(entry);
  await freshCache();
}

// A reload must not raise errors (the chart data lives only in the page).
const before = errors.length;
await page.reload({ waitUntil: "domcontentloaded" });
await page.waitForFunction(() => window.app?.graph, null, { timeout: 120_000 });
await page.waitForTimeout(2000);
const reload = { errors: errors.slice(before) };

await browser.close();
process.stdout.write(JSON.stringify({ workflows, errors, startupErrors, reload }) + "\n");
