// One upload with an unmodified tus-js-client at its default settings: chunkSize Infinity (the
// whole file in one PATCH), no parallel uploads, no checksum. Only retryDelays is set, so that the
// client retries through many dropped connections: [0, 100, 200] repeated 20 times (60 retries;
// the client starts counting again whenever a retry found the offset advanced).
// Usage: node upload.mjs ENDPOINT FILE
// Prints one JSON line: {"url", "seconds"} on success, {"error", "seconds"} on failure (exit 1).
// "seconds" runs from upload.start() (creation included) to onSuccess or onError.
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Upload } from 'tus-js-client';

const [endpoint, file] = process.argv.slice(2);
if (!endpoint || !file) {
  console.error('usage: node upload.mjs ENDPOINT FILE');
  process.exit(2);
}
const data = readFileSync(file);
const retryDelays = Array.from({ length: 20 }, () => [0, 100, 200]).flat();
let started = 0;
const seconds = () => (performance.now() - started) / 1000;

const upload = new Upload(data, {
  endpoint,
  retryDelays,
  metadata: { filename: basename(file) },
  onError(error) {
    console.log(JSON.stringify({ error: String(error), seconds: seconds() }));
    process.exit(1);
  },
  onSuccess() {
    console.log(JSON.stringify({ url: upload.url, seconds: seconds() }));
    process.exit(0);
  },
});
started = performance.now();
upload.start();
