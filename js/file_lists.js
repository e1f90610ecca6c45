// FastGuidance: a file a trainer, calibration or Tune node wrote becomes a choice of the loader nodes
// in the same page session: on the backend's "fastguidance.file" message the page refreshes its
// lists the way the host does on R (without it, frontend 1.49 outlines a loader naming the new file
// in red until a reload, and 1.27 does not list it). Logic in file_lists_data.js (unit-tested).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { coalesced, refreshAdvice, refreshFileLists } from "./file_lists_data.js";

const FILE_EVENT = "fastguidance.file";

let lastMessage = null;
const refresh = coalesced(() => refreshFileLists(app).catch((error) => {
  console.warn(`${refreshAdvice(lastMessage)} (${error?.message || error})`);
}));

app.registerExtension({
  name: "FastGuidance.FileLists",
  setup() {
    api.addEventListener(FILE_EVENT, ({ detail }) => {
      lastMessage = detail;
      refresh();
    });
  },
});
