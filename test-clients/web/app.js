// chat-relay browser test client: plain ES2020, no dependencies, no build step.
//
// Layout of this file:
//   1. helpers        ids, time, DOM building (text only: user data never goes through innerHTML)
//   2. settings       join form <-> localStorage / URL query
//   3. room state     what this page has seen per room: frames by stream id, resume cursor
//   4. rendering      message list kept in stream-id order, LLM turn bubbles, presence, typing
//   5. frame handling one function per server event
//   6. connection     WebSocket lifecycle, backoff, history loading
//   7. composer       send / ask LLM / typing
//   8. start-up
'use strict';

(() => {
  // ---------------------------------------------------------------- 1. helpers

  const $ = (id) => document.getElementById(id);
  const SID_RE = /^[A-Za-z0-9._-]{1,128}$/;
  const TYPING_SEND_MS = 2000; // protocol: at most one chat.typing per 2 s
  const TYPING_SHOW_MS = 4000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const STABLE_MS = 3000; // a socket open this long resets the backoff
  const UNCONFIRMED_MS = 8000; // after a resume, how long an un-acked send may stay "pending"
  const HISTORY_LIMIT = 100;

  /** "1700000000000-3" -> [1700000000000n, 3n]. BigInt because seq is a u64 and may pass 2^53. */
  function parseId(id) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(String(id));
    return m ? [BigInt(m[1]), BigInt(m[2] || '0')] : [-1n, -1n];
  }

  /** Stream ids compare numerically (ms, then seq); string compare breaks at digit-count changes. */
  function cmpId(a, b) {
    const [am, as] = parseId(a);
    const [bm, bs] = parseId(b);
    if (am !== bm) return am < bm ? -1 : 1;
    if (as !== bs) return as < bs ? -1 : 1;
    return 0;
  }

  function newCid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }

  function fmtTime(ms) {
    const d = new Date(Number(ms));
    if (Number.isNaN(d.getTime())) return '';
    return `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
  }

  /** Builds an element; `children` are nodes or strings (strings become text nodes, never HTML). */
  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  /** Text with each "@llm" wrapped in a span, built from text nodes so it stays XSS-safe. */
  function mentionText(text) {
    const frag = document.createDocumentFragment();
    String(text).split(/(@llm\b)/).forEach((part, i) => {
      frag.append(i % 2 ? el('span', { class: 'mention', text: part }) : part);
    });
    return frag;
  }

  // ---------------------------------------------------------------- 2. settings

  const STORE_KEY = 'chat-relay.settings';

  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(STORE_KEY) || '{}'); } catch (_) { /* private mode */ }
    const q = new URLSearchParams(location.search);
    return {
      sid: q.get('sid') || saved.sid || 'room001',
      role: q.get('role') || saved.role || 'A',
      // The token lives in sessionStorage, not localStorage: a bearer credential should not outlive the tab.
      token: q.get('token') || sessionStorage.getItem('chat-relay.token') || '',
      autojoin: q.get('autojoin') === '1',
    };
  }

  function saveSettings(s) {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify({ sid: s.sid, role: s.role }));
      if (s.token) sessionStorage.setItem('chat-relay.token', s.token);
      else sessionStorage.removeItem('chat-relay.token');
    } catch (_) { /* storage may be disabled; the form still works */ }
  }

  // ---------------------------------------------------------------- 3. room state

  // Everything the page has seen, per room, for the page's lifetime: re-joining a room re-renders
  // from here and resumes from `lastId`, so nothing is fetched or shown twice.
  const rooms = new Map(); // sid -> { sid, frames: Map<id, frame>, lastId, historyLoaded }

  function roomFor(sid) {
    if (!rooms.has(sid)) rooms.set(sid, { sid, frames: new Map(), lastId: null, historyLoaded: false });
    return rooms.get(sid);
  }

  // What is on screen for the current room; rebuilt on each join.
  const view = {
    room: null,
    role: 'A',
    token: '',
    pending: new Map(),  // cid -> { el, event, text, state } for our own sends until their entry arrives
    turns: new Map(),    // turn_id -> { el, text, seq, attempt, state }
    presence: { version: -1, members: [] }, // the newest `presence` snapshot from the relay
    typing: new Map(),   // role -> timeout handle
  };

  // ---------------------------------------------------------------- 4. rendering

  const list = () => $('messages');

  // Whether the reader is at the bottom of the list. Tracked from scroll events rather than
  // measured at insert time, so growth from any source (new entries, a streaming reply, a
  // resized window) keeps a following reader at the bottom and leaves a reader of old messages alone.
  let following = true;

  function stickToBottom(force = false) {
    if (force) following = true;
    if (following) list().scrollTop = list().scrollHeight;
  }

  /**
   * Puts an element with data-id at its place in stream-id order. Elements without an id
   * (pending sends, streaming bubbles) float below every stored entry until they get one.
   */
  function place(node) {
    const id = node.dataset.id;
    const l = list();
    let ref = null;
    for (let c = l.lastElementChild; c; c = c.previousElementSibling) {
      if (c === node) continue;
      if (!c.dataset.id || cmpId(c.dataset.id, id) > 0) { ref = c; continue; }
      break;
    }
    if (node.nextElementSibling !== ref || node.parentNode !== l) l.insertBefore(node, ref);
  }

  function badge(role, label) {
    return el('span', { class: 'badge', 'data-role': role, text: label || role });
  }

  function timeEl(ts) {
    return el('time', { datetime: new Date(Number(ts) || 0).toISOString(), title: new Date(Number(ts) || 0).toLocaleString(), text: fmtTime(ts) });
  }

  function setStoredAttrs(node, frame) {
    const hd = frame.hd;
    node.dataset.id = hd.id;
    node.dataset.event = hd.event || '';
    node.dataset.role = hd.role || '';
    const t = node.querySelector('time');
    const ts = hd.ts || Number(parseId(hd.id)[0]);
    if (t) t.replaceWith(timeEl(ts));
  }

  /** A chat line: badge, time, text. Used for stored messages and our own pending sends. */
  function messageEl(role, event, text, ts) {
    const body = el('div', { class: 'text' }, [mentionText(text)]);
    const kids = [badge(role), timeEl(ts), body];
    if (event === 'llm.request') kids.splice(2, 0, el('span', { class: 'tag', text: 'to LLM' }));
    return el('li', { class: 'msg', 'data-event': event, 'data-role': role }, kids);
  }

  /** A one-line system entry (join, leave, cancel, unknown events). */
  function systemEl(text, ts) {
    return el('li', { class: 'msg sys' }, [badge('system', 'system'), timeEl(ts), el('div', { class: 'text', text })]);
  }

  function showFailure(node, message, code) {
    node.querySelector('.error')?.remove();
    node.append(el('div', { class: 'error' }, [message || 'failed', code ? el('small', { class: 'code', text: ` ${code}` }) : null]));
  }

  // --- LLM turns: one bubble per turn_id, whether it starts from deltas or from the stored reply.

  function turnFor(turnId) {
    let t = view.turns.get(turnId);
    if (!t) {
      const cancel = el('button', { type: 'button', class: 'cancel', text: 'Cancel', onclick: () => cancelTurn(turnId, cancel) });
      const node = el('li', { class: 'msg llm', 'data-turn': turnId, 'data-role': 'llm', 'data-state': 'streaming' },
        [badge('llm'), timeEl(Date.now()), el('div', { class: 'text' }), cancel]);
      t = { el: node, text: '', seq: -1, attempt: 0, state: 'streaming' };
      view.turns.set(turnId, t);
      list().append(node);
      stickToBottom();
    }
    return t;
  }

  function finishTurn(t, state) {
    t.state = state;
    t.el.dataset.state = state;
    t.el.querySelector('.cancel')?.remove();
  }

  // --- presence and typing

  // Who is here comes from the relay's `presence` snapshots (on join, then on every change, on
  // any node): one line per member (role and token subject), with its number of connections.
  function renderPresence() {
    const ul = $('presence');
    ul.replaceChildren();
    for (const m of view.presence.members) {
      const tabs = m.connections > 1 ? `${m.connections} tabs` : '';
      ul.append(el('li', { 'data-role': m.role, 'data-sub': m.sub || '', 'data-connections': String(m.connections), title: m.sub ? `${m.sub} as ${m.role}` : m.role },
        [badge(m.role), m.sub ? el('span', { text: ` ${m.sub}` }) : null, tabs ? el('small', { text: ` ${tabs}` }) : null]));
    }
    if (!view.presence.members.length) ul.append(el('li', { class: 'empty', text: 'nobody yet' }));
  }

  function renderTyping() {
    const who = [...view.typing.keys()];
    $('typing').textContent = who.length === 0 ? ''
      : who.length === 1 ? `${who[0]} is typing…` : `${who.join(', ')} are typing…`;
  }

  function stopTyping(role) {
    clearTimeout(view.typing.get(role));
    if (view.typing.delete(role)) renderTyping();
  }

  // --- notices

  /** A dismissible notice; `code` is the machine code, shown small for bug reports. */
  function notice(message, { code = null, kind = 'info', sticky = false } = {}) {
    const box = $('notices');
    const n = el('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status', 'data-code': code }, [
      el('span', { text: message }),
      code ? el('small', { class: 'code', text: code }) : null,
      el('button', { type: 'button', class: 'close', 'aria-label': 'Dismiss', text: '×', onclick: () => n.remove() }),
    ]);
    box.append(n);
    while (box.children.length > 5) box.firstElementChild.remove();
    if (!sticky) setTimeout(() => n.remove(), 8000);
  }

  // ---------------------------------------------------------------- 5. frame handling

  /**
   * Entry point for every stored entry, live or from history. The frames Map is the single
   * dedupe point: an id is rendered at most once per room, however often it is delivered.
   */
  function handleStored(frame) {
    const room = view.room;
    const id = frame.hd.id;
    if (!room.lastId || cmpId(id, room.lastId) > 0) room.lastId = id;
    if (room.frames.has(id)) return;
    room.frames.set(id, frame);
    renderStored(frame);
    stickToBottom();
  }

  function renderStored(frame) {
    const { hd, bd = {} } = frame;
    const ts = hd.ts || Number(parseId(hd.id)[0]);
    switch (hd.event) {
      case 'chat.message':
      case 'llm.request': {
        stopTyping(hd.role);
        const mine = hd.cid && view.pending.get(hd.cid);
        let node;
        if (mine) {
          // Our own send came back through the room feed: promote the pending bubble in place.
          // It may have been marked failed as "unconfirmed" meanwhile; the entry proves it was stored.
          view.pending.delete(hd.cid);
          node = mine.el;
          node.dataset.state = 'delivered';
          node.querySelector('.error')?.remove();
        } else {
          node = messageEl(hd.role, hd.event, bd.text ?? bd.raw ?? '', ts);
        }
        setStoredAttrs(node, frame);
        place(node);
        return;
      }
      case 'llm.response':
      case 'llm.error': {
        const t = turnFor(hd.turn_id || hd.id);
        let node = t.el;
        if (node.dataset.id && node.dataset.id !== hd.id) {
          // A second final for one turn (e.g. a redelivered turn answered twice): the bubble keeps
          // the first, and this one becomes a quiet line so every stored entry is still visible.
          const what = hd.event === 'llm.error' ? `error: ${bd.message || hd.code}` : bd.text;
          node = systemEl(`another LLM ${hd.event === 'llm.error' ? 'result' : 'reply'} for an earlier turn – ${what}`, ts);
          setStoredAttrs(node, frame);
          place(node);
          return;
        }
        setStoredAttrs(node, frame);
        if (hd.event === 'llm.response') {
          node.querySelector('.text').textContent = bd.text ?? t.text;
          finishTurn(t, bd.reason === 'cancelled' ? 'cancelled' : 'done');
          if (bd.reason === 'cancelled') node.append(el('span', { class: 'note', text: '(cancelled)' }));
          const u = bd.usage;
          if (u && u.total_tokens != null) {
            node.append(el('small', { class: 'usage', text: `${u.prompt_tokens} + ${u.completion_tokens} = ${u.total_tokens} tokens` }));
          }
        } else {
          finishTurn(t, 'error');
          showFailure(node, bd.message || 'the LLM could not answer', hd.code);
        }
        place(node);
        return;
      }
      case 'session.join':
      case 'session.leave': {
        const node = systemEl(`${hd.role} ${hd.event === 'session.join' ? 'joined' : 'left'}${hd.conn ? ` (${hd.conn})` : ''}`, ts);
        setStoredAttrs(node, frame);
        place(node);
        return;
      }
      case 'session.created': {
        // The first entry of a session created with POST /api/sessions.
        const node = systemEl('session created', ts);
        setStoredAttrs(node, frame);
        place(node);
        return;
      }
      case 'llm.cancel': {
        const node = systemEl(`${hd.role} stopped an LLM reply`, ts);
        setStoredAttrs(node, frame);
        place(node);
        return;
      }
      default: {
        // Entries written by other tools still get a line, so the list mirrors the stream.
        const node = systemEl(`${hd.event || 'entry'}: ${bd.text ?? bd.raw ?? JSON.stringify(bd)}`, ts);
        setStoredAttrs(node, frame);
        place(node);
      }
    }
  }

  /** Transient and control frames; anything with hd.id is a stored entry. */
  function handleFrame(frame) {
    const hd = frame && frame.hd;
    if (!hd || typeof hd.event !== 'string') return;
    if (hd.event === 'chat.ack') return onAck(hd);
    if (hd.event === 'error') return onError(hd, frame.bd || {});
    if (hd.event === 'resume_gap') {
      const bd = frame.bd || {};
      return notice(bd.message || `Some history was lost: the oldest entry still kept is ${bd.oldest_id}.`,
        { code: 'resume_gap', kind: 'warn', sticky: true });
    }
    if (hd.id) return handleStored(frame);
    switch (hd.event) {
      case 'presence': {
        const bd = frame.bd || {};
        if (!Number.isInteger(bd.version) || bd.version < view.presence.version || !Array.isArray(bd.members)) return;
        view.presence = { version: bd.version, members: bd.members };
        renderPresence();
        return;
      }
      case 'chat.typing': {
        if (hd.role === view.role) return; // our own echo; a same-role tab elsewhere is hidden too
        clearTimeout(view.typing.get(hd.role));
        view.typing.set(hd.role, setTimeout(() => stopTyping(hd.role), TYPING_SHOW_MS));
        renderTyping();
        return;
      }
      // The rule for a reply in progress: llm.start sets the turn's text to bd.text (the reply
      // so far, up to delta bd.seq; a new attempt starts over); each next-seq llm.delta appends.
      case 'llm.start': {
        const t = hd.turn_id && turnFor(hd.turn_id);
        const bd = frame.bd || {};
        if (!t || t.state !== 'streaming') return;
        const attempt = Number.isInteger(bd.attempt) ? bd.attempt : 1;
        const seq = Number.isInteger(bd.seq) ? bd.seq : -1;
        if (attempt < t.attempt || (attempt === t.attempt && seq <= t.seq)) return; // stale catch-up
        t.attempt = attempt;
        t.seq = seq;
        t.text = typeof bd.text === 'string' ? bd.text : '';
        t.el.querySelector('.text').textContent = t.text;
        stickToBottom();
        return;
      }
      case 'llm.delta': {
        const t = hd.turn_id && turnFor(hd.turn_id);
        const bd = frame.bd || {};
        if (!t || t.state !== 'streaming' || typeof bd.delta !== 'string') return; // late delta after the final
        if (bd.seq !== t.seq + 1) return; // a duplicate (or, never from the relay, a gap)
        t.seq = bd.seq;
        t.text += bd.delta;
        t.el.querySelector('.text').textContent = t.text;
        stickToBottom();
        return;
      }
      default:
        return; // unknown transient events are ignored, as the protocol allows new ones
    }
  }

  function onAck(hd) {
    const p = hd.cid && view.pending.get(hd.cid);
    if (!p) return; // already promoted by its stored entry, or an ack for a cid-less send
    p.state = 'delivered';
    p.el.dataset.state = 'delivered';
    if (hd.id) { p.el.dataset.id = hd.id; place(p.el); }
    // Kept in `pending` until the stored entry itself arrives, so it is promoted rather than duplicated.
  }

  function onError(hd, bd) {
    const p = hd.cid && view.pending.get(hd.cid);
    if (p) {
      view.pending.delete(hd.cid);
      p.state = 'failed';
      p.el.dataset.state = 'failed';
      showFailure(p.el, bd.message, hd.code);
      addRetry(p);
      return;
    }
    notice(bd.message || 'the relay refused a frame', { code: hd.code, kind: 'error' });
  }

  function addRetry(p) {
    const b = el('button', {
      type: 'button', class: 'retry', text: 'Retry',
      onclick: () => { view.pending.delete(p.cid); p.el.remove(); sendText(p.event, p.text); },
    });
    p.el.querySelector('.error').append(b);
  }

  // ---------------------------------------------------------------- 6. connection

  const conn = {
    ws: null,
    state: 'offline', // connecting | live | reconnecting | offline
    attempt: 0,
    retryTimer: null,
    countdown: null,
    stableTimer: null,
    wanted: false, // false once the user leaves: closes are then not reconnected
    notifiedFailure: false, // one "could not connect" notice per failure streak, not one per retry
  };

  function setState(state, label) {
    conn.state = state;
    const s = $('status');
    s.dataset.state = state;
    s.textContent = label || state;
    // The composer stays usable while reconnecting: sends are queued and flushed on open.
    for (const id of ['text', 'send', 'ask-llm']) $(id).disabled = !view.room;
  }

  function wsUrl() {
    const q = new URLSearchParams({ sid: view.room.sid, role: view.role });
    if (view.room.lastId) q.set('last_id', view.room.lastId);
    if (view.token) q.set('token', view.token);
    return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/session/chat?${q}`;
  }

  function connect() {
    clearTimeout(conn.retryTimer);
    clearInterval(conn.countdown);
    if (!conn.wanted || !view.room) return;
    setState('connecting', conn.attempt ? 'reconnecting…' : 'connecting…');
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (e) {
      notice(`could not connect: ${e.message}`, { kind: 'error' });
      return scheduleReconnect();
    }
    conn.ws = ws;
    let firstEntry = true;

    ws.onopen = () => {
      if (conn.ws !== ws) return;
      conn.notifiedFailure = false;
      $('notices').querySelectorAll('[data-code="connect_failed"]').forEach((n) => n.remove());
      setState('live', 'live');
      // Reset the backoff only once the socket proves stable: a relay that accepts and
      // immediately closes (store down) must not be hammered every 500 ms.
      conn.stableTimer = setTimeout(() => { conn.attempt = 0; }, STABLE_MS);
      flushQueued();
      expireUnconfirmed();
    };

    ws.onmessage = (ev) => {
      if (conn.ws !== ws) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch (_) { return; }
      handleFrame(frame);
      // History is fetched after the first stored entry arrives, not on open: the relay stores
      // our join entry after the handshake, so a page read only now is sure to reach it and
      // leaves no gap between history and the live feed.
      if (firstEntry && frame && frame.hd && frame.hd.id) {
        firstEntry = false;
        if (!view.room.historyLoaded) loadHistory(view.room);
      }
    };

    ws.onclose = (ev) => {
      if (conn.ws !== ws) return;
      conn.ws = null;
      clearTimeout(conn.stableTimer);
      for (const p of view.pending.values()) if (p.state === 'sent') p.state = 'unconfirmed';
      if (!conn.wanted) return setState('offline', 'offline');
      if (ev.code === 1001) notice('The relay is restarting; reconnecting.', { code: 'close_1001', kind: 'warn' });
      else if (ev.code === 1013) notice('The relay asked us to reconnect (we fell behind or it is busy); resuming.', { code: 'close_1013', kind: 'warn' });
      else if (ev.code === 1006 && !conn.notifiedFailure && navigator.onLine) {
        // A refused handshake (400/401/403/503) looks exactly like this; the body is unreadable here.
        notice('Could not connect to the relay; retrying.', { code: 'connect_failed', kind: 'error' });
        conn.notifiedFailure = true;
      }
      scheduleReconnect();
    };
    // Errors are always followed by close, which decides what to do.
    ws.onerror = () => {};
  }

  function scheduleReconnect() {
    // Exponential backoff with "equal jitter" (half the step fixed, half random) so that tabs
    // dropped together by a relay restart do not all come back in the same instant.
    const step = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** conn.attempt);
    const delay = Math.max(BACKOFF_MIN_MS, step / 2 + Math.random() * (step / 2));
    conn.attempt += 1;
    const due = Date.now() + delay;
    const tick = () => {
      if (!navigator.onLine) return setState('offline', 'offline – waiting for network');
      setState('reconnecting', `reconnecting in ${Math.max(1, Math.ceil((due - Date.now()) / 1000))}s`);
    };
    tick();
    conn.countdown = setInterval(tick, 500);
    conn.retryTimer = setTimeout(connect, delay);
  }

  function disconnect() {
    conn.wanted = false;
    clearTimeout(conn.retryTimer);
    clearInterval(conn.countdown);
    clearTimeout(conn.stableTimer);
    const ws = conn.ws;
    conn.ws = null;
    if (ws) ws.close(1000, 'bye');
    setState('offline', 'offline');
  }

  /** Loads the newest page of history once per room; stored entries go through the same dedupe. */
  async function loadHistory(room) {
    try {
      const headers = view.token ? { Authorization: `Bearer ${view.token}` } : {};
      const res = await fetch(`/v1/sessions/${encodeURIComponent(room.sid)}/messages?limit=${HISTORY_LIMIT}`, { headers });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const page = await res.json();
      if (view.room !== room) return; // the user switched rooms meanwhile
      room.historyLoaded = true;
      for (const f of page.messages || []) if (f && f.hd && f.hd.id) handleStored(f);
    } catch (e) {
      if (view.room === room) notice(`Could not load earlier messages (${e.message}).`, { code: 'history_failed', kind: 'warn' });
    }
  }

  window.addEventListener('online', () => {
    if (conn.wanted && !conn.ws) { conn.attempt = 0; connect(); }
  });
  window.addEventListener('offline', () => {
    if (conn.state === 'reconnecting') setState('offline', 'offline – waiting for network');
  });

  // ---------------------------------------------------------------- 7. composer

  let lastTypingSent = 0;

  function sendFrame(obj) {
    if (!conn.ws || conn.ws.readyState !== WebSocket.OPEN) return false;
    conn.ws.send(JSON.stringify(obj));
    return true;
  }

  /** Shows the message at once (greyed) and sends it, or queues it until the socket is live. */
  function sendText(event, text) {
    text = text.trim();
    if (!text || !view.room) return;
    const cid = newCid();
    const node = messageEl(view.role, event, text, Date.now());
    node.classList.add('own');
    node.dataset.cid = cid;
    const p = { el: node, event, text, state: 'queued', cid };
    view.pending.set(cid, p);
    list().append(node);
    stickToBottom(true); // your own message always brings the list to the bottom
    transmit(p);
  }

  function transmit(p) {
    const frame = { hd: { event: p.event, role: view.role, cid: p.cid }, bd: { text: p.text } };
    p.state = sendFrame(frame) ? 'sent' : 'queued';
    p.el.dataset.state = p.state === 'sent' ? 'pending' : 'queued';
  }

  function flushQueued() {
    for (const p of view.pending.values()) if (p.state === 'queued') transmit(p);
  }

  /**
   * A send in flight when the socket dropped may or may not have been stored. The resumed feed
   * replays it (and promotes it) if it was; if it has not shown up after a while, say so rather
   * than re-sending, which could store it twice.
   */
  function expireUnconfirmed() {
    setTimeout(() => {
      for (const p of view.pending.values()) {
        if (p.state !== 'unconfirmed') continue;
        // Stays in `pending`: if the entry turns up after all, it is promoted, not shown twice.
        p.state = 'failed';
        p.el.dataset.state = 'failed';
        showFailure(p.el, 'not confirmed: the connection dropped before the relay answered', 'unconfirmed');
        addRetry(p);
      }
    }, UNCONFIRMED_MS);
  }

  function cancelTurn(turnId, button) {
    if (sendFrame({ hd: { event: 'llm.cancel', role: view.role }, bd: { turn_id: turnId } })) {
      button.disabled = true;
      button.textContent = 'Cancelling…';
    } else {
      notice('Not connected; cannot cancel right now.', { kind: 'warn' });
    }
  }

  function onTyping() {
    const now = Date.now();
    if ($('text').value.trim() && now - lastTypingSent >= TYPING_SEND_MS) {
      if (sendFrame({ hd: { event: 'chat.typing', role: view.role }, bd: {} })) lastTypingSent = now;
    }
  }

  function submitComposer(event) {
    const box = $('text');
    if (!box.value.trim()) { box.focus(); return; }
    sendText(event, box.value);
    box.value = '';
    box.style.height = '';
    lastTypingSent = 0;
    box.focus();
  }

  // ---------------------------------------------------------------- 8. start-up

  /** Joins (or switches to) a room: resets the view, re-renders what we already had, connects. */
  function join(settings) {
    if (!SID_RE.test(settings.sid)) {
      notice('Room id must be 1–128 characters of A–Z a–z 0–9 . _ -', { code: 'invalid_sid', kind: 'error' });
      return;
    }
    disconnect();
    for (const h of view.typing.values()) clearTimeout(h);
    Object.assign(view, {
      room: roomFor(settings.sid), role: settings.role, token: settings.token,
      pending: new Map(), turns: new Map(), presence: { version: -1, members: [] }, typing: new Map(),
    });
    list().replaceChildren();
    renderTyping();
    const known = [...view.room.frames.values()].sort((a, b) => cmpId(a.hd.id, b.hd.id));
    for (const f of known) renderStored(f);
    renderPresence();
    stickToBottom(true);
    $('room-label').textContent = `${settings.sid} · ${settings.role}`;
    $('leave').hidden = false;
    document.title = `${settings.sid} – chat-relay`;
    conn.wanted = true;
    conn.attempt = 0;
    conn.notifiedFailure = false;
    connect();
  }

  function readForm() {
    return { sid: $('sid').value.trim(), role: $('role').value, token: $('token').value.trim() };
  }

  function init() {
    const s = loadSettings();
    $('sid').value = s.sid;
    if (![...$('role').options].some((o) => o.value === s.role)) {
      // Roles are configurable on the relay; accept one we do not list rather than silently changing it.
      $('role').append(el('option', { value: s.role, text: s.role }));
    }
    $('role').value = s.role;
    $('token').value = s.token;
    if (s.token) $('token').closest('details').open = true;
    if (new URLSearchParams(location.search).has('token')) {
      // Keep the credential out of the address bar and browser history; sessionStorage keeps it.
      try { sessionStorage.setItem('chat-relay.token', s.token); } catch (_) { /* disabled storage */ }
      const q = new URLSearchParams(location.search);
      q.delete('token');
      history.replaceState(null, '', `${location.pathname}${q.toString() ? `?${q}` : ''}${location.hash}`);
    }

    $('join-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const f = readForm();
      saveSettings(f);
      join(f);
    });
    $('leave').addEventListener('click', () => {
      disconnect();
      $('leave').hidden = true;
      $('room-label').textContent = '';
      view.room = null;
      setState('offline', 'offline');
    });
    $('send-form').addEventListener('submit', (e) => { e.preventDefault(); submitComposer('chat.message'); });
    $('ask-llm').addEventListener('click', () => submitComposer('llm.request'));
    list().addEventListener('scroll', () => {
      const l = list();
      following = l.scrollHeight - l.scrollTop - l.clientHeight < 40;
    }, { passive: true });
    if (window.ResizeObserver) new ResizeObserver(() => stickToBottom()).observe(list());
    const box = $('text');
    box.addEventListener('input', () => {
      onTyping();
      box.style.height = '';
      box.style.height = `${Math.min(box.scrollHeight, 160)}px`;
    });
    box.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); submitComposer('chat.message'); }
    });

    window.chatRelay = {
      seenIds: () => (view.room ? [...view.room.frames.keys()].sort(cmpId) : []),
      state: () => conn.state,
      lastId: () => (view.room ? view.room.lastId : null),
    };

    setState('offline', 'offline');
    renderPresence();
    if (s.autojoin) { saveSettings(s); join(s); }
  }

  init();
})();
