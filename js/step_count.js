// FastGuidance: shows the step count the Step Predictor chose, on the node, after each run.
// The backend returns it as the node's UI text ({text: ["23 steps"]}).
import { app } from "../../scripts/app.js";

const NODE = "FastGuidance_StepPredictor";
const LINE_HEIGHT = 22;

app.registerExtension({
  name: "FastGuidance.StepCount",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? String(message.text[0] ?? "") : "";
      this.fastguidanceSteps = text || null;
      if (text) {
        const minimum = this.computeSize?.() ?? this.size;
        this.setSize?.([this.size[0], Math.max(this.size[1], minimum[1] + LINE_HEIGHT)]);
      }
      this.setDirtyCanvas?.(true, true);
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (this.fastguidanceSteps && !this.flags?.collapsed) {
        ctx.save();
        ctx.font = "bold 13px sans-serif";
        ctx.fillStyle = "#9fd0ff";
        ctx.textBaseline = "middle";
        ctx.fillText(`chosen: ${this.fastguidanceSteps}`, 10, this.size[1] - LINE_HEIGHT / 2, this.size[0] - 20);
        ctx.restore();
      }
      return result;
    };
  },
});
