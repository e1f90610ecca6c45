// FastGuidance: values that inputs added after a node first shipped take in workflows saved before
// they existed (pure data, unit-tested in tests/js/). A new node gets the input's default; a saved
// workflow that never had the input keeps the behaviour it was saved with.

/** Per node id: input name → the value that reproduces the behaviour from before the input existed. */
export const LEGACY_VALUES = Object.freeze({
  FastGuidance_AdaptiveGuidance: Object.freeze({ cosine_space: "noise", convergence: 1.0 }),
  FastGuidance_AdaptiveGuider: Object.freeze({ cosine_space: "noise", convergence: 1.0 }),
});

/**
 * The widget values to set on a node configured from a saved workflow: for each widget at or after
 * `savedCount` (the length of the saved `widgets_values`) that has a legacy value, [index, value].
 */
export function legacyWidgetValues(nodeType, savedCount, widgetNames) {
  const legacy = LEGACY_VALUES[nodeType];
  if (!legacy || !Number.isInteger(savedCount)) return [];
  return (widgetNames || []).flatMap((name, index) =>
    index >= savedCount && Object.hasOwn(legacy, name) ? [[index, legacy[name]]] : []);
}
