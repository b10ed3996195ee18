// Drive an unmodified tus-js-client from the tests.
// usage: node upload.mjs '{"endpoint": ..., "file": ..., "chunkSize": ..., "parallelUploads": 1,
//                          "stopAt": 0.4, "uploadUrl": null, "metadata": {...},
//                          "protocol": "ietf-draft-05"}'
// Without "chunkSize", tus-js-client's own default applies (Infinity: the whole file in one PATCH).
// Prints one JSON line: {"url", "bytesUploaded", "aborted", "requests"} or {"error", "requests"};
// "requests" counts the requests tus-js-client sent, by method ({"POST": 1, "PATCH": 3, ...}).
import { readFileSync } from 'node:fs';
import { Upload } from 'tus-js-client';

const opts = JSON.parse(process.argv[2]);
const data = readFileSync(opts.file);
const requests = {};

const upload = new Upload(data, {
  endpoint: opts.endpoint,
  uploadUrl: opts.uploadUrl || null,
  ...(opts.chunkSize ? { chunkSize: opts.chunkSize } : {}),
  ...(opts.protocol ? { protocol: opts.protocol } : {}),
  parallelUploads: opts.parallelUploads || 1,
  retryDelays: [0, 200, 500, 1000],
  metadata: opts.metadata || { filename: 'upload.bin' },
  removeFingerprintOnSuccess: true,
  onBeforeRequest(req) {
    const method = req.getMethod();
    requests[method] = (requests[method] || 0) + 1;
  },
  onProgress(bytesUploaded, bytesTotal) {
    if (opts.stopAt && bytesUploaded >= opts.stopAt * bytesTotal) {
      upload.abort(false).then(() => {
        console.log(JSON.stringify({ url: upload.url, bytesUploaded, aborted: true, requests }));
        process.exit(0);
      });
    }
  },
  onError(error) {
    console.log(JSON.stringify({ error: String(error), requests }));
    process.exit(1);
  },
  onSuccess() {
    const outcome = { url: upload.url, bytesUploaded: data.length, aborted: false, requests };
    console.log(JSON.stringify(outcome));
    process.exit(0);
  },
});
upload.start();
