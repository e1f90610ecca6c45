// FastGuidance: a workflow saved before an input existed loads with the value that reproduces what it
// did when it was saved (js/legacy_inputs.js), not with the input's new default.
import { app } from "../../scripts/app.js";
import { LEGACY_VALUES, legacyWidgetValues } from "./legacy_inputs.js";

app.registerExtension({
  name: "FastGuidance.SavedWorkflows",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!Object.hasOwn(LEGACY_VALUES, nodeData?.name)) return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const saved = Array.isArray(info?.widgets_values) ? info.widgets_values.length : null;
      const widgets = this.widgets || [];
      for (const [index, value] of legacyWidgetValues(nodeData.name, saved, widgets.map((widget) => widget.name))) {
        widgets[index].value = value;
      }
      return result;
    };
  },
});
