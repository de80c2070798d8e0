// fal's own JavaScript client against `pixart serve`, redirected by configuration alone (run by tests/test_fal_js.py).
// MODE=middleware rewrites fal's hosts to this server's queue and run bases; MODE=proxy sends every call to
// /fal/proxy with the original URL in x-fal-target-url. Prints one JSON line of what it saw.
import { createFalClient } from "@fal-ai/client";

const { FAL_BASE, FAL_KEY, MODE, HOOK } = process.env;
const app = "fal-ai/pixart-sigma";
const config =
  MODE === "proxy"
    ? { credentials: FAL_KEY, proxyUrl: { url: `${FAL_BASE}/fal/proxy`, when: "always" } }
    : {
        credentials: FAL_KEY,
        requestMiddleware: async (request) => ({
          ...request,
          url: request.url
            .replace(/^https:\/\/queue\.fal\.run/, `${FAL_BASE}/queue`)
            .replace(/^https:\/\/fal\.run/, `${FAL_BASE}/run`),
        }),
      };
const fal = createFalClient(config);
const small = { num_inference_steps: 2, image_size: { width: 256, height: 256 } };
const out = {};

for (const mode of ["polling", "streaming"]) {
  const updates = [];
  const result = await fal.subscribe(app, {
    input: { prompt: `subscribe ${mode}`, seed: 5, ...small },
    logs: true,
    mode,
    pollInterval: 100,
    onQueueUpdate: (update) => updates.push(update),
  });
  out[`subscribe_${mode}`] = {
    seed: result.data.seed,
    requestId: result.requestId,
    statuses: [...new Set(updates.map((u) => u.status))],
    logs: updates.reduce((n, u) => n + (u.logs ? u.logs.length : 0), 0),
  };
}

const queued = await fal.queue.submit(app, { input: { prompt: "hooked", ...small }, webhookUrl: HOOK });
out.submit = { status: queued.status, requestId: queued.request_id };
out.status = (await fal.queue.status(app, { requestId: queued.request_id, logs: true })).status;
await fal.queue.subscribeToStatus(app, { requestId: queued.request_id, pollInterval: 100 });
out.result = (await fal.queue.result(app, { requestId: queued.request_id })).data.images.length;

const slow = await fal.queue.submit(app, { input: { prompt: "cancel me", num_inference_steps: 100, num_images: 8 } });
await fal.queue.cancel(app, { requestId: slow.request_id });
out.cancelled = slow.request_id;

try {
  await fal.queue.submit(app, { input: { prompt: "", num_images: 99 } });
  out.invalid = "accepted";
} catch (error) {
  out.invalid = { status: error.status, fields: (error.fieldErrors || []).map((e) => e.loc.join(".")) };
}

const run = await fal.run(app, { input: { prompt: "sync", sync_mode: true, ...small } });
out.run = run.data.images[0].url.slice(0, 22);
console.log(JSON.stringify(out));
