// Unit tests of how the page refreshes its file lists after the pack wrote a file (`node --test tests/js/`).
import { test } from "node:test";
import assert from "node:assert/strict";

import { REFRESH_COMMAND, coalesced, refreshAdvice, refreshFileLists } from "../../js/file_lists_data.js";

test("the host's Refresh Node Definitions command is used where the frontend has one", async () => {
  const calls = [];
  const app = {
    extensionManager: { command: { execute: async (id) => calls.push(["command", id]) } },
    refreshComboInNodes: async () => calls.push(["refreshComboInNodes"]),
  };
  assert.equal(await refreshFileLists(app), "command");
  assert.deepEqual(calls, [["command", REFRESH_COMMAND]]);
  assert.equal(REFRESH_COMMAND, "Comfy.RefreshNodeDefinitions");
});

test("without the command, or when it fails, the app's refreshComboInNodes refreshes the lists", async () => {
  const calls = [];
  const plain = { refreshComboInNodes: async () => calls.push("plain") };
  assert.equal(await refreshFileLists(plain), "refreshComboInNodes");
  const failing = {
    extensionManager: { command: { execute: async () => { throw new Error("unknown command"); } } },
    refreshComboInNodes: async () => calls.push("after failure"),
  };
  assert.equal(await refreshFileLists(failing), "refreshComboInNodes");
  assert.deepEqual(calls, ["plain", "after failure"]);
});

test("a frontend with no way to refresh is an error, and the advice names the file, its folder and the remedy", async () => {
  await assert.rejects(refreshFileLists({}), /press R or reload the page/);
  const advice = refreshAdvice({ folder: "fastguidance_linear_ag", file: "sd15_euler_normal_20.safetensors" });
  assert.match(advice, /sd15_euler_normal_20\.safetensors to models\/fastguidance_linear_ag\//);
  assert.match(advice, /press R \(Refresh Node Definitions\) or reload the page/);
});

test("messages arriving during a refresh cause exactly one more refresh after it", async () => {
  let runs = 0;
  let release;
  const task = () => { runs += 1; return new Promise((resolve) => { release = resolve; }); };
  const refresh = coalesced(task);
  const first = refresh();
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(runs, 1);
  const second = refresh();
  const third = refresh();
  assert.equal(second, third, "calls during a run share the one run after it");
  release();
  await first;
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.equal(runs, 2);
  release();
  await second;
  assert.equal(runs, 2);
  const fourth = refresh();
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(runs, 3, "a call after the burst starts a new run");
  release();
  await fourth;
});

test("a failed refresh does not stop later ones", async () => {
  let runs = 0;
  const refresh = coalesced(async () => { runs += 1; if (runs === 1) throw new Error("network"); });
  await assert.rejects(refresh(), /network/);
  await refresh();
  assert.equal(runs, 2);
});
