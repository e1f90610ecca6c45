// FastGuidance frontend: keeps the last run record of each FastGuidance node.
// The backend sends "fastguidance.run" after every sampling run ({node, summary, records, ...});
// the per-step chart that draws it comes with the frontend issue. This file only listens.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "FastGuidance.RunRecord",
  setup() {
    api.addEventListener("fastguidance.run", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node));
      if (!node || !String(node.comfyClass || "").startsWith("FastGuidance_")) return;
      node.fastguidanceRun = detail;
      node.setDirtyCanvas?.(true, false);
    });
  },
});
