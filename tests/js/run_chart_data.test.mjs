// Unit tests of the chart's data shaping (Node's built-in runner: `node --test tests/js/`).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  ACTION_COLORS, MAX_STRIP_ROWS, NODE_METHODS, agThreshold, callX, cosineRange, meanOf, runBelongsTo, shapeRun,
  summaryLine, valueY, wrapText,
} from "../../js/run_chart_data.js";

const run = {
  node: "7",
  policies: [{ method: "ag", threshold: 0.991 }, { method: "compg", compression: 4 }],
  total_steps: 4,
  batch_size: 2,
  summary: { calls: 4, uncond_skipped: 2, evaluations: 6, cfg_evaluations: 8, speedup: 4 / 3 },
  records: [
    { call: 0, step: 0, sigma: 14.6, actions: ["full", "full"], evaluations: 2, cosine: [0.98, 0.99] },
    { call: 1, step: 1, sigma: 7.0, actions: ["reuse", "reuse"], evaluations: 1, cosine: null },
    { call: 2, step: 2, sigma: 2.0, actions: ["full", "cond_only"], evaluations: 2, cosine: [0.995, null] },
    { call: 3, step: 3, sigma: 0.5, actions: ["cond_only", "cond_only"], evaluations: 1, cosine: null },
  ],
};

test("summary line says evaluations spent, of CFG's, and the ratio", () => {
  assert.equal(summaryLine(run.summary), "model evaluations: 6 of 8 (1.33× fewer)");
  assert.equal(summaryLine({ evaluations: 38, cfg_evaluations: 60 }), "model evaluations: 38 of 60 (1.58× fewer)");
  assert.equal(summaryLine(undefined), "");
});

test("beside a step cache the summary names what the cache answered, and the calls it answered are marked", () => {
  assert.equal(summaryLine({ evaluations: 8, cfg_evaluations: 20, cached: 4, cache_name: "EasyCache" }),
    "model evaluations: 8 of 20 (2.50× fewer; EasyCache answered 4)");
  assert.equal(summaryLine({ evaluations: 8, cfg_evaluations: 20, cached: 0, cache_name: "" }),
    "model evaluations: 8 of 20 (2.50× fewer)");
  const records = [
    { call: 0, step: 0, actions: ["full"], evaluations: 2, cached: 0, cosine: null },
    { call: 1, step: 1, actions: ["full"], evaluations: 0, cached: 2, cosine: null },
  ];
  const chart = shapeRun({ batch_size: 1, records });
  assert.deepEqual(chart.calls.map((call) => call.cached), [false, true]);
  assert.equal(chart.hasCached, true);
  assert.equal(shapeRun(run).hasCached, false);
});

test("a run is shaped per model call with mean cosines, actions per sample and a legend", () => {
  const chart = shapeRun(run);
  assert.equal(chart.methods, "ag+compg");
  assert.equal(chart.threshold, 0.991);
  assert.equal(chart.rows, 2);
  assert.deepEqual(chart.calls.map((c) => c.cosine), [0.985, null, 0.995, null]);
  assert.deepEqual(chart.calls.map((c) => c.actions), [["full", "full"], ["reuse", "reuse"], ["full", "cond_only"],
    ["cond_only", "cond_only"]]);
  assert.deepEqual(chart.legend, ["full", "reuse", "cond_only"]);
  assert.equal(chart.hasCosine, true);
});

test("nothing to draw without records; unknown actions are drawn as full", () => {
  assert.equal(shapeRun({}), null);
  assert.equal(shapeRun({ records: [] }), null);
  const chart = shapeRun({ batch_size: 1, records: [{ call: 0, step: 0, actions: ["mystery"], cosine: null }] });
  assert.deepEqual(chart.calls[0].actions, ["full"]);
  assert.equal(chart.hasCosine, false);
  assert.equal(chart.threshold, null);
});

test("large batches draw the first rows only", () => {
  const actions = Array(9).fill("full");
  const chart = shapeRun({ batch_size: 9, records: [{ call: 0, step: 0, actions, cosine: null }] });
  assert.equal(chart.rows, MAX_STRIP_ROWS);
  assert.equal(chart.batch, 9);
});

test("the threshold line only for AG with a real threshold", () => {
  assert.equal(agThreshold([{ method: "compg" }]), null);
  assert.equal(agThreshold([{ method: "ag", threshold: 1.0001 }]), null); // never cuts: no line
  assert.equal(agThreshold([{ method: "ag", threshold: 0.98 }]), 0.98);
});

test("cosine range covers values and threshold, padded, capped at 1", () => {
  const [low, high] = cosineRange([{ cosine: 0.9 }, { cosine: 0.99 }, { cosine: null }], 0.991);
  assert.ok(low < 0.9 && high <= 1 && high > 0.991);
  assert.deepEqual(cosineRange([], null), [0, 1]);
  const [flatLow, flatHigh] = cosineRange([{ cosine: 1 }], null);
  assert.ok(flatLow < flatHigh && flatHigh === 1);
});

test("geometry: calls centred in their cells, values mapped top-down", () => {
  assert.equal(callX(0, 4, 10, 400), 60);
  assert.equal(callX(3, 4, 10, 400), 360);
  assert.equal(valueY(1, [0, 1], 20, 100), 20);
  assert.equal(valueY(0, [0, 1], 20, 100), 120);
  assert.equal(meanOf([1, null, 3]), 2);
  assert.equal(meanOf([null]), null);
});

test("every action of the engine has a colour", () => {
  for (const action of ["full", "reuse", "estimate", "cond_only", "adapter"]) assert.ok(ACTION_COLORS[action]);
});

test("a run is drawn only on a node whose method took part", () => {
  assert.equal(runBelongsTo(run, "FastGuidance_AdaptiveGuidance"), true);
  assert.equal(runBelongsTo(run, "FastGuidance_CompressGuider"), true);
  assert.equal(runBelongsTo(run, "FastGuidance_LinearAG"), false);
  assert.equal(runBelongsTo(run, "FastGuidance_CompareImages"), false);
  assert.equal(runBelongsTo({}, "FastGuidance_AdaptiveGuidance"), false);
  assert.deepEqual(new Set(Object.values(NODE_METHODS)), new Set(["ag", "compg", "linear_ag", "agd"]));
});

test("a run's advice is kept for the chart, and wrapped to the chart's width", () => {
  const advice = ["Adaptive Guidance never cut guidance (highest cosine 0.99870, threshold 0.9995): fix it."];
  assert.deepEqual(shapeRun({ ...run, advice }).advice, advice);
  assert.deepEqual(shapeRun(run).advice, []);
  assert.deepEqual(shapeRun({ ...run, advice: [null, "", 3, "ok"] }).advice, ["ok"]);
  const lines = wrapText(advice[0], 20);
  assert.ok(lines.every((line) => line.length <= 20), lines.join("|"));
  assert.equal(lines.join(" "), advice[0]);
  assert.deepEqual(wrapText("abcdefghij", 4), ["abcd", "efgh", "ij"]);
  assert.deepEqual(wrapText("", 10), []);
});
