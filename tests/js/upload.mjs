// Drive an unmodified tus-js-client from the tests.
// usage: node upload.mjs '{"endpoint": ..., "file": ..., "chunkSize": ..., "parallelUploads": 1,
//                          "stopAt": 0.4, "uploadUrl": null, "metadata": {...}}'
// Prints one JSON line: {"url", "bytesUploaded", "aborted"} or {"error"}.
import { readFileSync } from 'node:fs';
import { Upload } from 'tus-js-client';

const opts = JSON.parse(process.argv[2]);
const data = readFileSync(opts.file);

const upload = new Upload(data, {
  endpoint: opts.endpoint,
  uploadUrl: opts.uploadUrl || null,
  chunkSize: opts.chunkSize || Infinity,
  parallelUploads: opts.parallelUploads || 1,
  retryDelays: [0, 200, 500, 1000],
  metadata: opts.metadata || { filename: 'upload.bin' },
  removeFingerprintOnSuccess: true,
  onProgress(bytesUploaded, bytesTotal) {
    if (opts.stopAt && bytesUploaded >= opts.stopAt * bytesTotal) {
      upload.abort(false).then(() => {
        console.log(JSON.stringify({ url: upload.url, bytesUploaded, aborted: true }));
        process.exit(0);
      });
    }
  },
  onError(error) {
    console.log(JSON.stringify({ error: String(error) }));
    process.exit(1);
  },
  onSuccess() {
    console.log(JSON.stringify({ url: upload.url, bytesUploaded: data.length, aborted: false }));
    process.exit(0);
  },
});
upload.start();
