// faultproxy demo page: two clients of one upload, the proxy's journal on their timelines.
// Plain JavaScript, no build step, no external assets. Times: Date.now() milliseconds (the server's
// task start and the journal's `ts` are wall-clock seconds of the same machine); everything shown is
// production time = real time / time scale.
'use strict';
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const SVGNS = 'http://www.w3.org/2000/svg';
  const STALL_LIMIT = 120; // production seconds a progress bar may stand still while the server moves on
  const FROZEN_AFTER = 20; // production seconds behind the server before the badge says so
  const X0 = 74, X1 = 582; // plot area in the timeline's viewBox
  const ROW = { server: [24, 54], client: [60, 114], proxy: [120, 170] };

  const ui = {
    form: $('#controls'), profile: $('#profile'), scale: $('#scale'), heartbeat: $('#heartbeat'),
    flush: $('#flush'), accel: $('#accel'), fix: $('#fix'), start: $('#start'),
    desc: $('#profile-desc'), fixText: $('#fix-text'), proxyStatus: $('#proxy-status'), proto: $('#proto'),
  };
  const profiles = new Map(); // name -> {description, fix, fix_text}
  let applied = null; // "profile@scale" loaded into the proxy
  let applying = Promise.resolve();
  let run = null;

  // ------------------------------------------------------------------ formatting
  function fmt(sec) {
    if (!Number.isFinite(sec)) return '—';
    if (sec <= 0) return '0 s';
    if (sec < 1) return '<1 s';
    const s = Math.round(sec);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60), r = s % 60;
    return r ? `${m} min ${r} s` : `${m} min`;
  }
  function clock(sec) {
    const s = Math.max(0, Math.round(sec));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
  }
  function svg(tag, attrs = {}, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ------------------------------------------------------------------ one run (one task)
  class Run {
    constructor(task, profile) {
      this.task = task;
      this.id = task.task;
      this.profile = profile;
      this.scale = task.scale;
      this.count = task.count;
      this.t0 = task.started_at * 1000;
      this.due = task.offsets.map((o) => this.t0 + o * 1000);
      this.end = this.t0 + task.total * 1000;
      this.deadline = this.end + Math.max(60 * this.scale * 1000, 1000);
      this.clients = {};
      this.over = false;
      // The time axis is piecewise linear: the long silent processing stretch gets less width than its
      // length, so the events before and after it stay readable. Breakpoints in production seconds.
      const prodDue = task.offsets.map((o) => o / this.scale);
      const up = task.scenario.upload_events, iv = task.scenario.interval;
      const span = this.prod(this.deadline - this.t0);
      const b1 = prodDue[up - 1] + 2 * iv, b2 = prodDue[up] - 2 * iv;
      this.segments = b2 - b1 > 0.5 * span
        ? [[0, b1, 0, 0.28], [b1, b2, 0.28, 0.62], [b2, span, 0.62, 1]]
        : [[0, span, 0, 1]];
    }
    prod(ms) { return ms / 1000 / this.scale; }
    // Production seconds since the start -> x in the timeline's viewBox.
    xs(s) {
      for (const [a, b, fa, fb] of this.segments) {
        if (s <= b || b === this.segments[this.segments.length - 1][1]) {
          const f = fa + (Math.max(a, Math.min(b, s)) - a) / (b - a) * (fb - fa);
          return X0 + Math.max(0, Math.min(1, f)) * (X1 - X0);
        }
      }
      return X1;
    }
    x(t) { return this.xs(this.prod(t - this.t0)); }
    clockAt(t) { return clock(this.prod(t - this.t0)); }
  }

  // ------------------------------------------------------------------ a client's panel
  class Panel {
    constructor(kind, name, what) {
      const node = $('#panel').content.firstElementChild.cloneNode(true);
      node.id = kind;
      node.setAttribute('aria-label', `${name} client`);
      $('.name', node).textContent = name;
      $('.what', node).textContent = what;
      $('#clients').append(node);
      this.node = node;
      this.axis = $('.axis', node);
      this.rows = $('.rows', node);
      this.marks = $('.marks', node);
      this.now = $('.now', node);
      this.badge = $('.badge', node);
      this.bar = $('.bar', node);
      this.fill = $('.fill', node);
      this.pct = $('.pct', node);
      this.vhead = $('.vhead', node);
      this.vtext = $('.vtext', node);
      this.logList = $('.log', node);
      this.bands = svg('g', { class: 'bands' });
      this.rows.after(this.bands);
      this.proxyLane = 0;
    }

    reset(run) {
      for (const g of [this.axis, this.rows, this.bands, this.marks]) g.replaceChildren();
      this.quiet = null;
      this.logList.replaceChildren();
      this.node.dataset.verdict = '';
      this.setState('connecting', 'STARTING');
      this.setProgress(0);
      this.setVerdict('', 'Running…', 'the verdict appears when the upload ends');
      this.proxyLane = 0;
      this.drawFrame(run);
    }

    drawFrame(run) {
      let lastX = -Infinity;
      run.segments.forEach(([a, b, fa, fb], i) => {
        const width = (fb - fa) * (X1 - X0);
        const step = [5, 10, 15, 30, 60, 120, 300, 600, 1200].find((st) => (st / (b - a)) * width >= 46) || 3600;
        for (let s = Math.ceil(a / step) * step; s <= b + 1e-6; s += step) {
          const x = run.xs(s);
          if (x - lastX < 40) continue;
          lastX = x;
          const g = svg('g', { class: 'tick' });
          g.append(svg('line', { x1: x, x2: x, y1: 18, y2: 170 }));
          const anchor = x > X1 - 16 ? 'end' : 'middle';
          g.append(svg('text', { x: anchor === 'end' ? X1 + 14 : x, y: 13, 'text-anchor': anchor }, clock(s)));
          this.axis.append(g);
        }
        if (i > 0) { // the axis changes pace here
          const x = run.xs(a);
          this.axis.append(svg('path', { class: 'break', d: `M${x - 6},22L${x - 1},14M${x + 1},22L${x + 6},14` }));
        }
      });
      for (const [name, [y1, y2]] of Object.entries(ROW)) {
        this.rows.append(svg('rect', { class: 'rowbg', x: X0, y: y1, width: X1 - X0, height: y2 - y1 }));
        this.rows.append(svg('text', { class: 'rowlabel', x: 4, y: (y1 + y2) / 2 + 5 }, name));
      }
      // The server's schedule: when each event is produced; the silent processing stretch shaded.
      const up = run.task.scenario.upload_events;
      if (up < run.count) {
        const a = run.x(run.due[up - 1]), b = run.x(run.due[up]);
        this.rows.append(svg('rect', { class: 'processing', x: a, y: ROW.server[0], width: b - a, height: ROW.server[1] - ROW.server[0] }));
        const quiet = run.task.scenario.processing;
        const label = svg('text', { class: 'processing-label', x: (a + b) / 2, y: ROW.server[0] + 13, 'text-anchor': 'middle' });
        label.append(svg('tspan', { x: (a + b) / 2 }, `processing ${fmt(quiet)}`));
        label.append(svg('tspan', { x: (a + b) / 2, dy: 14 }, 'nothing to send'));
        this.rows.append(label);
      }
      for (const due of run.due) {
        const x = run.x(due);
        this.rows.append(svg('line', { class: 'due', x1: x, x2: x, y1: ROW.server[0] + 4, y2: ROW.server[1] - 4 }));
      }
      this.now.setAttribute('x1', X0);
      this.now.setAttribute('x2', X0);
    }

    setState(state, label) {
      this.node.dataset.state = state;
      if (this.badge.textContent !== label) this.badge.textContent = label;
    }

    setProgress(pct) {
      this.fill.style.width = `${pct}%`;
      this.pct.textContent = `${pct} %`;
      this.bar.setAttribute('aria-valuenow', String(pct));
    }

    setStats(stats) {
      for (const [key, value] of Object.entries(stats)) {
        const dd = $(`[data-stat=${key}]`, this.node);
        const text = typeof value === 'object' ? value.text : String(value);
        if (dd.textContent !== text) dd.textContent = text;
        dd.classList.toggle('bad', typeof value === 'object' && !!value.bad);
      }
    }

    setVerdict(kind, head, text) {
      this.node.dataset.verdict = kind;
      this.vhead.textContent = head;
      this.vtext.textContent = text;
      this.vtext.title = text;
    }

    line(run, t, text, cls = '') {
      const li = document.createElement('li');
      if (cls) li.className = cls;
      const stamp = document.createElement('span');
      stamp.className = 't';
      stamp.textContent = run.clockAt(t);
      li.append(stamp, text);
      li.title = text;
      this.logList.append(li);
      while (this.logList.children.length > 4) this.logList.firstElementChild.remove();
    }

    setNow(run, t) {
      const x = run.x(t);
      this.now.setAttribute('x1', x);
      this.now.setAttribute('x2', x);
    }

    // Marks on the client row.
    event(run, t, kind) {
      const x = run.x(t);
      this.marks.append(svg('line', { class: `ev ${kind}`, x1: x, x2: x, y1: ROW.client[0] + 6, y2: ROW.client[1] - 14 }));
    }
    repeat(run, t) {
      const x = run.x(t);
      this.marks.append(svg('line', { class: 'dup', x1: x, x2: x, y1: ROW.client[0] + 2, y2: ROW.client[0] + 12 }));
    }
    heartbeat(run, t) {
      this.marks.append(svg('circle', { class: 'hb', cx: run.x(t), cy: ROW.client[1] - 7, r: 2.2 }));
    }
    error(run, t) {
      const x = run.x(t), y = ROW.client[0] + 14, d = 7;
      this.marks.append(svg('path', { class: 'err', d: `M${x - d},${y - d}L${x + d},${y + d}M${x - d},${y + d}L${x + d},${y - d}` }));
    }
    watchdog(run, t) {
      const x = run.x(t), y = ROW.client[0] + 10;
      this.marks.append(svg('path', { class: 'watch', d: `M${x - 7},${y + 12}L${x + 7},${y + 12}L${x},${y}Z` }));
    }
    retry(run, t) {
      const x = run.x(t), y = ROW.client[1] - 4;
      this.marks.append(svg('path', { class: 'retry', d: `M${x - 6},${y}L${x + 6},${y}L${x},${y - 10}Z` }));
    }
    band(cls, row, run, from) {
      const [y1, y2] = ROW[row];
      const rect = svg('rect', { class: cls, x: run.x(from), y: y1, width: 0, height: y2 - y1 });
      this.bands.append(rect);
      return { rect, from, update: (t) => rect.setAttribute('width', Math.max(0, run.x(t) - run.x(from))) };
    }
    // "Nothing" is an answer too: shown on the proxy row when no fault fired on this client's streams.
    quietProxy(on) {
      if (on && !this.quiet) {
        this.quiet = svg('text', { class: 'quiet', x: (X0 + X1) / 2, y: ROW.proxy[0] + 30, 'text-anchor': 'middle' },
          'nothing in the proxy\u2019s journal for these streams');
        this.marks.append(this.quiet);
      } else if (!on && this.quiet) {
        this.quiet.remove();
        this.quiet = null;
      }
    }

    // What the proxy did (from the journal), on the proxy row.
    proxy(run, t, label, long, from) {
      const x = run.x(t);
      let lane = this.proxyLane % 2;
      if (from !== undefined) { // a span (a stream held): the band on top, its label below
        const a = run.x(from);
        this.bands.append(svg('rect', { class: 'proxyband', x: a, y: ROW.proxy[0] + 4, width: Math.max(2, x - a), height: 12 }));
        lane = 1;
      }
      this.proxyLane = lane + 1;
      const y = ROW.proxy[0] + 6 + lane * 22;
      const mark = svg('path', { class: 'proxymark', d: `M${x},${y}L${x + 7},${y + 7}L${x},${y + 14}L${x - 7},${y + 7}Z` });
      mark.append(svg('title', {}, long));
      this.marks.append(mark);
      const right = x + 14 + label.length * 7.6 < 600;
      this.marks.append(svg('text', { class: 'proxylabel', x: right ? x + 10 : x - 10, y: y + 12, 'text-anchor': right ? 'start' : 'end' }, label));
    }
  }

  // ------------------------------------------------------------------ SSE parsing for the fetch client
  class SseParser {
    constructor() { this.buf = ''; this.data = []; this.id = null; this.type = ''; }
    feed(text) {
      this.buf += text;
      const out = [];
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).replace(/\r$/, '');
        this.buf = this.buf.slice(nl + 1);
        if (line === '') {
          if (this.data.length) out.push({ id: this.id, type: this.type || 'message', data: this.data.join('\n') });
          this.data = []; this.type = ''; this.id = null;
        } else if (line[0] === ':') {
          out.push({ comment: line.slice(1).trim() });
        } else {
          const c = line.indexOf(':');
          const field = c < 0 ? line : line.slice(0, c);
          let value = c < 0 ? '' : line.slice(c + 1);
          if (value[0] === ' ') value = value.slice(1);
          if (field === 'data') this.data.push(value);
          else if (field === 'id') this.id = value;
          else if (field === 'event') this.type = value;
        }
      }
      return out;
    }
  }

  // ------------------------------------------------------------------ clients
  class Client {
    constructor(panel, run) {
      this.p = panel;
      this.run = run;
      this.received = new Map(); // id -> arrival time
      this.repeated = 0;
      this.reconnects = 0;
      this.errors = 0;
      this.progress = 0;
      this.done = false;
      this.base = ['connecting', 'CONNECTING'];
      this.attemptStarts = new Map();
      this.gap = null;
      this.pollBand = null;
      this.cause = ''; // the proxy's last action on this client's streams, in short
      this.proxyActions = 0;
    }

    state(state, label) { this.base = [state, label]; if (!this.done) this.p.setState(state, label); }
    log(text, cls) { this.p.line(this.run, Date.now(), text, cls); }

    // An event reached the application. Returns whether it was new.
    event(id, data, via) {
      if (this.done || !Number.isInteger(id) || id < 1 || id > this.run.count) return false;
      const t = Date.now();
      if (this.received.has(id)) {
        this.repeated += 1;
        this.p.repeat(this.run, t);
        this.log(`event ${id} delivered again`, 'error');
        return false;
      }
      this.received.set(id, t);
      const late = this.run.prod(t - this.run.due[id - 1]) > FROZEN_AFTER;
      this.p.event(this.run, t, via === 'poll' ? 'poll' : late ? 'late' : '');
      this.progress = Math.max(this.progress, Number(data.progress) || 0);
      this.p.setProgress(this.progress);
      if (this.gap && this.oldestMissing(t) === null) { this.gap.update(t); this.gap = null; }
      if (id === this.run.count) {
        this.log(`event ${id}: done (100 %)`, 'ok');
        this.finish('complete');
      }
      return true;
    }

    oldestMissing(t) {
      for (let i = 1; i <= this.run.count; i++) {
        if (this.run.due[i - 1] > t) return null;
        if (!this.received.has(i)) return i;
      }
      return null;
    }

    // Longest time an event was due at the server but not yet shown, in production seconds.
    longestStall(t) {
      let worst = 0;
      for (let i = 1; i <= this.run.count; i++) {
        const due = this.run.due[i - 1];
        if (due > t) break;
        worst = Math.max(worst, (this.received.get(i) ?? t) - due);
      }
      return this.run.prod(worst);
    }

    tick(t) {
      const at = this.done ? this.endAt : t;
      const stall = this.longestStall(at);
      this.p.setStats({
        events: `${this.received.size} / ${this.run.count}`,
        lost: this.done ? { text: String(this.run.count - this.received.size), bad: this.run.count > this.received.size } : '…',
        repeated: { text: String(this.repeated), bad: this.repeated > 0 },
        reconnects: String(this.reconnects),
        errors: { text: String(this.errors), bad: this.errors > 0 },
        stall: { text: fmt(stall), bad: stall > STALL_LIMIT },
      });
      if (this.done) return;
      if (this.pollBand) this.pollBand.update(t);
      const missing = this.oldestMissing(t);
      const behind = missing === null ? 0 : this.run.prod(t - this.run.due[missing - 1]);
      if (behind > FROZEN_AFTER) {
        if (!this.gap) this.gap = this.p.band('gap', 'client', this.run, this.run.due[missing - 1]);
        this.gap.update(t);
        this.p.setState('frozen', `NO PROGRESS ${fmt(behind)}`);
      } else {
        this.p.setState(...this.base);
      }
    }

    finish(kind, reason = '') {
      if (this.done) return;
      this.done = true;
      this.endAt = Date.now();
      this.stop();
      if (this.gap) this.gap.update(this.endAt);
      if (this.pollBand) this.pollBand.update(this.endAt);
      this.kind = kind;
      this.reason = reason;
      const [verdict, head] = this.showVerdict();
      this.p.setState(verdict === 'damaged' ? 'failed' : verdict, head.split(/[ ,—]/)[0]);
      this.tick(this.endAt);
      if (!this.proxyActions) this.p.quietProxy(true);
      this.run.check();
    }

    showVerdict() {
      const [verdict, head, text] = this.verdict(this.kind, this.reason);
      const cause = this.cause && verdict !== 'complete' ? `proxy: ${this.cause} \u2014 ` : '';
      this.p.setVerdict(verdict, head, cause + text);
      return [verdict, head];
    }

    verdict(kind, reason) {
      const n = this.run.count;
      const lost = n - this.received.size;
      const stall = this.longestStall(this.endAt);
      if (kind === 'failed') {
        return ['failed', `FAILED at ${this.progress} %`, `${reason}; ${lost} of ${n} events never shown`];
      }
      if (kind === 'stalled') {
        return ['stalled', `STALLED at ${this.progress} %`,
          `no progress for ${fmt(stall)} while the server went on; ${lost} of ${n} events never arrived`];
      }
      if (lost || this.repeated) {
        return ['damaged', `DONE, BUT ${lost} LOST, ${this.repeated} REPEATED`, 'the application saw a broken sequence of events'];
      }
      if (stall > STALL_LIMIT) {
        return ['stalled', 'STALLED, then done', `the bar stood still for ${fmt(stall)} while the server went on, then jumped to 100 %`];
      }
      return ['complete', 'COMPLETE', `${n} of ${n} events, none lost or repeated; longest stall ${fmt(stall)}`];
    }

    // A journal record about one of this client's streams.
    proxyAction(record, attempt) {
      const t = Math.min(Date.now(), record.ts * 1000);
      const d = describeRecord(record, this.run, this.attemptStarts.get(attempt ?? 0));
      this.p.proxy(this.run, t, d.short, d.long, d.from);
      this.p.line(this.run, t, `proxy: ${d.long}`, 'proxy');
      this.cause = d.short;
      this.proxyActions += 1;
      this.p.quietProxy(false);
      if (this.done) this.showVerdict(); // the record can arrive just after the symptom
    }
  }

  // What the incident's code did: one EventSource; on error, mark the upload failed.
  class Naive extends Client {
    start() {
      const url = `/events?task=${encodeURIComponent(this.run.id)}&client=naive`;
      this.attemptStarts.set(0, Date.now());
      const es = (this.es = new EventSource(url));
      this.log('new EventSource("/events?task=…")');
      es.onopen = () => { this.state('streaming', 'STREAMING'); this.log('onopen'); };
      const onEvent = (e) => {
        let data;
        try { data = JSON.parse(e.data); } catch { return; }
        this.event(Number(e.lastEventId), data, 'stream');
      };
      es.onmessage = onEvent;
      es.addEventListener('done', onEvent);
      es.onerror = () => {
        if (this.done) return;
        this.errors += 1;
        this.p.error(this.run, Date.now());
        this.log(`onerror (readyState ${es.readyState}): upload marked failed`, 'error');
        es.close();
        this.finish('failed', 'onerror, upload marked failed ("SSE connection failed")');
      };
    }
    stop() { if (this.es) this.es.close(); }
  }

  // Resumes with Last-Event-ID, watchdog (no byte within 2 × heartbeat: reconnect), exponential backoff,
  // and falls back to polling when the stream cannot be held.
  class Resilient extends Client {
    constructor(panel, run) {
      super(panel, run);
      const hb = run.task.heartbeat || 15; // without heartbeats the client still assumes the usual 15 s
      this.heartbeatAssumed = !run.task.heartbeat;
      this.watchdogMs = Math.max(2 * hb * run.scale * 1000, 100);
      this.pollMs = Math.max(5 * run.scale * 1000, 50);
      this.lastId = 0;
      this.attempt = 0;
      this.failures = 0;
      this.empty = 0;
      this.timers = new Set();
      this.ctrl = null;
    }

    start() { this.connect(); }

    stop() {
      if (this.ctrl) this.ctrl.abort();
      for (const id of this.timers) clearTimeout(id);
      this.timers.clear();
    }

    later(fn, ms) {
      const id = setTimeout(() => { this.timers.delete(id); fn(); }, ms);
      this.timers.add(id);
    }

    backoffMs() {
      const prod = Math.min(30, 2 ** Math.min(Math.max(this.failures - 1, 0), 5)); // 1, 2, 4 … 30 s
      return Math.max(prod * this.run.scale * 1000 * (0.85 + 0.15 * Math.random()), 20);
    }

    async connect() {
      if (this.done) return;
      const n = ++this.attempt;
      const t = Date.now();
      this.attemptStarts.set(n, t);
      if (n > 1) {
        this.reconnects += 1;
        this.p.retry(this.run, t);
        this.log(`reconnect #${n - 1} with Last-Event-ID: ${this.lastId}`);
      } else {
        this.log('fetch("/events?task=…"), reading the body as a stream');
      }
      this.state('connecting', n > 1 ? `RECONNECT #${n - 1}` : 'CONNECTING');
      const ctrl = (this.ctrl = new AbortController());
      const headers = { Accept: 'text/event-stream' };
      if (this.lastId) headers['Last-Event-ID'] = String(this.lastId);
      const url = `/events?task=${encodeURIComponent(this.run.id)}&client=resilient&attempt=${n}`;
      let why = null, detail = '', fresh = 0, watchdog = null;
      const arm = () => {
        clearTimeout(watchdog);
        watchdog = setTimeout(() => { why = 'watchdog'; ctrl.abort(); }, this.watchdogMs);
      };
      arm();
      try {
        const resp = await fetch(url, { headers, signal: ctrl.signal, cache: 'no-store' });
        const ctype = resp.headers.get('content-type') || '';
        if (!resp.ok || !ctype.startsWith('text/event-stream')) {
          why = 'status';
          detail = `HTTP ${resp.status}`;
          ctrl.abort();
        } else {
          arm();
          this.state('streaming', 'STREAMING');
          const reader = resp.body.getReader();
          const decoder = new TextDecoder();
          const parser = new SseParser();
          for (;;) {
            const { value, done } = await reader.read();
            if (done) { why = why || 'end'; break; }
            arm();
            for (const item of parser.feed(decoder.decode(value, { stream: true }))) {
              if (item.comment !== undefined) { this.p.heartbeat(this.run, Date.now()); continue; }
              let data;
              try { data = JSON.parse(item.data); } catch { continue; }
              const id = Number(item.id);
              if (this.event(id, data, 'stream')) { fresh += 1; this.lastId = Math.max(this.lastId, id); }
              if (this.done) return;
            }
          }
        }
      } catch (e) {
        if (this.done) return;
        if (!why) { why = 'error'; detail = (e && e.message) || String(e); }
      } finally {
        clearTimeout(watchdog);
      }
      if (!this.done) await this.afterAttempt(why, detail, fresh);
    }

    async afterAttempt(why, detail, fresh) {
      const t = Date.now();
      if (fresh) { this.failures = 0; this.empty = 0; } else { this.failures += 1; this.empty += 1; }
      if (why === 'watchdog') {
        this.p.watchdog(this.run, t);
        this.log(`watchdog: no byte for ${fmt(this.run.prod(this.watchdogMs))}` +
          (this.heartbeatAssumed ? ' (assumes 15 s heartbeats)' : ''), 'error');
        // Is the server ahead of what the stream delivered? Then something in the path holds the stream.
        const ahead = await this.pollOnce();
        if (this.done) return;
        if (ahead > 0) {
          this.log(`server was ${ahead} events ahead: the stream is being held, switching to polling`);
          this.startPolling();
          return;
        }
      } else if (why === 'end') {
        this.log('stream ended before "done"');
      } else {
        this.errors += 1;
        this.p.error(this.run, t);
        this.log(why === 'status' ? `${detail}: will retry` : `network error (${detail})`, 'error');
      }
      if (this.empty >= 3) {
        this.log(`${this.empty} attempts in a row without an event: switching to polling`);
        this.startPolling();
        return;
      }
      const delay = this.backoffMs();
      this.state('reconnecting', `RETRY IN ${fmt(this.run.prod(delay))}`);
      this.later(() => this.connect(), delay);
    }

    async pollOnce() {
      try {
        const resp = await fetch(`/api/progress?task=${encodeURIComponent(this.run.id)}&after=${this.lastId}`, { cache: 'no-store' });
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        const body = await resp.json();
        let fresh = 0;
        for (const ev of body.events) {
          if (this.done) break;
          if (this.event(ev.id, ev, 'poll')) { fresh += 1; this.lastId = Math.max(this.lastId, ev.id); }
        }
        return fresh;
      } catch (e) {
        if (!this.done) { this.errors += 1; this.log(`poll failed (${e.message})`, 'error'); }
        return 0;
      }
    }

    async startPolling() {
      this.state('polling', 'POLLING');
      this.pollBand = this.p.band('pollband', 'client', this.run, Date.now());
      this.log(`polling /api/progress every ${fmt(this.run.prod(this.pollMs))}`);
      while (!this.done) {
        await this.pollOnce();
        if (this.done) break;
        await new Promise((resolve) => this.later(resolve, this.pollMs));
      }
    }
  }

  // ------------------------------------------------------------------ journal records, in words
  function describeRecord(r, run, started) {
    const o = r.outcome || '';
    const dur = (secs) => fmt(Number(secs) / run.scale); // the journal speaks scaled seconds
    // The reason in the outcome's last parentheses, in production time.
    const raw = (/\(([^()]*)\)\s*$/.exec(o) || [])[1] || '';
    let why = raw, m;
    if ((m = /^after (\d+) events$/.exec(raw))) why = `after ${m[1]} events`;
    else if ((m = /^no upstream byte for ([\d.]+)s$/.exec(raw))) why = `after ${dur(m[1])} without a byte`;
    else if ((m = /^exchange not done for ([\d.]+)s$/.exec(raw))) why = `${dur(m[1])} after the request (a total limit)`;
    else if ((m = /^no response headers for ([\d.]+)s$/.exec(raw))) why = `no headers within ${dur(m[1])}`;
    else if ((m = /^after ([\d.]+)s$/.exec(raw))) why = `after ${dur(m[1])}`;
    const code = r.code_name || (/(?:RST_STREAM|GOAWAY) (\w+)/.exec(o) || [])[1] || '';
    const heldFor = () => (started !== undefined ? fmt(run.prod(r.ts * 1000 - started)) : '');
    if (r.fault === 'compress') {
      if (/held/.test(o)) {
        const held = heldFor();
        return { short: `held ${held} by gzip`, long: `stream held ${held} by compression, then released at once (${o.replace(/, held.*$/, '')})`, from: started };
      }
      return { short: 'gzip, flushed', long: `gzip flushed each event (X-Accel-Buffering: no): ${o}` };
    }
    if (r.fault === 'buffer') {
      const held = r.longest_hold !== undefined ? dur(r.longest_hold) : heldFor();
      return { short: `held ${held} by buffering`, long: `stream held up to ${held} by a buffering hop (${o})`, from: started };
    }
    if (/^RST_STREAM/.test(o)) {
      return { short: `RST_STREAM ${why}`.trim(), long: `RST_STREAM ${code} ${why} (${r.profile}/${r.rule}); Chromium: ERR_HTTP2_PROTOCOL_ERROR` };
    }
    const status = /^status (\d+)/.exec(o);
    if (status) {
      return { short: `${status[1]} before first byte`, long: `${status[1]} before the first byte${why ? ` (${why})` : ''}; an EventSource gives up for good on that` };
    }
    if (/black hole/.test(o)) {
      return { short: `black hole ${why}`, long: `black hole ${why}: dropped silently; nothing more arrives, and no error` };
    }
    if (/^GOAWAY/.test(o)) return { short: `GOAWAY ${code}`, long: o };
    if (/connection closed/.test(o)) return { short: `closed ${why}`.trim(), long: `connection closed mid-stream ${why} (${r.profile}/${r.rule})` };
    return { short: r.fault, long: `${r.fault}: ${o}` };
  }

  function onRecord(record) {
    if (!run || !record.path) return;
    const query = new URLSearchParams(record.path.split('?')[1] || '');
    if (query.get('task') !== run.id) return;
    const client = run.clients[query.get('client')];
    if (!client) return;
    const attempt = query.has('attempt') ? Number(query.get('attempt')) : 0;
    client.proxyAction(record, attempt);
  }

  // The journal: the proxy's fault records, relayed by the backend from the control API. EventSource
  // reconnects by itself after a network error (with Last-Event-ID); after a refusal it stays closed, so
  // the page makes a new one, resuming from the last record it saw.
  let journalLastId = '';
  let journalOk = false;
  let proxyText = 'choose a fault and start an upload';
  function setProxyStatus(text) {
    if (text !== undefined) proxyText = text;
    ui.proxyStatus.textContent = journalOk ? proxyText : `${proxyText} (fault journal: reconnecting\u2026)`;
  }
  function connectJournal() {
    const es = new EventSource(journalLastId ? `/api/journal?lastEventId=${journalLastId}` : '/api/journal');
    es.onopen = () => { journalOk = true; setProxyStatus(); };
    es.addEventListener('fault', (e) => {
      journalLastId = e.lastEventId || journalLastId;
      try { onRecord(JSON.parse(e.data)); } catch (err) { console.error(err); }
    });
    es.onerror = () => {
      journalOk = false;
      setProxyStatus();
      if (es.readyState === EventSource.CLOSED) setTimeout(connectJournal, 1000);
    };
  }

  // ------------------------------------------------------------------ controls
  async function loadProfiles() {
    const resp = await fetch('/api/profiles', { cache: 'no-store' });
    const body = await resp.json();
    for (const p of body.profiles) {
      profiles.set(p.name, p);
      const opt = document.createElement('option');
      opt.value = p.name;
      opt.textContent = p.name;
      ui.profile.append(opt);
    }
    const current = body.current && body.current.profile;
    ui.profile.value = current || body.default;
    if (body.current && body.current.scale) ui.scale.value = String(body.current.scale);
    if (current !== undefined && current !== null) {
      applied = `${current}@${body.current.scale}`;
      setProxyStatus(`${current} loaded for /events, its durations ×${body.current.scale}`);
    }
    describeProfile();
  }

  function describeProfile() {
    const p = profiles.get(ui.profile.value);
    ui.desc.textContent = p ? p.description : 'No fault: the proxy passes /events untouched.';
    ui.desc.title = ui.desc.textContent;
    ui.fixText.textContent = p ? p.fix_text || 'no origin switch applies' : 'nothing to fix';
    ui.fix.disabled = !(p && p.fix);
  }

  function applyFaults() {
    const profile = ui.profile.value, scale = ui.scale.value;
    const key = `${profile}@${scale}`;
    applying = applying.then(async () => {
      if (applied === key) return;
      setProxyStatus(`loading ${profile}…`);
      const resp = await fetch(`/api/faults?profile=${encodeURIComponent(profile)}&scale=${encodeURIComponent(scale)}`, { method: 'POST' });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        applied = null;
        setProxyStatus(`could not load ${profile}: ${body.error || resp.status}`);
        return;
      }
      applied = key;
      setProxyStatus(profile === 'none'
        ? 'no fault loaded: /events passes untouched'
        : `${profile} loaded for /events (${body.rules.length} rule${body.rules.length === 1 ? '' : 's'}), its durations ×${scale}`);
    }).catch((e) => { applied = null; setProxyStatus(`could not reach the demo backend: ${e.message}`); });
    return applying;
  }

  function applyFix() {
    const p = profiles.get(ui.profile.value);
    if (!p || !p.fix) return;
    if (p.fix.heartbeat) ui.heartbeat.value = String(p.fix.heartbeat);
    if (p.fix.accel) ui.accel.checked = true;
    if (p.fix.flush) ui.flush.value = '1';
  }

  const panels = {
    naive: new Panel('naive', 'Naive', 'the incident\u2019s code: one EventSource; on error, mark the upload failed'),
    resilient: new Panel('resilient', 'Resilient', 'Last-Event-ID resume, watchdog 2\u00d7 heartbeat, backoff, polling fallback'),
  };

  function stopRun() {
    if (!run) return;
    run.over = true;
    for (const c of Object.values(run.clients)) { c.done = true; c.stop(); }
    run = null;
  }

  async function startRun() {
    stopRun();
    document.body.dataset.run = 'starting';
    ui.start.textContent = 'Restart upload';
    await applyFaults();
    const params = new URLSearchParams({
      scale: ui.scale.value, heartbeat: ui.heartbeat.value, accel: ui.accel.checked ? '1' : '0', flush: ui.flush.value,
    });
    const resp = await fetch(`/api/upload?${params}`, { method: 'POST' });
    if (!resp.ok) { setProxyStatus(`could not start an upload: HTTP ${resp.status}`); return; }
    const task = await resp.json();
    const r = (run = new Run(task, ui.profile.value));
    document.body.dataset.run = 'running';
    document.body.dataset.task = task.task;
    r.check = () => {
      if (r.over || !Object.values(r.clients).every((c) => c.done)) return;
      r.over = true;
      document.body.dataset.run = 'done';
      ui.start.textContent = 'Start upload';
    };
    for (const p of Object.values(panels)) p.reset(r);
    r.clients.naive = new Naive(panels.naive, r);
    r.clients.resilient = new Resilient(panels.resilient, r);
    for (const c of Object.values(r.clients)) c.start();
  }

  function tick() {
    const r = run;
    if (!r) return;
    const t = Date.now();
    for (const [kind, c] of Object.entries(r.clients)) {
      panels[kind].setNow(r, c.done ? c.endAt : t);
      c.tick(t);
    }
    if (!r.over && t > r.deadline) {
      for (const c of Object.values(r.clients)) if (!c.done) c.finish('stalled');
    }
  }

  function showProtocol() {
    const nav = performance.getEntriesByType('navigation')[0];
    const proto = (nav && nav.nextHopProtocol) || '';
    if (proto === 'h2') {
      ui.proto.textContent = 'Browser \u2194 proxy: HTTP/2 over TLS.';
    } else {
      ui.proto.textContent = `Browser \u2194 proxy: ${proto || 'unknown protocol'} (open the https:// address for HTTP/2).`;
      ui.proto.classList.add('warn');
    }
  }

  ui.form.addEventListener('submit', (e) => { e.preventDefault(); startRun(); });
  ui.profile.addEventListener('change', () => { describeProfile(); applyFaults(); });
  ui.scale.addEventListener('change', () => applyFaults());
  ui.fix.addEventListener('click', applyFix);
  showProtocol();
  connectJournal();
  loadProfiles().then(() => { document.body.dataset.ready = '1'; }).catch((e) => {
    setProxyStatus(`could not load the profiles: ${e.message}`);
  });
  setInterval(tick, 100);
})();
