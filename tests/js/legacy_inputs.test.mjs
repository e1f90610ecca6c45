// Unit tests of the legacy values of inputs added after a node shipped (`node --test tests/js/`).
import { test } from "node:test";
import assert from "node:assert/strict";

import { LEGACY_VALUES, legacyWidgetValues } from "../../js/legacy_inputs.js";

const PATCH = ["threshold", "start_percent", "end_percent", "after_cutoff", "cosine_space", "convergence"];

test("a workflow saved before cosine_space and convergence keeps the paper's noise cosine and no convergence rule", () => {
  assert.deepEqual(legacyWidgetValues("FastGuidance_AdaptiveGuidance", 4, PATCH), [[4, "noise"], [5, 1.0]]);
});

test("a workflow saved with cosine_space keeps it and gets only the convergence rule switched off", () => {
  assert.deepEqual(legacyWidgetValues("FastGuidance_AdaptiveGuidance", 5, PATCH), [[5, 1.0]]);
});

test("a workflow that saved every input, a new node and other nodes are left alone", () => {
  assert.deepEqual(legacyWidgetValues("FastGuidance_AdaptiveGuidance", 6, PATCH), []);
  assert.deepEqual(legacyWidgetValues("FastGuidance_AdaptiveGuidance", null, PATCH), []);
  assert.deepEqual(legacyWidgetValues("KSampler", 0, ["seed"]), []);
});

test("the guider's cfg widget shifts the positions, not the names", () => {
  assert.deepEqual(legacyWidgetValues("FastGuidance_AdaptiveGuider", 5, ["cfg", ...PATCH]), [[5, "noise"], [6, 1.0]]);
  assert.deepEqual(Object.keys(LEGACY_VALUES).sort(), ["FastGuidance_AdaptiveGuidance", "FastGuidance_AdaptiveGuider"]);
});
