// FastGuidance: how the page brings its file lists up to date after a node of the pack wrote a file
// (pure logic, no ComfyUI imports, unit-tested in tests/js/). The listener lives in file_lists.js.
//
// Input: the "fastguidance.file" message a trainer, calibration or Tune node sends once its file is
// on disk ({folder, file}; see nodes/page_messages.py).

/** The command behind the host's own "Refresh Node Definitions" (key R), on frontends 1.27 and 1.49. */
export const REFRESH_COMMAND = "Comfy.RefreshNodeDefinitions";

/**
 * Refresh every list of the page the way the host does when the user presses R: its command where the
 * frontend has one (1.49 then also re-checks the loaders it had outlined red for a missing file),
 * else the app's `refreshComboInNodes()`. Resolves to the way taken; rejects when neither exists.
 */
export async function refreshFileLists(app) {
  const command = app?.extensionManager?.command;
  if (typeof command?.execute === "function") {
    try {
      await command.execute(REFRESH_COMMAND);
      return "command";
    } catch (error) {
      if (typeof app.refreshComboInNodes !== "function") throw error;
    }
  }
  if (typeof app?.refreshComboInNodes === "function") {
    await app.refreshComboInNodes();
    return "refreshComboInNodes";
  }
  throw new Error("this frontend offers no way to refresh its lists: press R or reload the page");
}

/**
 * `task` run once per burst of calls: a call while it runs asks for exactly one more run after it
 * (a prompt with several writers sends several messages; one refresh covers each batch of them).
 * Resolves when the run that includes this call has finished.
 */
export function coalesced(task) {
  let running = null;
  let again = null;
  const start = () => {
    running = Promise.resolve().then(task).finally(() => { running = null; });
    return running;
  };
  return () => {
    if (!running) return start();
    if (!again) again = running.catch(() => {}).then(() => { again = null; return start(); });
    return again;
  };
}

/** What the page says when no refresh was possible: the file, where it is, and what to do. */
export function refreshAdvice(message) {
  const where = message?.folder ? `models/${message.folder}/` : "its folder";
  return `FastGuidance wrote ${message?.file ?? "a file"} to ${where}; press R (Refresh Node Definitions) `
    + "or reload the page to pick it in a loader node";
}
