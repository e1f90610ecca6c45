// FastGuidance: pure data shaping for the per-step run chart (no DOM, no ComfyUI imports), so that
// Node's built-in test runner checks it in CI (tests/js/). The drawing lives in run_chart.js.
//
// Input: the "fastguidance.run" message the backend sends after each sampling run
// ({node, policies, total_steps, batch_size, summary, records}; see fastguidance/engine.py).

/** Colour of each engine action (and of the single-pass adapter step), shared by strip and legend. */
export const ACTION_COLORS = Object.freeze({
  full: "#4a90d9",
  reuse: "#a070e0",
  estimate: "#3cb371",
  cond_only: "#e0a030",
  adapter: "#d95f5f",
});

/** Words shown in the legend for each action. */
export const ACTION_LABELS = Object.freeze({
  full: "full CFG",
  reuse: "reused",
  estimate: "estimated",
  cond_only: "cond only",
  adapter: "single pass",
});

/** The method each FastGuidance node adds to the engine (the run message lists them in `policies`). */
export const NODE_METHODS = Object.freeze({
  FastGuidance_AdaptiveGuidance: "ag",
  FastGuidance_AdaptiveGuider: "ag",
  FastGuidance_CompressGuidance: "compg",
  FastGuidance_CompressGuider: "compg",
  FastGuidance_LinearAG: "linear_ag",
  FastGuidance_LoadGuidanceAdapter: "agd",
});

/**
 * Whether a run message belongs on a node of this type. ComfyUI 0.3.64 leaves the node id out of
 * the cache key of V3 nodes, so a patch cached from another workflow can report under an id that,
 * here, is a different node: draw only where the node's own method took part in the run.
 */
export function runBelongsTo(detail, nodeType) {
  const method = NODE_METHODS[nodeType];
  return Boolean(method) && (detail?.policies || []).some((policy) => policy?.method === method);
}

/** Most samples drawn as separate strip rows; larger batches draw the first ones. */
export const MAX_STRIP_ROWS = 4;

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/** Mean of the finite numbers in `values`, or null when there is none. */
export function meanOf(values) {
  const finite = (values || []).filter(isNumber);
  return finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : null;
}

/**
 * "model evaluations: 38 of 60 (1.58× fewer)" from a run summary (batch evaluations); beside a step
 * cache (EasyCache, LazyCache) the evaluations it answered are named: "… (2.50× fewer; EasyCache answered 4)".
 */
export function summaryLine(summary) {
  if (!summary || !isNumber(summary.evaluations) || !isNumber(summary.cfg_evaluations)) return "";
  const speedup = summary.evaluations > 0 ? summary.cfg_evaluations / summary.evaluations : 1;
  const cache = isNumber(summary.cached) && summary.cached > 0
    ? `; ${summary.cache_name || "a step cache"} answered ${summary.cached}` : "";
  return `model evaluations: ${summary.evaluations} of ${summary.cfg_evaluations} (${speedup.toFixed(2)}× fewer${cache})`;
}

/** The AG threshold of the run, if an Adaptive Guidance policy took part (for the dashed line). */
export function agThreshold(policies) {
  const ag = (policies || []).find((policy) => policy && policy.method === "ag" && isNumber(policy.threshold));
  return ag && ag.threshold <= 1 ? ag.threshold : null;
}

/**
 * Shape a run message into what the chart draws, or null when there is nothing to draw.
 * One entry per model call (midpoint samplers make two calls per step).
 */
export function shapeRun(detail) {
  const records = Array.isArray(detail?.records) ? detail.records : [];
  if (!records.length) return null;
  const batch = Math.max(1, Number(detail.batch_size) || records[0].actions?.length || 1);
  const rows = Math.min(batch, MAX_STRIP_ROWS);
  const calls = records.map((record) => {
    const actions = Array.isArray(record.actions) ? record.actions : [];
    return {
      call: record.call,
      step: record.step,
      sigma: record.sigma,
      actions: Array.from({ length: rows }, (_, sample) => actions[sample] in ACTION_COLORS ? actions[sample] : "full"),
      cosine: meanOf(record.cosine),
      cached: isNumber(record.cached) && record.cached > 0, // a step cache answered this call's evaluations
    };
  });
  const present = new Set(calls.flatMap((call) => call.actions));
  return {
    methods: (detail.policies || []).map((policy) => policy?.method).filter(Boolean).join("+"),
    summary: summaryLine(detail.summary),
    threshold: agThreshold(detail.policies),
    rows,
    batch,
    calls,
    legend: Object.keys(ACTION_COLORS).filter((action) => present.has(action)),
    hasCosine: calls.some((call) => call.cosine !== null),
    hasCached: calls.some((call) => call.cached),
    advice: (Array.isArray(detail.advice) ? detail.advice : []).filter((text) => typeof text === "string" && text),
  };
}

/** `text` broken into lines of at most `width` characters, at spaces where possible (advice under the chart). */
export function wrapText(text, width) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/).filter(Boolean)) {
    for (let rest = word; rest; ) {
      const candidate = line ? `${line} ${rest}` : rest;
      if (candidate.length <= width) {
        line = candidate;
        rest = "";
      } else if (line) {
        lines.push(line);
        line = "";
      } else {
        lines.push(rest.slice(0, width));
        rest = rest.slice(width);
      }
    }
  }
  if (line) lines.push(line);
  return lines;
}

/** Vertical range of the cosine plot: the measured values and the threshold, padded, never above 1. */
export function cosineRange(calls, threshold) {
  const values = calls.map((call) => call.cosine).filter(isNumber);
  if (isNumber(threshold)) values.push(threshold);
  if (!values.length) return [0, 1];
  let low = Math.min(...values);
  let high = Math.max(...values);
  const pad = Math.max((high - low) * 0.1, 1e-4);
  low -= pad;
  high = Math.min(1, high + pad);
  if (high <= low) low = high - 2 * pad;
  return [low, high];
}

/** x of the centre of call `index` of `count` in a plot from `left` to `left + width`. */
export function callX(index, count, left, width) {
  return left + ((index + 0.5) * width) / Math.max(count, 1);
}

/** y of `value` in a plot from `top` (value = high) to `top + height` (value = low). */
export function valueY(value, [low, high], top, height) {
  const span = high - low || 1;
  return top + ((high - value) / span) * height;
}
