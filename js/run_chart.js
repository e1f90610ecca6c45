// FastGuidance: after each sampling run, draw on the FastGuidance node what happened at every model
// call: the cosine of the prompt and negative predictions (with AG's threshold), a strip coloured by
// the action taken (full CFG, reused, estimated, cond only, single pass) and the evaluations saved.
// Data shaping is in run_chart_data.js (unit-tested); this file only listens and draws.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  ACTION_COLORS, ACTION_LABELS, callX, cosineRange, runBelongsTo, shapeRun, valueY, wrapText,
} from "./run_chart_data.js";

const RUN_EVENT = "fastguidance.run";
const PREFIX = "FastGuidance_";
const CHART_HEIGHT = 150;
const MIN_WIDTH = 300;
const MARGIN = 10;
const ADVICE_LINE = 13; // px per line of a run's advice (AG cut at its first step, or never)
const ADVICE_CHARS = 52; // characters per advice line at the chart's minimum width
const CACHED_COLOR = "#cccccc"; // bar under calls a step cache answered

function findNode(id) {
  const graph = app.graph;
  if (!graph?.getNodeById || id === undefined || id === null) return null;
  return graph.getNodeById(id) ?? graph.getNodeById(Number(id)) ?? null;
}

function isOurs(node) {
  return String(node?.comfyClass || node?.type || "").startsWith(PREFIX);
}

function onRun({ detail }) {
  const node = findNode(detail?.node);
  if (!isOurs(node)) return; // never touch other packs' nodes
  if (!runBelongsTo(detail, node.comfyClass || node.type)) return;
  const chart = shapeRun(detail);
  if (!chart) return;
  chart.adviceLines = chart.advice.flatMap((text) => wrapText(`⚠ ${text}`, ADVICE_CHARS));
  node.fastguidanceChart = chart;
  const minimum = node.computeSize?.() ?? node.size;
  const height = Math.max(node.size[1], minimum[1] + CHART_HEIGHT + chart.adviceLines.length * ADVICE_LINE);
  node.setSize?.([Math.max(node.size[0], MIN_WIDTH), height]);
  node.setDirtyCanvas?.(true, true);
}

function drawChart(ctx, node, chart) {
  const width = node.size[0] - 2 * MARGIN;
  const adviceLines = chart.adviceLines || [];
  let y = node.size[1] - CHART_HEIGHT - adviceLines.length * ADVICE_LINE + 4;
  const left = MARGIN;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  ctx.fillStyle = "#ddd";
  ctx.fillText(chart.summary || `${chart.calls.length} model calls`, left, y + 6, width);
  y += 16;

  // cosine per call, with AG's threshold dashed
  const plotHeight = 56;
  ctx.strokeStyle = "#555";
  ctx.lineWidth = 1;
  ctx.strokeRect(left, y, width, plotHeight);
  const range = cosineRange(chart.calls, chart.threshold);
  if (chart.threshold !== null) {
    const ty = valueY(chart.threshold, range, y, plotHeight);
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = "#e0a030";
    ctx.beginPath();
    ctx.moveTo(left, ty);
    ctx.lineTo(left + width, ty);
    ctx.stroke();
    ctx.setLineDash([]);
  }
  if (chart.hasCosine) {
    ctx.strokeStyle = "#9fd0ff";
    ctx.fillStyle = "#9fd0ff";
    ctx.beginPath();
    let drawing = false;
    chart.calls.forEach((call, index) => {
      if (call.cosine === null) return;
      const px = callX(index, chart.calls.length, left, width);
      const py = valueY(call.cosine, range, y, plotHeight);
      if (drawing) ctx.lineTo(px, py);
      else ctx.moveTo(px, py);
      drawing = true;
    });
    ctx.stroke();
    chart.calls.forEach((call, index) => {
      if (call.cosine === null) return;
      ctx.fillRect(callX(index, chart.calls.length, left, width) - 1.5,
        valueY(call.cosine, range, y, plotHeight) - 1.5, 3, 3);
    });
    ctx.fillStyle = "#aaa";
    ctx.fillText(`cos ${range[1].toFixed(4)}`, left + 3, y + 7);
    ctx.fillText(`${range[0].toFixed(4)}`, left + 3, y + plotHeight - 7);
  } else {
    ctx.fillStyle = "#888";
    ctx.fillText("no cosine measured (add Adaptive Guidance to see it)", left + 6, y + plotHeight / 2, width - 12);
  }
  y += plotHeight + 4;

  // action strip: one row per sample (the first few of a large batch)
  const cell = width / chart.calls.length;
  const rowHeight = Math.max(4, Math.min(9, 28 / chart.rows));
  const stripTop = y;
  for (let row = 0; row < chart.rows; row++) {
    chart.calls.forEach((call, index) => {
      ctx.fillStyle = ACTION_COLORS[call.actions[row]] || "#777";
      ctx.fillRect(left + index * cell, y, Math.max(1, cell - 1), rowHeight - 1);
    });
    y += rowHeight;
  }
  // calls a step cache (EasyCache) answered without the model: dimmed, with a bar under them
  chart.calls.forEach((call, index) => {
    if (!call.cached) return;
    ctx.fillStyle = "rgba(20, 20, 20, 0.55)";
    ctx.fillRect(left + index * cell, stripTop, Math.max(1, cell - 1), y - stripTop - 1);
    ctx.fillStyle = CACHED_COLOR;
    ctx.fillRect(left + index * cell, y, Math.max(1, cell - 1), 2);
  });
  if (chart.batch > chart.rows) {
    ctx.fillStyle = "#888";
    ctx.fillText(`first ${chart.rows} of ${chart.batch} images`, left, y + 6);
    y += 12;
  }
  y += 8;

  // legend
  let x = left;
  for (const action of chart.legend) {
    ctx.fillStyle = ACTION_COLORS[action];
    ctx.fillRect(x, y - 4, 8, 8);
    ctx.fillStyle = "#ccc";
    const label = ACTION_LABELS[action] || action;
    ctx.fillText(label, x + 11, y);
    x += 18 + ctx.measureText(label).width;
  }
  if (chart.hasCached) {
    ctx.fillStyle = CACHED_COLOR;
    ctx.fillRect(x, y - 1, 8, 2);
    ctx.fillStyle = "#ccc";
    ctx.fillText("from cache", x + 11, y);
  }
  y += 12;

  // what went wrong in a way the user can fix, with the fix (also in the server log)
  ctx.fillStyle = "#ffb347";
  for (const line of adviceLines) {
    y += ADVICE_LINE;
    ctx.fillText(line, left, y - 6, width);
  }
  ctx.restore();
}

app.registerExtension({
  name: "FastGuidance.RunChart",
  setup() {
    api.addEventListener(RUN_EVENT, onRun);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name || "").startsWith(PREFIX)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (this.fastguidanceChart && !this.flags?.collapsed) {
        try {
          drawChart(ctx, this, this.fastguidanceChart);
        } catch (error) {
          console.warn("FastGuidance: could not draw the run chart", error);
          this.fastguidanceChart = null;
        }
      }
      return result;
    };
  },
});
