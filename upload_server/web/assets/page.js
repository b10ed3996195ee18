// The upload page. tus-js-client moves the bytes (resuming after a dropped network or a page
// reload from the upload URLs it keeps in localStorage); pause and resume go through the server's
// own seed API, so a paused upload is paused on the server too, whoever looks at it.
'use strict';

(function () {
  const MiB = 1024 * 1024;
  const DEFAULT_CHUNK_MIB = 8;
  const MAX_RUNNING = 3; // files sent at once; the others wait their turn
  const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000, 30000];
  const FINISHED_KEPT = 100;
  const KEYS = {
    token: 'upload-server:token',
    chunk: 'upload-server:chunk-mib',
    finished: 'upload-server:finished',
  };
  const RUNNING = ['starting', 'uploading', 'resuming', 'offline'];
  const LABELS = {
    queued: 'Waiting',
    starting: 'Starting',
    uploading: 'Uploading',
    pausing: 'Pausing…',
    paused: 'Paused',
    resuming: 'Resuming…',
    offline: 'Waiting for the network',
    completing: 'Checking…',
    cancelling: 'Cancelling…',
    failed: 'Failed',
  };

  const endpoint = new URL(document.querySelector('meta[name="tus-endpoint"]').content, location.href)
    .href;
  const $ = (selector, root = document) => root.querySelector(selector);
  const items = [];
  // One headers object shared by every upload, so a new token reaches the running ones too.
  const headers = {};

  // -- settings --------------------------------------------------------------------------------

  function token() {
    return (localStorage.getItem(KEYS.token) || '').trim();
  }

  function chunkBytes() {
    const mib = Number(localStorage.getItem(KEYS.chunk));
    return (Number.isFinite(mib) && mib >= 1 ? mib : DEFAULT_CHUNK_MIB) * MiB;
  }

  function applyToken() {
    delete headers.Authorization;
    if (token()) headers.Authorization = `Bearer ${token()}`;
  }

  // An application that sends its user here may hand over an upload token (a JWT it minted) in
  // the fragment, `#access_token=...`: a fragment never reaches a server or its logs. It is kept
  // like a token typed in Settings, and taken out of the address bar.
  function takeTokenFromFragment() {
    const given = new URLSearchParams(location.hash.replace(/^#/, '')).get('access_token');
    if (!given || !given.trim()) return;
    localStorage.setItem(KEYS.token, given.trim());
    history.replaceState(null, '', location.pathname + location.search);
  }

  function setUpSettings() {
    takeTokenFromFragment();
    const toggle = $('#settings-toggle');
    const form = $('#settings');
    const tokenInput = $('#token');
    const chunkInput = $('#chunk-size');
    tokenInput.value = token();
    chunkInput.value = String(chunkBytes() / MiB);
    toggle.addEventListener('click', () => {
      form.hidden = !form.hidden;
      toggle.setAttribute('aria-expanded', String(!form.hidden));
    });
    form.addEventListener('submit', (event) => event.preventDefault());
    tokenInput.addEventListener('input', () => {
      const value = tokenInput.value.trim();
      if (value) localStorage.setItem(KEYS.token, value);
      else localStorage.removeItem(KEYS.token);
      applyToken();
      finished.render(); // download links carry the token
    });
    chunkInput.addEventListener('change', () => {
      const mib = Math.round(Number(chunkInput.value));
      if (mib >= 1) localStorage.setItem(KEYS.chunk, String(mib));
      else localStorage.removeItem(KEYS.chunk);
      chunkInput.value = String(chunkBytes() / MiB);
    });
    applyToken();
  }

  // -- the server --------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function uploadId(url) {
    return new URL(url, location.href).pathname.split('/').filter(Boolean).pop();
  }

  // The seed API: status, pause, resume and terminate all take the tus upload id as sessionID.
  async function seed(method, action, id) {
    const url = new URL(`/upload/${action}`, location.href);
    url.searchParams.set('sessionID', id);
    const response = await fetch(url, { method, headers: { ...headers }, cache: 'no-store' });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = body.error || {};
      throw new ApiError(response.status, error.code || `http_${response.status}`,
        error.message || response.statusText);
    }
    return body;
  }

  // What a failed tus request says: its status and the server's {"error": {code, message}}.
  function describe(err) {
    const response = err && err.originalResponse;
    const status = response ? response.getStatus() : 0;
    let error = {};
    try {
      error = JSON.parse(response.getBody()).error || {};
    } catch (_) { /* not JSON: a proxy or a dropped connection */ }
    let message = error.message || (status ? `the server answered ${status}` : 'no answer from the server');
    if (status === 401 || status === 403) message = 'the server wants an access token (see Settings)';
    return { status, code: error.code || '', message };
  }

  function shouldRetry(err) {
    const { status, code } = describe(err);
    if (status === 423 && code === 'paused') return false; // paused elsewhere: wait for Resume
    const retryable = status < 400 || status >= 500 || status === 409 || status === 423;
    return retryable && navigator.onLine;
  }

  async function forgetStoredUrl(url) {
    const storage = tus.defaultOptions.urlStorage;
    for (const entry of await storage.findAllUploads()) {
      if (entry.uploadUrl === url) await storage.removeUpload(entry.urlStorageKey);
    }
  }

  // -- formatting ------------------------------------------------------------------------------

  function formatBytes(bytes) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit && value < 10 ? 1 : 0)}\u00a0${units[unit]}`;
  }

  function formatDuration(seconds) {
    const s = Math.max(1, Math.round(seconds));
    const text = s < 60 ? `${s} s`
      : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s`
        : `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return text.replaceAll(' ', '\u00a0'); // wrap between figures, never inside one
  }

  // Speed over the last few seconds, so one slow or fast chunk does not swing it.
  class Meter {
    constructor() {
      this.samples = [];
    }

    reset() {
      this.samples = [];
    }

    add(bytes) {
      const now = performance.now();
      this.samples.push([now, bytes]);
      while (this.samples.length > 2 && now - this.samples[0][0] > 8000) this.samples.shift();
    }

    rate() {
      if (this.samples.length < 2) return 0;
      const [t0, b0] = this.samples[0];
      const b1 = this.samples[this.samples.length - 1][1];
      const seconds = (performance.now() - t0) / 1000;
      return seconds > 0.5 ? (b1 - b0) / seconds : 0;
    }
  }

  // -- one file ------------------------------------------------------------------------------

  class Item {
    constructor(file) {
      this.file = file;
      this.total = file.size;
      this.sent = 0;
      this.stored = 0;
      this.state = 'queued';
      this.error = '';
      this.upload = null;
      this.meter = new Meter();
      this.row = $('#upload-row').content.firstElementChild.cloneNode(true);
      $('.name', this.row).textContent = file.name;
      $('.name', this.row).title = file.name;
      $('.size', this.row).textContent = formatBytes(file.size);
      for (const button of this.row.querySelectorAll('button[data-action]')) {
        button.addEventListener('click', () => ACTIONS[button.dataset.action](this));
      }
    }

    get id() {
      return this.upload && this.upload.url ? uploadId(this.upload.url) : null;
    }

    setState(state, error = '') {
      this.state = state;
      this.error = error;
      if (state === 'uploading' || state === 'resuming') this.meter.reset();
      this.render();
    }

    progress(sent) {
      this.sent = sent;
      this.meter.add(sent);
      this.render();
    }

    render() {
      const { row, total } = this;
      const percent = (bytes) => (total ? Math.min(100, (bytes / total) * 100) : 100);
      row.dataset.state = this.state;
      if (this.upload && this.upload.url) {
        row.dataset.url = this.upload.url;
        row.dataset.id = this.id;
      }
      $('.sent', row).style.width = `${percent(this.sent)}%`;
      $('.stored', row).style.width = `${percent(this.stored)}%`;
      $('.bar', row).setAttribute('aria-valuenow', String(Math.round(percent(this.sent))));
      $('.state', row).textContent = this.error ? `${LABELS.failed}: ${this.error}` : LABELS[this.state];
      let figures = `${formatBytes(this.sent)} of ${formatBytes(total)}`;
      const rate = this.meter.rate();
      if (this.state === 'uploading' && rate > 0) {
        figures += ` · ${formatBytes(rate)}/s · ${formatDuration((total - this.sent) / rate)}\u00a0left`;
      }
      $('.figures', row).textContent = figures;
      const show = (action, visible, enabled = true) => {
        const button = $(`button[data-action="${action}"]`, row);
        button.hidden = !visible;
        button.disabled = !enabled;
      };
      const pausable = ['uploading', 'offline'].includes(this.state);
      show('pause', !['paused', 'failed'].includes(this.state), pausable);
      show('resume', ['paused', 'failed'].includes(this.state));
      $('button[data-action="resume"]', row).textContent = this.state === 'failed' ? 'Retry' : 'Resume';
      show('cancel', true, !['cancelling', 'completing'].includes(this.state));
    }
  }

  // -- what the buttons and the scheduler do ------------------------------------------------

  function newUpload(item) {
    return new tus.Upload(item.file, {
      endpoint,
      chunkSize: chunkBytes(),
      retryDelays: RETRY_DELAYS,
      headers,
      metadata: {
        filename: item.file.name,
        filetype: item.file.type || 'application/octet-stream',
      },
      removeFingerprintOnSuccess: true,
      onShouldRetry: shouldRetry,
      onUploadUrlAvailable: () => {
        item.render();
        showInterrupted();
      },
      onProgress: (sent) => item.progress(sent),
      onChunkComplete: (_size, accepted) => {
        item.stored = accepted;
        item.render();
      },
      onError: (err) => failed(item, err),
      onSuccess: () => succeeded(item),
    });
  }

  async function start(item) {
    item.setState('starting');
    const upload = newUpload(item);
    item.upload = upload;
    const previous = await upload.findPreviousUploads();
    if (previous.length) {
      // The newest URL for this file wins; older ones are leftovers.
      previous.sort((a, b) => Date.parse(b.creationTime) - Date.parse(a.creationTime));
      for (const old of previous.slice(1)) await tus.defaultOptions.urlStorage.removeUpload(old.urlStorageKey);
      upload.resumeFromPreviousUpload(previous[0]);
      const status = await seed('GET', 'status', uploadId(previous[0].uploadUrl)).catch(() => null);
      if (status && status.paused && item.state === 'starting') {
        item.sent = item.stored = status.bytesWritten;
        item.setState('paused');
        showInterrupted();
        pump();
        return;
      }
    }
    if (item.state !== 'starting') return; // cancelled meanwhile
    upload.start();
    item.setState('uploading');
    showInterrupted();
  }

  async function pause(item) {
    item.setState('pausing');
    await item.upload.abort();
    if (item.id) {
      try {
        const status = await seed('GET', 'pause', item.id);
        item.sent = item.stored = status.bytesWritten;
      } catch (err) {
        if (err.code === 'completed') {
          succeeded(item);
          return;
        }
        item.setState('failed', err.message);
        pump();
        return;
      }
    }
    item.setState('paused');
    pump();
  }

  async function resume(item) {
    item.setState('resuming');
    if (item.id) {
      try {
        await seed('POST', 'resume', item.id);
      } catch (err) {
        // not_paused: it was not paused on the server (a retry after a failure); carry on.
        if (err.code !== 'not_paused') {
          item.setState('failed', err.message);
          return;
        }
      }
    }
    item.upload.start();
    item.setState('uploading');
  }

  async function cancel(item) {
    item.setState('cancelling');
    const url = item.upload && item.upload.url;
    if (item.upload) {
      try {
        await item.upload.abort(true); // DELETE on the server, and forget the stored URL
      } catch (_) {
        // The server no longer has it (already gone); forget it here too.
      }
    }
    if (url) await forgetStoredUrl(url);
    remove(item);
  }

  const ACTIONS = { pause, resume, cancel };

  function failed(item, err) {
    const { status, code, message } = describe(err);
    if (status === 423 && code === 'paused') {
      item.setState('paused');
    } else if (!navigator.onLine) {
      item.setState('offline'); // picked up again by the 'online' event
    } else {
      item.setState('failed', message);
    }
    pump();
  }

  async function succeeded(item) {
    item.setState('completing');
    const url = item.upload.url;
    let status = null;
    for (let attempt = 0; attempt < 20; attempt += 1) {
      status = await seed('GET', 'status', item.id).catch(() => null);
      if (!status || ['completed', 'failed'].includes(status.state)) break;
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
    if (status && status.state === 'failed') {
      item.setState('failed', (status.error && status.error.message) || 'the server could not store it');
      return;
    }
    await forgetStoredUrl(url);
    finished.add({
      url,
      name: item.file.name,
      size: item.total,
      sha256: status ? status.sha256 : null,
      at: Date.now(),
    });
    remove(item);
  }

  function remove(item) {
    const index = items.indexOf(item);
    if (index >= 0) items.splice(index, 1);
    item.row.remove();
    $('#active').hidden = items.length === 0;
    pump();
  }

  function pump() {
    let running = items.filter((item) => RUNNING.includes(item.state)).length;
    for (const item of items) {
      if (running >= MAX_RUNNING) break;
      if (item.state === 'queued') {
        running += 1;
        start(item).catch((err) => item.setState('failed', String(err)));
      }
    }
  }

  function add(files) {
    for (const file of files) {
      const item = new Item(file);
      items.push(item);
      $('#uploads').append(item.row);
      item.render();
    }
    $('#active').hidden = items.length === 0;
    pump();
  }

  // -- uploads from earlier visits ---------------------------------------------------------

  async function showInterrupted() {
    const section = $('#interrupted');
    const list = $('.list', section);
    const running = new Set(items.map((item) => item.upload && item.upload.url).filter(Boolean));
    const entries = (await tus.defaultOptions.urlStorage.findAllUploads()).filter(
      (entry) => entry.uploadUrl && entry.uploadUrl.startsWith(endpoint) && !running.has(entry.uploadUrl),
    );
    list.replaceChildren();
    for (const entry of entries) {
      const li = document.createElement('li');
      li.className = 'interrupted';
      li.dataset.url = entry.uploadUrl;
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = (entry.metadata && entry.metadata.filename) || uploadId(entry.uploadUrl);
      const figures = document.createElement('span');
      figures.className = 'figures';
      figures.textContent = formatBytes(entry.size || 0);
      const discard = document.createElement('button');
      discard.type = 'button';
      discard.className = 'quiet';
      discard.textContent = 'Discard';
      discard.addEventListener('click', async () => {
        await tus.Upload.terminate(entry.uploadUrl, { headers }).catch(() => {});
        await tus.defaultOptions.urlStorage.removeUpload(entry.urlStorageKey);
        showInterrupted();
      });
      li.append(name, figures, discard);
      list.append(li);
      seed('GET', 'status', uploadId(entry.uploadUrl)).then(
        (status) => {
          if (['completed', 'terminated', 'expired'].includes(status.state)) {
            tus.defaultOptions.urlStorage.removeUpload(entry.urlStorageKey).then(showInterrupted);
            return;
          }
          const paused = status.paused ? ' · paused' : '';
          figures.textContent = `${formatBytes(status.bytesWritten)} of ${formatBytes(entry.size || 0)}${paused}`;
        },
        (err) => {
          if (err.status === 404 || err.status === 410) {
            tus.defaultOptions.urlStorage.removeUpload(entry.urlStorageKey).then(showInterrupted);
          }
        },
      );
    }
    section.hidden = entries.length === 0;
  }

  // -- finished uploads (kept in this browser) ---------------------------------------------

  const finished = {
    load() {
      try {
        return JSON.parse(localStorage.getItem(KEYS.finished)) || [];
      } catch (_) {
        return [];
      }
    },

    add(entry) {
      const entries = [entry, ...this.load()].slice(0, FINISHED_KEPT);
      localStorage.setItem(KEYS.finished, JSON.stringify(entries));
      this.render();
    },

    clear() {
      localStorage.removeItem(KEYS.finished);
      this.render();
    },

    render() {
      const section = $('#finished');
      const list = $('.list', section);
      const entries = this.load();
      list.replaceChildren();
      for (const entry of entries) {
        const li = document.createElement('li');
        li.className = 'done';
        const link = document.createElement('a');
        link.href = downloadUrl(entry.url);
        link.textContent = entry.name;
        link.title = `Download ${entry.name}`;
        link.setAttribute('download', entry.name);
        const figures = document.createElement('span');
        figures.className = 'figures';
        figures.textContent = `${formatBytes(entry.size)} · ${new Date(entry.at).toLocaleString()}`;
        li.append(link, figures);
        if (entry.sha256) {
          const digest = document.createElement('code');
          digest.className = 'digest';
          digest.textContent = `sha256 ${entry.sha256.slice(0, 12)}…`;
          digest.title = entry.sha256;
          li.append(digest);
        }
        list.append(li);
      }
      section.hidden = entries.length === 0;
    },
  };

  // A link cannot carry an Authorization header; the server takes the token as ?access_token=.
  function downloadUrl(url) {
    if (!token()) return url;
    const withToken = new URL(url);
    withToken.searchParams.set('access_token', token());
    return withToken.href;
  }

  // -- page ----------------------------------------------------------------------------------

  function notice(message) {
    const element = $('#notice');
    element.textContent = message;
    element.hidden = !message;
  }

  // Dropped folders are skipped: the browser hands them over as empty files.
  function droppedFiles(dataTransfer) {
    const files = [];
    const entries = Array.from(dataTransfer.items || []);
    Array.from(dataTransfer.files).forEach((file, index) => {
      const entry = entries[index] && entries[index].webkitGetAsEntry && entries[index].webkitGetAsEntry();
      if (entry && entry.isDirectory) {
        notice(`${file.name} is a folder: drop the files in it, or use upload-client for folders.`);
      } else {
        files.push(file);
      }
    });
    return files;
  }

  function setUpDropping() {
    const zone = $('#drop');
    const picker = $('#picker');
    let depth = 0;
    document.addEventListener('dragenter', (event) => {
      event.preventDefault();
      depth += 1;
      zone.classList.add('over');
    });
    document.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) zone.classList.remove('over');
    });
    document.addEventListener('dragover', (event) => event.preventDefault());
    document.addEventListener('drop', (event) => {
      event.preventDefault();
      depth = 0;
      zone.classList.remove('over');
      if (event.dataTransfer) add(droppedFiles(event.dataTransfer));
    });
    picker.addEventListener('change', () => {
      add(Array.from(picker.files));
      picker.value = ''; // so the same file can be picked again
    });
  }

  function main() {
    if (!window.tus || !tus.isSupported) {
      notice('This browser cannot upload files here: it lacks XMLHttpRequest, Blob or File.');
      return;
    }
    setUpSettings();
    setUpDropping();
    $('#clear-finished').addEventListener('click', () => finished.clear());
    window.addEventListener('online', () => {
      notice('');
      for (const item of items) {
        if (item.state === 'offline') {
          item.upload.start();
          item.setState('uploading');
        }
      }
    });
    window.addEventListener('offline', () => notice('The network is down: uploads continue when it is back.'));
    setInterval(() => items.filter((item) => item.state === 'uploading').forEach((item) => item.render()), 1000);
    finished.render();
    showInterrupted();
  }

  main();
}());
