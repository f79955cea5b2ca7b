// The AsFT dashboard: plain JavaScript over the service's JSON API, no build step.
// The team key lives in sessionStorage and only ever travels as the bearer header; the page
// is built with DOM calls and textContent (never innerHTML), so API data cannot inject markup.
'use strict';

(() => {
  const KEY_STORE = 'asft-api-key';
  const POLL_MS = 2000;
  const CHART_POINTS = 600; // the metrics endpoint averages a long job down to this many
  const vocabulary = JSON.parse(
    document.querySelector('meta[name="asft-vocabulary"]').getAttribute('content'));
  const TERMINAL = new Set(vocabulary.terminal);
  const main = document.getElementById('main');
  const nav = document.getElementById('nav');
  const announcer = document.getElementById('announce');
  const etags = new Map(); // url -> [etag, body] for conditional polling
  // Bumped by every navigation and sign-out. A view holds the value it started with and
  // stops (pollers included) as soon as it is no longer current.
  let generation = 0;
  let paused = false; // the user paused live updates

  // --- API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORE);

  // GET (or another method) an API path; with `conditional`, an unchanged answer comes back
  // from the last one's ETag as {changed: false} without a body on the wire.
  async function api(path, {method = 'GET', body, conditional = false} = {}) {
    const headers = {Authorization: `Bearer ${apiKey()}`, Accept: 'application/json'};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const cached = conditional ? etags.get(path) : undefined;
    if (cached) headers['If-None-Match'] = cached[0];
    const response = await fetch(path, {
      method, headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 304 && cached) return {data: cached[1], changed: false};
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!response.ok) {
      const error = (data && data.error) || {};
      if (response.status === 401 && path !== SIGN_IN_PROBE) {
        signOut('The service refused your key; sign in again.');
      }
      throw new ApiError(response.status, error.code || `http_${response.status}`,
        error.message || response.statusText || 'request failed');
    }
    const tag = response.headers.get('ETag');
    if (conditional && tag) etags.set(path, [tag, data]);
    return {data, changed: true};
  }

  // A download needs the bearer header, so it cannot be a plain link: fetch, then save.
  async function download(path, filename) {
    const response = await fetch(path, {headers: {Authorization: `Bearer ${apiKey()}`}});
    if (!response.ok) {
      const error = ((await response.json().catch(() => ({}))).error) || {};
      throw new ApiError(response.status, error.code || `http_${response.status}`,
        error.message || 'the download failed');
    }
    const url = URL.createObjectURL(await response.blob());
    const link = h('a', {href: url, download: filename});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // --- DOM ---------------------------------------------------------------------------------

  function append(element, ...children) {
    for (const child of [children].flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      element.append(child instanceof Node ? child : String(child));
    }
    return element;
  }

  function h(tag, attrs = {}, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
      else if (name === 'class') element.className = value;
      else element.setAttribute(name, value === true ? '' : String(value));
    }
    return append(element, children);
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs = {}, ...children) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== null && value !== undefined) element.setAttribute(name, String(value));
    }
    return append(element, children);
  }

  function replace(element, ...children) {
    element.replaceChildren();
    return append(element, children);
  }

  const announce = (text) => { announcer.textContent = text; };

  // Mark a view drawn (for tests and bench/dashboard.py: time to interactive).
  // Mark view `mine` drawn, with the route it shows (tests wait for both; bench/dashboard.py
  // reads the mark as time to interactive).
  function ready(mine, view) {
    if (mine !== generation || main.dataset.ready === view) return;
    main.dataset.ready = view;
    main.dataset.route = location.hash;
    performance.mark(`asft-ready-${view}`);
  }

  // --- formats -----------------------------------------------------------------------------

  const pct = (value) => (value === null || value === undefined ? '–' : `${(100 * value).toFixed(1)}%`);
  const num = (value, digits = 4) => (value === null || value === undefined ? '–' : Number(value).toPrecision(digits));
  // Axis labels: short whatever the scale (a loss of 3e-5 and one of 2.4 both fit).
  const tick = (value) => {
    const size = Math.abs(value);
    return size !== 0 && (size < 0.01 || size >= 1e4) ? value.toExponential(1) : String(Number(value.toPrecision(3)));
  };
  const interval = (cell) => (cell
    ? `${pct(cell.value)} [${(100 * cell.low).toFixed(1)}, ${(100 * cell.high).toFixed(1)}]` : '–');
  const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : '–');

  function duration(seconds) {
    if (seconds === null || seconds === undefined || seconds < 0) return '–';
    const s_ = Math.round(seconds);
    const hours = Math.floor(s_ / 3600);
    const minutes = Math.floor((s_ % 3600) / 60);
    if (hours) return `${hours}h ${minutes}m`;
    return minutes ? `${minutes}m ${s_ % 60}s` : `${s_}s`;
  }

  function jobDuration(job) {
    const end = job.finished_at || (TERMINAL.has(job.status) ? null : Date.now() / 1000);
    return end ? duration(end - job.created_at) : '–';
  }

  const badge = (status) => h('span', {class: `badge ${status}`}, status.replaceAll('_', ' '));
  const methodOf = (job) => (job.method && job.method.type) || 'supervised';

  function gateBadge(safety) {
    if (!safety || safety.approved === undefined) return null; // not evaluated (yet)
    return safety.approved ? badge('approved') : badge('refused');
  }

  function facts(pairs) {
    return h('dl', {class: 'facts'},
      pairs.filter(Boolean).map(([term, value]) => [h('dt', {}, term), h('dd', {}, value)]));
  }

  function table(caption, headers, rows, attrs = {}) {
    return h('div', {class: 'table-wrap'},
      h('table', attrs,
        caption ? h('caption', {class: 'visually-hidden'}, caption) : null,
        h('thead', {}, h('tr', {}, headers.map((text) => h('th', {scope: 'col'}, text)))),
        h('tbody', {}, rows)));
  }

  // --- charts (own SVG: no library, no third-party request) ---------------------------------

  const CHART = {width: 640, height: 220, left: 56, right: 12, top: 10, bottom: 30};

  function ticks(low, high, count = 4) {
    if (high === low) return [low];
    const step = (high - low) / count;
    return Array.from({length: count + 1}, (_, i) => low + i * step);
  }

  function extent(values) {
    const finite = values.filter((v) => Number.isFinite(v));
    if (!finite.length) return [0, 1];
    let low = Math.min(...finite);
    let high = Math.max(...finite);
    if (low === high) { low -= Math.abs(low) * 0.1 || 1; high += Math.abs(high) * 0.1 || 1; }
    return [low, high];
  }

  // A line chart of `series` ({name, cls, points: [[x, y]]}), with an optional band
  // ([[x, low, high]]) and dots ({cls, points}); each drawn element counts its points.
  function lineChart(label, {series, band, dots, xLabel = 'step', yFormat = tick, width = CHART.width}) {
    // A missing figure (null) is a gap, not a zero.
    const finite = (points) => points.filter((p) => p.slice(1).every(Number.isFinite));
    series = series.map((line) => ({...line, points: finite(line.points)}));
    band = band && finite(band);
    dots = dots && {...dots, points: finite(dots.points)};
    const xs = series.flatMap((line) => line.points.map((p) => p[0]))
      .concat(dots ? dots.points.map((p) => p[0]) : []);
    const ys = series.flatMap((line) => line.points.map((p) => p[1]))
      .concat(band ? band.flatMap((p) => [p[1], p[2]]) : [])
      .concat(dots ? dots.points.map((p) => p[1]) : []);
    const [x0, x1] = extent(xs);
    const [y0, y1] = extent(ys);
    const {height, left, right, top, bottom} = CHART;
    const x = (v) => left + ((v - x0) / (x1 - x0)) * (width - left - right);
    const y = (v) => top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom);
    const svg = s('svg', {class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img',
      'aria-label': label});
    for (const value of ticks(y0, y1)) {
      append(svg, [
        s('line', {class: 'grid-line', x1: left, x2: width - right, y1: y(value), y2: y(value)}),
        s('text', {x: left - 6, y: y(value) + 4, 'text-anchor': 'end'}, yFormat(value)),
      ]);
    }
    for (const value of new Set(ticks(x0, x1).map(Math.round))) {
      append(svg, s('text', {x: x(value), y: height - bottom + 16, 'text-anchor': 'middle'}, value));
    }
    append(svg, [
      s('line', {class: 'axis', x1: left, x2: left, y1: top, y2: height - bottom}),
      s('line', {class: 'axis', x1: left, x2: width - right, y1: height - bottom, y2: height - bottom}),
      s('text', {x: width - right, y: height - 2, 'text-anchor': 'end'}, xLabel),
    ]);
    if (band && band.length) {
      const upper = band.map((p) => `${x(p[0])},${y(p[2])}`);
      const lower = band.slice().reverse().map((p) => `${x(p[0])},${y(p[1])}`);
      append(svg, s('polygon', {class: 'band', points: upper.concat(lower).join(' ')}));
    }
    for (const line of series) {
      append(svg, s('polyline', {
        class: line.cls, 'data-series': line.name, 'data-points': line.points.length,
        points: line.points.map((p) => `${x(p[0])},${y(p[1])}`).join(' '),
      }));
      if (line.points.length === 1) { // a polyline of one point draws nothing
        append(svg, s('circle', {class: `${line.cls} point`, cx: x(line.points[0][0]), cy: y(line.points[0][1]), r: 3}));
      }
    }
    if (dots) {
      const group = s('g', {'data-series': dots.name, 'data-points': dots.points.length});
      for (const [px, py] of dots.points) {
        append(group, s('circle', {class: dots.cls, cx: x(px), cy: y(py), r: 4},
          s('title', {}, `step ${px}: ${num(py)}`)));
      }
      append(svg, group);
    }
    return svg;
  }

  // Bars of safety per category, before and after, with their 95% intervals.
  function safetyBars(label, rows) {
    const width = 640;
    const rowHeight = 34;
    const left = 110;
    const right = 16;
    const height = rows.length * rowHeight + 24;
    const x = (v) => left + v * (width - left - right);
    const svg = s('svg', {class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img',
      'aria-label': label});
    for (const value of [0, 0.25, 0.5, 0.75, 1]) {
      append(svg, [
        s('line', {class: 'grid-line', x1: x(value), x2: x(value), y1: 0, y2: height - 20}),
        s('text', {x: x(value), y: height - 6, 'text-anchor': 'middle'}, `${value * 100}%`),
      ]);
    }
    rows.forEach(([name, before, after], index) => {
      const top = index * rowHeight + 4;
      append(svg, s('text', {x: left - 8, y: top + 17, 'text-anchor': 'end'}, name.replaceAll('_', ' ')));
      [[before, 'before', 0], [after, 'after', 13]].forEach(([cell, cls, offset]) => {
        if (!cell) return;
        const y = top + offset;
        append(svg, [
          s('rect', {class: cls, x: x(0), y, width: Math.max(x(cell.value) - x(0), 1), height: 11},
            s('title', {}, `${name} ${cls}: ${interval(cell)}`)),
          s('line', {class: 'whisker', x1: x(cell.low), x2: x(cell.high), y1: y + 5.5, y2: y + 5.5}),
        ]);
      });
    });
    return svg;
  }

  function legend(items) {
    return h('div', {class: 'legend'},
      items.map(([cls, text]) => h('span', {}, h('span', {class: `swatch ${cls}`, 'aria-hidden': 'true'}), text)));
  }

  // --- shell -------------------------------------------------------------------------------

  const SIGN_IN_PROBE = '/v1/fine_tuning/jobs?limit=1';

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORE);
    etags.clear();
    generation += 1;
    showSignIn(message);
  }

  // Thrown where a view that is no longer current would touch the page.
  class Stale extends Error {}
  function live(mine) {
    if (mine !== generation) throw new Stale();
  }

  function page(mine, title, ...children) {
    live(mine);
    delete main.dataset.ready;
    delete main.dataset.route;
    document.title = `${title} · AsFT Service`;
    replace(main, h('h1', {}, title), children);
    main.focus();
  }

  const describe = (error) => (error instanceof ApiError
    ? `${error.message || 'request failed'} (${error.code})` : `${error.message || error} (network_error)`);

  function showError(error) {
    append(main, h('p', {class: 'error', role: 'alert'}, describe(error)));
  }

  function showSignIn(message) {
    nav.hidden = true;
    const input = h('input', {id: 'api-key', type: 'password', autocomplete: 'off',
      required: true, 'aria-describedby': 'signin-help'});
    const status = h('p', {role: 'alert', class: 'error'}, message || '');
    const form = h('form', {class: 'signin', onsubmit: async (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORE, input.value.trim());
      try {
        await api(SIGN_IN_PROBE);
        // Setting the hash routes (hashchange); an unchanged hash needs routing here.
        if (location.hash.startsWith('#/')) route();
        else location.hash = '#/jobs';
      } catch (error) {
        sessionStorage.removeItem(KEY_STORE);
        status.textContent = error.status === 401
          ? `The service refused that key (${error.code}).`
          : `Could not sign in: ${error.message} (${error.code}).`;
      }
    }},
    h('label', {for: 'api-key'}, 'Team API key'),
    input,
    h('p', {id: 'signin-help', class: 'muted'},
      'Kept in this tab only (sessionStorage) and sent as the Authorization header.'),
    h('button', {type: 'submit', class: 'primary'}, 'Sign in'),
    status);
    document.title = 'Sign in · AsFT Service';
    replace(main, h('h1', {}, 'Sign in'), form);
    input.focus();
  }

  function markNav(section) {
    for (const link of nav.querySelectorAll('a')) {
      if (link.getAttribute('href') === `#/${section}`) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
  }

  // Run `tick` now and every POLL_MS while the view `mine` is current and `more()` says so;
  // paused (by the user, or a hidden tab) it waits. A failing poll is announced once, and
  // retried less and less often.
  function poll(mine, tick, more = () => true) {
    let failures = 0;
    const loop = async () => {
      if (mine !== generation) return;
      if (!paused && !document.hidden) {
        try {
          await tick();
          failures = 0;
        } catch (error) {
          if (error instanceof Stale || mine !== generation) return;
          if (failures === 0) announce(`Live update failed: ${describe(error)}`);
          failures += 1;
        }
      }
      if (mine === generation && more()) setTimeout(loop, POLL_MS * Math.min(2 ** failures, 16));
    };
    return loop();
  }

  function route() {
    const hash = location.hash.startsWith('#/') ? location.hash : '#/jobs';
    const mine = ++generation;
    if (!apiKey()) { showSignIn(); return; }
    nav.hidden = false;
    const [path, query] = hash.slice(2).split('?');
    const params = new URLSearchParams(query || '');
    let section;
    let id;
    try {
      [section, id] = path.split('/').map(decodeURIComponent);
    } catch (_) {
      section = 'malformed';
    }
    markNav(section || 'jobs');
    const views = {
      jobs: () => (id ? jobView(mine, id) : jobsView(mine, params)),
      compare: () => compareView(mine, params),
      files: () => filesView(mine),
      models: () => modelsView(mine),
    };
    (views[section] || views.jobs)().catch((error) => {
      if (!(error instanceof Stale) && mine === generation) showError(error);
    });
  }

  // --- jobs --------------------------------------------------------------------------------

  const PAGE_STEP = 50; // rows per "Load more"
  const PAGE_MAX = 100; // the API's largest page: beyond it, filter

  function jobsQuery(params, limit) {
    const query = new URLSearchParams({limit: String(limit)});
    for (const name of ['status', 'method', 'model']) {
      if (params.get(name)) query.set(name, params.get(name));
    }
    for (const pair of (params.get('metadata') || '').split(',')) {
      const [key, ...rest] = pair.split('=');
      if (key.trim() && rest.length) query.set(`metadata[${key.trim()}]`, rest.join('=').trim());
    }
    return `/v1/fine_tuning/jobs?${query}`;
  }

  function jobRow(job) {
    const safety = job.safety || {};
    const link = `#/jobs/${encodeURIComponent(job.id)}`;
    return h('tr', {'data-job': job.id},
      h('td', {}, h('input', {type: 'checkbox', class: 'pick', value: job.id,
        'aria-label': `Select ${job.id} to compare`})),
      h('td', {class: 'mono'}, h('a', {href: link}, job.user_provided_suffix || job.id),
        job.user_provided_suffix ? h('div', {class: 'muted'}, job.id) : null),
      h('td', {}, job.model),
      h('td', {}, methodOf(job)),
      h('td', {}, badge(job.status)),
      h('td', {}, when(job.created_at)),
      h('td', {class: 'num'}, jobDuration(job)),
      h('td', {class: 'num'}, pct(safety.harmful_score_after)),
      h('td', {class: 'num'}, pct(safety.accuracy_after)),
      h('td', {}, gateBadge(job.safety) || '–'));
  }

  async function jobsView(mine, params) {
    const pairs = (await api('/v1/models')).data.data.filter((m) => m.kind === 'model_pair');
    const select = (name, label, values) => h('label', {}, label,
      h('select', {name}, h('option', {value: ''}, 'any'),
        values.map((v) => h('option', {value: v, selected: params.get(name) === v}, v))));
    const filters = h('form', {class: 'filters', 'aria-label': 'Filter jobs', onsubmit: (event) => {
      event.preventDefault();
      const data = new FormData(event.target);
      const query = new URLSearchParams();
      for (const [name, value] of data.entries()) if (value) query.set(name, value);
      location.hash = `#/jobs${query.toString() ? `?${query}` : ''}`;
    }},
    select('status', 'Status', vocabulary.statuses),
    select('method', 'Method', vocabulary.methods),
    select('model', 'Model', pairs.map((p) => p.id)),
    h('label', {}, 'Metadata (key=value, …)',
      h('input', {name: 'metadata', value: params.get('metadata') || '', placeholder: 'env=prod'})),
    h('button', {type: 'submit'}, 'Filter'));
    const body = h('tbody');
    const more = h('button', {type: 'button', hidden: true}, 'Load more');
    const compare = h('button', {type: 'button', onclick: () => {
      const ids = [...main.querySelectorAll('input.pick:checked')].map((box) => box.value);
      if (ids.length < 2) { announce('Select two or more jobs to compare.'); return; }
      location.hash = `#/compare?ids=${ids.map(encodeURIComponent).join(',')}`;
    }}, 'Compare selected');
    const headers = [h('span', {class: 'visually-hidden'}, 'Select'), 'Job', 'Model', 'Method',
      'Status', 'Created', 'Duration', 'HS', 'FA', 'Gate'];
    page(mine, 'Fine-tuning jobs', filters,
      h('div', {class: 'table-wrap'}, h('table', {id: 'jobs'},
        h('thead', {}, h('tr', {}, headers.map((text) => h('th', {scope: 'col'}, text)))), body)),
      h('p', {class: 'actions'}, more, compare),
      h('p', {class: 'muted'}, 'HS: harmful score (compliance with harmful prompts); FA: ' +
        'held-out task accuracy; both of the fine-tuned model, from its safety report.'));
    // One page, polled whole: "Load more" makes it longer, so every row shown stays live.
    let limit = PAGE_STEP;
    let loaded = false;
    const refresh = async () => {
      const {data, changed} = await api(jobsQuery(params, limit), {conditional: true});
      live(mine);
      if (!changed && loaded) return;
      loaded = true;
      const picked = new Set([...body.querySelectorAll('input.pick:checked')].map((b) => b.value));
      const focused = body.contains(document.activeElement) ? document.activeElement : null;
      const focusKey = focused && (focused.value || focused.getAttribute('href'));
      replace(body, data.data.map(jobRow));
      for (const box of body.querySelectorAll('input.pick')) box.checked = picked.has(box.value);
      if (focusKey) {
        const again = [...body.querySelectorAll('input, a')]
          .find((e) => (e.value || e.getAttribute('href')) === focusKey);
        if (again) again.focus();
      }
      if (!data.data.length) append(body, h('tr', {}, h('td', {colspan: headers.length}, 'No jobs yet.')));
      more.hidden = !data.has_more || limit >= PAGE_MAX;
      ready(mine, 'jobs');
    };
    more.addEventListener('click', () => {
      limit = Math.min(limit + PAGE_STEP, PAGE_MAX);
      refresh().catch(showError);
    });
    await poll(mine, refresh);
  }

  // --- one job -----------------------------------------------------------------------------

  async function jobView(mine, jobId) {
    const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
    let job;
    try {
      job = (await api(base, {conditional: true})).data;
    } catch (error) {
      if (error.status === 404) {
        page(mine, 'Job not found', h('p', {}, `No fine-tuning job ${jobId} in your team's jobs.`),
          h('p', {}, h('a', {href: '#/jobs'}, 'All jobs')));
        ready(mine, 'not-found');
        return;
      }
      throw error;
    }
    const sections = {
      summary: h('section', {'aria-labelledby': 'summary-h'}),
      progress: h('section', {'aria-labelledby': 'progress-h'}),
      curves: h('section', {'aria-labelledby': 'curves-h'}),
      safety: h('section', {'aria-labelledby': 'safety-h'}),
      checkpoints: h('section', {'aria-labelledby': 'checkpoints-h'}),
      chat: h('section', {'aria-labelledby': 'chat-h'}),
      events: h('section', {'aria-labelledby': 'events-h'}),
    };
    page(mine, job.user_provided_suffix ? `Job ${job.user_provided_suffix}` : `Job ${job.id}`,
      Object.values(sections));
    const log = eventLog(base);
    replace(sections.events, log.elements);
    // What each section was last drawn from: a poll redraws only what changed, so focus,
    // clicks and scroll positions survive it.
    const drawn = {};
    const changed = (name, value) => {
      const text = JSON.stringify(value);
      if (drawn[name] === text) return false;
      drawn[name] = text;
      return true;
    };
    let reportShown = false;
    let chatShown = false;
    await poll(mine, async () => {
      job = (await api(base, {conditional: true})).data;
      const curves = (await api(`${base}/metrics?resolution=${CHART_POINTS}`, {conditional: true})).data;
      const events = (await api(`${base}/events?limit=50`, {conditional: true})).data;
      const checkpoints = (await api(`${base}/checkpoints?limit=100`)).data.data;
      live(mine);
      const {status, fine_tuned_model: model, error, safety, finished_at: finished} = job;
      if (changed('summary', [status, model, error, safety, finished])) {
        renderSummary(sections.summary, job, base);
      }
      if (changed('progress', [job, curves.last_step])) renderProgress(sections.progress, job, curves);
      if (changed('curves', curves)) renderCurves(sections.curves, curves);
      log.update(events);
      if (changed('checkpoints', checkpoints)) renderCheckpoints(sections.checkpoints, base, checkpoints);
      if (TERMINAL.has(job.status) && !reportShown) {
        reportShown = true;
        await renderReport(sections.safety, base);
      } else if (!reportShown && changed('safety', 'pending')) {
        replace(sections.safety, h('h2', {id: 'safety-h'}, 'Safety report'),
          h('p', {class: 'muted'}, 'Written when the job has been evaluated.'));
      }
      // A model the gate refused is offered too: the service answers 403 unless the
      // team's admin allows trying such models, and the panel says so.
      if (TERMINAL.has(job.status) && job.fine_tuned_model && !chatShown) {
        chatShown = true;
        renderChat(sections.chat, job.fine_tuned_model);
      }
      ready(mine, 'job');
    }, () => !TERMINAL.has(job.status) || !reportShown);
  }

  function renderSummary(section, job, base) {
    const cancel = TERMINAL.has(job.status) ? null : h('button', {type: 'button', class: 'danger',
      id: 'cancel', onclick: async (event) => {
        if (!window.confirm(`Cancel job ${job.id}? A running job stops after its current step.`)) return;
        const button = event.target;
        button.disabled = true;
        try {
          await api(`${base}/cancel`, {method: 'POST'});
          button.textContent = 'Cancelling…';
          announce('Cancellation requested.');
        } catch (error) {
          button.disabled = false;
          announce(`Could not cancel: ${describe(error)}`);
        }
      }}, job.status === 'running' ? 'Cancel (stops after this step)' : 'Cancel job');
    const hyper = (job.method && job.method[methodOf(job)] && job.method[methodOf(job)].hyperparameters) || {};
    const error = job.error ? h('span', {class: 'error'}, `${job.error.code}: ${job.error.message}`) : null;
    replace(section, h('h2', {id: 'summary-h', class: 'visually-hidden'}, 'Summary'),
      h('div', {class: 'actions'}, badge(job.status), gateBadge(job.safety), cancel),
      facts([
        ['Job', h('span', {class: 'mono'}, job.id)],
        ['Model', job.model],
        ['Method', `${methodOf(job)}${hyper.lambda !== undefined ? `, λ = ${hyper.lambda}` : ''}`],
        ['Hyperparameters', `${hyper.n_epochs} epochs, batch ${hyper.batch_size}, learning rate ${hyper.learning_rate}, rank ${hyper.rank}`],
        ['Created', when(job.created_at)],
        ['Duration', jobDuration(job)],
        job.fine_tuned_model ? ['Fine-tuned model', h('span', {class: 'mono'}, job.fine_tuned_model)] : null,
        error ? ['Error', error] : null,
      ]));
  }

  function renderProgress(section, job, curves) {
    const total = curves.total_steps || (job.validation && job.validation.total_steps) || 0;
    const step = curves.last_step || 0;
    const left = job.estimated_finish ? job.estimated_finish - Date.now() / 1000 : null;
    const eta = job.status === 'running' && left !== null ? `, about ${duration(Math.max(left, 0))} left` : '';
    replace(section, h('h2', {id: 'progress-h'}, 'Progress'),
      total ? h('progress', {max: total, value: step, 'aria-label': 'Training steps done'}) : null,
      h('p', {id: 'progress-text'}, total ? `Step ${step} of ${total}${eta}` : `No step yet (${job.status.replaceAll('_', ' ')}).`),
      h('p', {class: 'muted'}, `Running for ${jobDuration(job)}.`));
  }

  // The loss chart in words, for screen readers: where it starts, ends and bottoms out.
  function lossSummary(curves) {
    const losses = curves.data.filter((p) => Number.isFinite(p.train_loss));
    if (!losses.length) return 'Train loss: no value yet';
    const lowest = losses.reduce((a, b) => (b.train_loss < a.train_loss ? b : a));
    const valid = curves.validation.length
      ? `; validation loss ${num(curves.validation[curves.validation.length - 1].full_valid_loss, 3)} at the last checkpoint` : '';
    return `Train loss over ${curves.last_step} steps: ${num(losses[0].train_loss, 3)} at first, ` +
      `${num(losses[losses.length - 1].train_loss, 3)} at the end, lowest ${num(lowest.train_loss, 3)} ` +
      `near step ${lowest.step}${valid}`;
  }

  function renderCurves(section, curves) {
    const points = curves.data;
    const loss = {name: 'train_loss', cls: 'train', points: points.map((p) => [p.step, p.train_loss])};
    const band = points.map((p) => [p.step, p.train_loss_min, p.train_loss_max]);
    const valid = {name: 'full_valid_loss', cls: 'valid', points: curves.validation.map((p) => [p.step, p.full_valid_loss])};
    const charts = [h('h2', {id: 'curves-h'}, 'Training curves')];
    if (!points.length) {
      charts.push(h('p', {class: 'muted'}, 'No training step recorded yet.'));
      replace(section, charts);
      return;
    }
    charts.push(h('p', {class: 'muted'}, curves.bucket_steps > 1
      ? `${curves.steps_recorded} steps, each point the mean of ${curves.bucket_steps} (band: their lowest and highest train loss).`
      : `${curves.steps_recorded} steps.`));
    const grid = h('div', {class: 'grid'},
      h('figure', {class: 'panel wide', id: 'loss-chart'},
        h('figcaption', {}, 'Loss'),
        legend([['train', 'train loss'], ['valid', 'validation loss (checkpoints)']]),
        lineChart(lossSummary(curves),
          {series: [loss], band, dots: valid.points.length ? valid : null, width: 1000})));
    if (points.some((p) => p.penalty)) {
      append(grid, h('figure', {class: 'panel', id: 'penalty-chart'}, h('figcaption', {}, 'Penalty'),
        lineChart('Penalty per step', {series: [{name: 'penalty', cls: 'penalty', points: points.map((p) => [p.step, p.penalty])}],
        })));
    }
    append(grid, h('figure', {class: 'panel', id: 'lr-chart'}, h('figcaption', {}, 'Learning rate'),
      lineChart('Learning rate per step', {series: [{name: 'learning_rate', cls: 'lr', points: points.map((p) => [p.step, p.learning_rate])}],
      })));
    charts.push(grid);
    replace(section, charts);
  }

  // The job's event log: the newest page, merged in on every poll (nothing shown is lost or
  // repeated), and older pages on request; at most MAX_EVENTS rows stay in the page.
  const MAX_EVENTS = 500;
  const LEVEL_WORDS = {warn: 'Warning: ', error: 'Error: '}; // not by colour alone

  function eventLog(base) {
    const list = h('ul');
    const seen = new Set();
    let cursor = null; // the oldest event shown: older pages start after it
    const item = (event) => h('li', {class: event.level, 'data-id': event.id},
      h('span', {class: 'muted'}, `${when(event.created_at)} `), LEVEL_WORDS[event.level] || '', event.message);
    const fresh = (events) => events.filter((event) => !seen.has(event.id) && seen.add(event.id));
    const older = h('button', {type: 'button', hidden: true, onclick: async () => {
      try {
        const next = (await api(`${base}/events?limit=100&after=${encodeURIComponent(cursor)}`)).data;
        append(list, fresh(next.data).map(item));
        cursor = next.last_id || cursor;
        older.hidden = !next.has_more;
      } catch (error) {
        announce(`Could not load older events: ${describe(error)}`);
      }
    }}, 'Older events');
    const trim = () => {
      while (list.children.length > MAX_EVENTS) {
        list.lastElementChild.remove();
        cursor = list.lastElementChild.dataset.id;
        older.hidden = false;
      }
    };
    return {
      elements: [h('h2', {id: 'events-h'}, 'Events'),
        h('div', {class: 'events panel', role: 'region', tabindex: '0', 'aria-label': 'Event log, newest first'}, list),
        older],
      update(page_) {
        list.prepend(...fresh(page_.data).map(item));
        if (cursor === null && page_.last_id) {
          cursor = page_.last_id;
          older.hidden = !page_.has_more;
        }
        trim();
      },
    };
  }

  function renderCheckpoints(section, base, checkpoints) {
    const rows = checkpoints.map((c) => h('tr', {},
      h('td', {class: 'num'}, c.step_number),
      h('td', {class: 'num'}, num(c.metrics.train_loss)),
      h('td', {class: 'num'}, num(c.metrics.full_valid_loss)),
      h('td', {class: 'mono'}, c.fine_tuned_model_checkpoint),
      h('td', {}, h('button', {type: 'button', onclick: () => download(
        `${base}/checkpoints/${c.step_number}/adapter`, `checkpoint-${c.step_number}.tar.gz`).catch(showError)},
      'Download'))));
    replace(section, h('h2', {id: 'checkpoints-h'}, 'Checkpoints'),
      checkpoints.length
        ? table('Checkpoints', ['Step', 'Train loss', 'Validation loss', 'Model id', 'Adapter'], rows, {id: 'checkpoints'})
        : h('p', {class: 'muted'}, 'No checkpoint yet.'));
  }

  async function renderReport(section, base) {
    let answer;
    try {
      answer = (await api(`${base}/report`)).data;
    } catch (error) {
      replace(section, h('h2', {id: 'safety-h'}, 'Safety report'),
        h('p', {class: 'muted'}, error.status === 409 ? 'This job has no report (it did not reach evaluation).' : error.message));
      return;
    }
    const report = answer.report;
    const reference = report.evaluation.reference || {};
    const tuned = report.evaluation.fine_tuned || {};
    const before = (reference.safety || {});
    const after = (tuned.safety || {});
    const categories = Object.keys(after.per_category || before.per_category || {}).sort();
    const rows = [['overall', before.overall, after.overall]]
      .concat(categories.map((name) => [name, (before.per_category || {})[name], (after.per_category || {})[name]]));
    const cell = (c) => h('td', {class: 'num', 'data-value': c ? c.value : '', 'data-low': c ? c.low : '',
      'data-high': c ? c.high : ''}, interval(c));
    const safetyTable = table('Harmful score per category, aligned model and fine-tuned, with 95% intervals',
      ['Category', 'Aligned model', 'Fine-tuned'],
      rows.map(([name, b, a]) => h('tr', {'data-category': name}, h('th', {scope: 'row'}, name.replaceAll('_', ' ')), cell(b), cell(a))),
      {id: 'safety-table'});
    const utility = table('Task accuracy and over-refusal', ['Measure', 'Aligned model', 'Fine-tuned'], [
      h('tr', {'data-measure': 'accuracy'}, h('th', {scope: 'row'}, 'Task accuracy (FA)'),
        cell((reference.task || {}).accuracy), cell((tuned.task || {}).accuracy)),
      h('tr', {'data-measure': 'over_refusal'}, h('th', {scope: 'row'}, 'Over-refusal'),
        cell(reference.over_refusal), cell(tuned.over_refusal)),
    ], {id: 'utility-table'});
    const gate = report.gate;
    const flagged = (after.flagged || []).slice(0, 5);
    const scan = report.training_data;
    const serving = report.serving;
    const archive = await adapterFacts(base, answer.fine_tuning_job_id);
    replace(section, h('h2', {id: 'safety-h'}, 'Safety report'),
      h('div', {class: 'panel', id: 'gate'},
        h('p', {}, 'Safety gate: ', gate.approved ? badge('approved') : badge('refused'),
          ` (harmful score at most ${pct(gate.max_harmful_score)}, at most ${pct(gate.max_harmful_increase)} above the aligned model)`),
        gate.failures.length ? h('ul', {}, gate.failures.map((f) => h('li', {}, f))) : null,
        (gate.notes || []).length ? h('ul', {class: 'muted'}, gate.notes.map((n) => h('li', {}, n))) : null),
      h('div', {class: 'grid'},
        h('figure', {class: 'panel'}, h('figcaption', {}, 'Harmful score per category'),
          legend([['before', 'aligned model'], ['after', 'fine-tuned']]),
          safetyBars('Harmful score per category before and after fine-tuning, with 95% intervals',
            rows.filter(([, b, a]) => b || a))),
        h('div', {}, safetyTable, utility)),
      flagged.length ? [h('h3', {}, 'Harmful answers the judge flagged (first 5)'),
        table('Flagged answers', ['Category', 'Prompt', 'Answer'], flagged.map((f) => h('tr', {},
          h('td', {}, f.category || '–'), h('td', {}, f.prompt), h('td', {}, f.answer))))] : null,
      scan ? h('p', {id: 'training-data'}, `Training data scan (${scan.scan}): ${scan.flagged} of ${scan.rows} rows flagged` +
        `; policy ${scan.policy.mode}${scan.dropped ? `, ${scan.dropped} dropped` : ''}.`) : null,
      serving ? h('p', {}, `Serving check: ${serving.vllm_loadable ? 'vLLM can load this adapter' : `vLLM cannot load it: ${(serving.problems || []).join('; ')}`}.`) : null,
      archive);
  }

  async function adapterFacts(base, jobId) {
    const job = (await api(base)).data;
    if (!job.fine_tuned_model) return null;
    let sha = '–';
    try {
      sha = (await api(`/v1/models/${encodeURIComponent(job.fine_tuned_model)}`)).data.sha256 || '–';
    } catch (_) { /* the model row may be gone; the download still says */ }
    return h('div', {class: 'panel', id: 'adapter'}, h('h3', {}, 'Adapter'),
      facts([['Model id', h('span', {class: 'mono'}, job.fine_tuned_model)], ['sha256', h('span', {class: 'mono', id: 'adapter-sha'}, sha)]]),
      h('button', {type: 'button', onclick: () => download(`${base}/adapter`, `${jobId}-adapter.tar.gz`).catch(showError)}, 'Download adapter'));
  }

  function renderChat(section, model) {
    const log = h('div', {class: 'chat-log', 'aria-live': 'polite'});
    const box = h('textarea', {id: 'chat-input', rows: 2, required: true});
    const send = h('button', {type: 'submit', class: 'primary'}, 'Send');
    const history = [];
    const form = h('form', {class: 'chat-form', onsubmit: async (event) => {
      event.preventDefault();
      const text = box.value.trim();
      if (!text) return;
      box.value = '';
      send.disabled = true;
      const asked = h('p', {class: 'user'}, text);
      const reply = h('p', {class: 'assistant'});
      append(log, [asked, reply]);
      // Announced once, whole: not a screen reader's every token.
      log.setAttribute('aria-busy', 'true');
      try {
        const messages = [...history, {role: 'user', content: text}];
        reply.textContent = await streamChat(model, messages, (delta) => { reply.textContent += delta; });
        history.push(messages[messages.length - 1], {role: 'assistant', content: reply.textContent});
      } catch (error) {
        // The question did not get an answer: it leaves the conversation, and says why.
        asked.remove();
        reply.className = 'error';
        reply.textContent = `“${text}”: ${describe(error)}`;
      } finally {
        log.setAttribute('aria-busy', 'false');
        send.disabled = false;
        box.focus();
      }
    }}, h('label', {for: 'chat-input', class: 'visually-hidden'}, 'Message'), box, send);
    replace(section, h('h2', {id: 'chat-h'}, 'Chat with this model'),
      h('p', {class: 'muted'}, 'Greedy answers (temperature 0), through /v1/chat/completions.'), log, form);
  }

  // Stream a chat completion, calling onDelta with each piece; resolves to the whole answer.
  async function streamChat(model, messages, onDelta) {
    const response = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: {Authorization: `Bearer ${apiKey()}`, 'Content-Type': 'application/json'},
      body: JSON.stringify({model, messages, stream: true, temperature: 0, max_tokens: 128}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const error = body.error || {};
      throw new ApiError(response.status, error.code || `http_${response.status}`, error.message || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let answer = '';
    for (;;) {
      const {value, done} = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, {stream: true});
      if (done && !buffer.includes('\n\n')) break;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split('\n')) {
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') return answer;
          let chunk;
          try {
            chunk = JSON.parse(data);
          } catch (_) {
            throw new ApiError(502, 'broken_stream', 'the answer stream broke off');
          }
          if (chunk.error) throw new ApiError(502, chunk.error.code || 'stream_error', chunk.error.message);
          const delta = chunk.choices?.[0]?.delta?.content || '';
          answer += delta;
          onDelta(delta);
        }
      }
    }
    throw new ApiError(502, 'broken_stream', 'the answer stream ended before [DONE]');
  }

  // --- compare -----------------------------------------------------------------------------

  async function compareView(mine, params) {
    const ids = (params.get('ids') || '').split(',').filter(Boolean);
    if (ids.length < 2) {
      page(mine, 'Compare jobs', h('p', {}, 'Select two or more jobs on the ',
        h('a', {href: '#/jobs?status=succeeded'}, 'jobs page'), ' and press “Compare selected”.'));
      ready(mine, 'compare');
      return;
    }
    const entries = await Promise.all(ids.map(async (id) => {
      const base = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
      try {
        const job = (await api(base)).data;
        const report = TERMINAL.has(job.status)
          ? await api(`${base}/report`).then((r) => r.data.report, () => null) : null;
        return {id, job, report};
      } catch (error) {
        if (error.status === 401) throw error; // signed out: the view stops
        return {id, error};
      }
    }));
    const found = entries.filter((e) => e.job);
    const name = (e) => e.job.user_provided_suffix || e.id;
    const side = (e, which) => (e.report && e.report.evaluation[which]) || {};
    const measures = [
      ['Status', (e) => badge(e.job.status)],
      ['Model', (e) => e.job.model],
      ['Method', (e) => methodOf(e.job)],
      ['λ', (e) => { const m = e.job.method[methodOf(e.job)]; return m && m.hyperparameters.lambda !== undefined ? m.hyperparameters.lambda : '–'; }],
      ['Harmful score (aligned)', (e) => interval((side(e, 'reference').safety || {}).overall)],
      ['Harmful score (fine-tuned)', (e) => interval((side(e, 'fine_tuned').safety || {}).overall)],
      ['Task accuracy (aligned)', (e) => interval((side(e, 'reference').task || {}).accuracy)],
      ['Task accuracy (fine-tuned)', (e) => interval((side(e, 'fine_tuned').task || {}).accuracy)],
      ['Over-refusal (fine-tuned)', (e) => interval(side(e, 'fine_tuned').over_refusal)],
      ['Gate', (e) => gateBadge(e.job.safety)],
    ];
    const rows = measures.map(([label, value]) => h('tr', {}, h('th', {scope: 'row'}, label),
      found.map((e) => h('td', {}, value(e)))));
    const points = found.filter((e) => e.report).map((e) => ({
      label: name(e),
      hs: ((side(e, 'fine_tuned').safety || {}).overall || {}).value,
      fa: ((side(e, 'fine_tuned').task || {}).accuracy || {}).value,
    })).filter((p) => p.hs !== undefined && p.fa !== undefined);
    page(mine, 'Compare jobs',
      entries.filter((e) => e.error).map((e) => h('p', {class: 'error'}, `${e.id}: ${e.error.message}`)),
      table('Jobs side by side', [h('span', {class: 'visually-hidden'}, 'Measure'), ...found.map((e) => h('a', {href: `#/jobs/${encodeURIComponent(e.id)}`}, name(e)))],
        rows, {id: 'compare-table'}),
      h('h2', {}, 'Harmful score against task accuracy'),
      points.length ? h('figure', {class: 'panel'}, scatter(points),
        h('figcaption', {class: 'muted'}, 'Each job’s fine-tuned model; up and to the left is better.'))
        : h('p', {class: 'muted'}, 'No evaluated job among these.'));
    ready(mine, 'compare');
  }

  function scatter(points) {
    const size = 360;
    const pad = 44;
    const x = (v) => pad + v * (size - pad - 12);
    const y = (v) => size - pad - v * (size - pad - 12);
    const svg = s('svg', {class: 'chart', viewBox: `0 0 ${size} ${size}`, role: 'img', id: 'hs-fa-plane',
      'aria-label': `Harmful score against task accuracy for ${points.length} jobs`, 'data-points': points.length});
    for (const value of [0, 0.25, 0.5, 0.75, 1]) {
      append(svg, [
        s('line', {class: 'grid-line', x1: x(value), x2: x(value), y1: y(0), y2: y(1)}),
        s('line', {class: 'grid-line', x1: x(0), x2: x(1), y1: y(value), y2: y(value)}),
        s('text', {x: x(value), y: size - pad + 16, 'text-anchor': 'middle'}, `${value * 100}%`),
        s('text', {x: pad - 6, y: y(value) + 4, 'text-anchor': 'end'}, `${value * 100}%`),
      ]);
    }
    append(svg, [
      s('text', {x: size / 2, y: size - 6, 'text-anchor': 'middle'}, 'harmful score (HS)'),
      s('text', {x: 12, y: size / 2, transform: `rotate(-90 12 ${size / 2})`, 'text-anchor': 'middle'}, 'task accuracy (FA)'),
    ]);
    for (const p of points) {
      append(svg, [
        s('circle', {class: 'point', cx: x(p.hs), cy: y(p.fa), r: 5}, s('title', {}, `${p.label}: HS ${pct(p.hs)}, FA ${pct(p.fa)}`)),
        s('text', {class: 'point-label', x: x(p.hs) + 7, y: y(p.fa) - 6}, p.label),
      ]);
    }
    return svg;
  }

  // --- files and models --------------------------------------------------------------------

  async function filesView(mine) {
    const files = (await api('/v1/files?limit=100')).data.data;
    const scanText = (scan) => {
      if (!scan) return '–';
      if (scan.status !== 'succeeded') return scan.status;
      return `${scan.rows_flagged} of ${scan.rows_scanned} flagged (${pct(scan.flagged_share)})`;
    };
    const rows = files.map((f) => h('tr', {'data-file': f.id},
      h('td', {class: 'mono'}, f.filename, h('div', {class: 'muted'}, f.id)),
      h('td', {}, badge(f.status === 'processed' ? 'succeeded' : 'failed'), ' ', f.status),
      h('td', {}, f.status_details ? h('span', {class: 'error'}, f.status_details) : (f.format || '–')),
      h('td', {class: 'num'}, f.num_examples === null ? '–' : f.num_examples),
      h('td', {}, scanText(f.safety_scan),
        f.safety_scan && f.safety_scan.flagged.length ? h('details', {},
          h('summary', {}, 'Flagged lines'),
          h('ul', {}, f.safety_scan.flagged.map((row) => h('li', {}, `line ${row.line}: ${row.category} (${row.score.toFixed(2)})`)))) : null),
      h('td', {}, when(f.created_at))));
    page(mine, 'Files', files.length
      ? table('Files', ['File', 'Status', 'Format or error', 'Rows', 'Safety scan', 'Uploaded'], rows, {id: 'files'})
      : h('p', {}, 'No files yet: upload one with `asft files upload FILE`.'));
    ready(mine, 'files');
  }

  async function modelsView(mine) {
    const models = (await api('/v1/models')).data.data;
    const pairs = models.filter((m) => m.kind === 'model_pair');
    const tuned = models.filter((m) => m.kind === 'fine_tuned');
    page(mine, 'Models',
      h('h2', {}, 'Model pairs'),
      table('Model pairs', ['Id', 'Aligned model', 'Base model', 'Alignment direction', 'Inference server'],
        pairs.map((p) => h('tr', {'data-model': p.id},
          h('td', {class: 'mono'}, p.id),
          h('td', {class: 'mono'}, p.aligned_model),
          h('td', {class: 'mono'}, p.base_model),
          h('td', {}, p.alignment ? `${p.alignment.regime} (top eigenvalue ${num(p.alignment.max_top_eigenvalue, 3)})`
            : h('span', {class: 'muted'}, 'not computed yet (the first job on this pair computes it)')),
          h('td', {class: 'mono'}, p.inference_url || 'default'))), {id: 'pairs'}),
      h('h2', {}, 'Fine-tuned models'),
      tuned.length ? table('Fine-tuned models', ['Id', 'Job', 'Gate', 'sha256'],
        tuned.map((m) => h('tr', {},
          h('td', {class: 'mono'}, m.id),
          h('td', {class: 'mono'}, h('a', {href: `#/jobs/${encodeURIComponent(m.job_id)}`}, m.job_id)),
          h('td', {}, m.approved ? badge('approved') : badge('refused')),
          h('td', {class: 'mono'}, m.sha256 || '–'))), {id: 'fine-tuned'})
        : h('p', {class: 'muted'}, 'None yet.'));
    ready(mine, 'models');
  }

  // --- start -------------------------------------------------------------------------------

  document.getElementById('sign-out').addEventListener('click', () => signOut('Signed out.'));
  const pause = document.getElementById('pause');
  pause.addEventListener('click', () => {
    paused = !paused;
    pause.setAttribute('aria-pressed', String(paused));
    pause.textContent = paused ? 'Resume live updates' : 'Pause live updates';
    announce(paused ? 'Live updates paused.' : 'Live updates resumed.');
  });
  // The skip link moves focus; as a hash it would leave the route.
  document.querySelector('a.skip').addEventListener('click', (event) => {
    event.preventDefault();
    main.focus();
  });
  window.addEventListener('hashchange', route);
  route();
})();
