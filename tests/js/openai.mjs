// OpenAI's own JavaScript client against `pixart serve`'s Images API, by `baseURL` alone (run by
// tests/acceptance/test_openai.py). Prints one JSON line of what it saw.
import OpenAI from "openai";

const { OPENAI_BASE, OPENAI_KEY } = process.env;
const client = new OpenAI({ apiKey: OPENAI_KEY, baseURL: `${OPENAI_BASE}/v1`, maxRetries: 0 });
const out = {};

const b64 = await client.images.generate({ model: "pixart-sigma", prompt: "a red circle", n: 2, size: "512x256",
  seed: 7, num_inference_steps: 4 });
out.b64 = b64.data.map((image) => Buffer.from(image.b64_json, "base64").subarray(1, 4).toString());
out.answered_size = b64.size;
const url = await client.images.generate({ prompt: "a yellow square", response_format: "url", num_inference_steps: 4 });
out.url = url.data[0].url;
const stream = await client.images.generate({ prompt: "a green triangle", stream: true, partial_images: 2,
  size: "256x256", num_inference_steps: 9 });
out.events = [];
for await (const event of stream) out.events.push(event.type);
for (const [name, body] of [["bad_size", { prompt: "x", size: "100x100" }], ["key", null]]) {
  try {
    if (body) await client.images.generate(body);
    else await new OpenAI({ apiKey: "sk-wrong", baseURL: `${OPENAI_BASE}/v1`, maxRetries: 0 }).images.generate(
      { prompt: "x" });
  } catch (error) {
    out[name] = { status: error.status, param: error.param ?? null, code: error.code ?? null };
  }
}
console.log(JSON.stringify(out));
