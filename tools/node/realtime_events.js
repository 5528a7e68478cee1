"use strict";
// Checks server events against the OpenAI Agents SDK's own parser, the one its WebRTC and
// WebSocket transports run on every data-channel message: an event the SDK files as generic
// (unknown type, or a known type with a missing/mistyped field such as `event_id`) fires
// none of its typed events, so a rename or a dropped field would break SDK users silently.
//
// Usage: node realtime_events.js SDK_EVENTS_MODULE [--allow-generic TYPE]... JSONL...
//   SDK_EVENTS_MODULE: @openai/agents-realtime's dist/openaiRealtimeEvents.js. Required by
//   path: `parseRealtimeEvent` is internal (the package's "exports" map hides dist/*).
// Prints one line per event that fails, then a summary; exits 1 when any event failed.

const fs = require("fs");
const path = require("path");

function main(argv) {
  const [sdkModule, ...rest] = argv;
  const allowGeneric = new Set();
  const files = [];
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === "--allow-generic") allowGeneric.add(rest[++i]);
    else files.push(rest[i]);
  }
  if (!sdkModule || files.length === 0) {
    console.error("usage: realtime_events.js SDK_EVENTS_MODULE [--allow-generic TYPE]... JSONL...");
    return 2;
  }
  const sdk = require(path.resolve(sdkModule));
  let passed = 0;
  let failed = 0;
  for (const file of files) {
    const lines = fs.readFileSync(file, "utf8").split("\n");
    lines.forEach((line, index) => {
      if (line.trim() === "") return;
      const where = `${file}:${index + 1}`;
      // The transports hand the parser a MessageEvent; it reads only `.data`.
      const { data, isGeneric } = sdk.parseRealtimeEvent({ data: line });
      if (data === null) {
        failed++;
        console.log(`FAIL ${where}: unparseable (not JSON, or no string "type"): ${line}`);
      } else if (isGeneric && !allowGeneric.has(data.type)) {
        failed++;
        // Why the typed schema refused it: the SDK itself only says "generic".
        const issues = sdk.realtimeServerEventSchema.safeParse(JSON.parse(line)).error.issues;
        const why = issues
          .map((issue) =>
            issue.path.join(".") === "type"
              ? "the SDK knows no event of this type"
              : `${issue.path.join(".") || "(event)"}: ${issue.message}`,
          )
          .join("; ");
        console.log(`FAIL ${where}: ${data.type} parsed as generic: ${why}`);
      } else {
        passed++;
      }
    });
  }
  console.log(`realtime_events: ${passed} typed, ${failed} failed`);
  if (passed + failed === 0) {
    console.log("realtime_events: no events at all: an empty golden file proves nothing");
    return 1;
  }
  return failed === 0 ? 0 : 1;
}

process.exitCode = main(process.argv.slice(2));
