// Browser end-to-end test of the room page (test-clients/web), driven through Debian's Chromium.
//
//   RELAY_URL=http://127.0.0.1:PORT ARTIFACTS_DIR=/tmp/shots node --test room.test.mjs
//
// Normally run by scripts/e2e-browser.sh, which starts Redis, a real local LLM and the relay.
// Two browser contexts (A and B) join one fresh room; they chat (emoji + Hangul), A asks the LLM,
// both watch the reply stream in and finish with the same text, then B reloads and must show the
// same entries again with no duplicates. The steps share the pages and run in order; after a
// failed step the later ones are skipped. Screenshots (a.png, b.png, b-after-reload.png) and the
// pages' message lists (*.html) are written to ARTIFACTS_DIR at the end and on failure.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const RELAY_URL = (process.env.RELAY_URL || '').replace(/\/+$/, '');
// A relay whose LLM is a slow fake (80 tokens, 120 ms apart): long enough to reload mid-reply.
const SLOW_RELAY_URL = (process.env.SLOW_RELAY_URL || '').replace(/\/+$/, '');
const ARTIFACTS_DIR = path.resolve(process.env.ARTIFACTS_DIR || 'e2e-artifacts');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
  '--no-first-run',
];

const LIVE_TIMEOUT = 20_000; // page load + WebSocket handshake
const MESSAGE_TIMEOUT = 15_000; // a chat message reaching both pages
const LLM_START_TIMEOUT = 30_000; // the reply bubble appearing
const LLM_TIMEOUT = 90_000; // the reply finishing
const STEP_TIMEOUT = 150_000;

const SID = `e2e-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
const MSG_A = 'hello from A 👋';
const MSG_B = '안녕하세요 from B';
const LLM_PROMPT = '@llm say hi to everyone';

let browser;
const pages = {}; // 'A' | 'B' -> Page
const logs = []; // console errors, page errors, failed requests: printed when a step fails
let failed = null; // name of the first failed step; the steps after it are skipped
let reloaded = false; // which file name B's screenshot gets
let beforeReload = null; // B's view just before the reload

// ------------------------------------------------------------------------------------ helpers

function roomUrl(role, base = RELAY_URL, sid = SID) {
  return `${base}/?${new URLSearchParams({ sid, role, autojoin: '1' })}`;
}

async function openPage(role) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 760 } });
  const page = await context.newPage();
  page.on('pageerror', (e) => logs.push(`[${role}] page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') logs.push(`[${role}] console.${m.type()}: ${m.text()}`);
  });
  page.on('requestfailed', (r) => logs.push(`[${role}] request failed: ${r.url()} ${r.failure()?.errorText ?? ''}`));
  pages[role] = page;
  return page;
}

/** What the page shows: every element with data-id, in DOM order, plus the LLM bubbles. */
function snapshot(page) {
  return page.evaluate(() => {
    const textOf = (e) => e.querySelector('.text')?.textContent ?? '';
    return {
      state: window.chatRelay?.state() ?? null,
      status: document.getElementById('status')?.dataset.state ?? null,
      seenIds: window.chatRelay?.seenIds() ?? [],
      entries: [...document.querySelectorAll('#messages [data-id]')].map((e) => ({
        id: e.dataset.id, event: e.dataset.event, role: e.dataset.role, text: textOf(e),
      })),
      turns: [...document.querySelectorAll('#messages [data-turn]')].map((e) => ({
        turn: e.dataset.turn, id: e.dataset.id ?? null, event: e.dataset.event ?? null,
        state: e.dataset.state, text: textOf(e), error: e.querySelector('.error')?.textContent ?? null,
      })),
      notices: [...document.querySelectorAll('#notices .notice')].map((n) => `${n.dataset.code ?? ''} ${n.textContent}`.trim()),
    };
  });
}

function brief(snap) {
  const lines = snap.entries.map((e) => `  ${e.id} ${e.event} ${e.role}: ${JSON.stringify(e.text.slice(0, 80))}`);
  const turns = snap.turns.map((t) => `  turn ${t.turn} [${t.state}] ${JSON.stringify(t.text.slice(0, 80))}${t.error ? ` error=${t.error}` : ''}`);
  return [`status=${snap.status}`, 'entries:', ...lines, 'turns:', ...turns, `notices: ${JSON.stringify(snap.notices)}`].join('\n');
}

/**
 * page.waitForFunction with a readable failure: what was awaited, on which page, and what the
 * page showed at that moment.
 */
async function waitUntil(role, what, fn, arg, timeout) {
  const page = pages[role];
  try {
    const handle = await page.waitForFunction(fn, arg, { timeout, polling: 100 });
    return await handle.jsonValue();
  } catch (e) {
    let shown = '(page not readable)';
    try { shown = brief(await snapshot(page)); } catch (_) { /* page gone */ }
    throw new Error(`page ${role}: ${what} did not happen within ${timeout / 1000}s (${e.message.split('\n')[0]})\n${shown}`);
  }
}

function waitLive(role) {
  return waitUntil(role, '#status[data-state=live]',
    () => document.querySelector('#status')?.dataset.state === 'live' && window.chatRelay?.state() === 'live',
    null, LIVE_TIMEOUT);
}

/** Waits until a chat.message with exactly `text` is a stored entry (in seenIds) on the page; returns its id. */
function waitStoredMessage(role, text) {
  return waitUntil(role, `stored chat.message ${JSON.stringify(text)}`, (t) => {
    const seen = new Set(window.chatRelay.seenIds());
    const hit = [...document.querySelectorAll('#messages [data-event="chat.message"][data-id]')]
      .find((e) => (e.querySelector('.text')?.textContent ?? '') === t && seen.has(e.dataset.id));
    return hit ? hit.dataset.id : false;
  }, text, MESSAGE_TIMEOUT);
}

async function send(role, text) {
  const page = pages[role];
  await page.fill('#text', text);
  await page.click('#send');
}

/** Stream ids compare as (ms, seq) numbers. */
function cmpId(a, b) {
  const [am, as] = a.split('-').map(BigInt);
  const [bm, bs] = b.split('-').map(BigInt);
  return am !== bm ? (am < bm ? -1 : 1) : as !== bs ? (as < bs ? -1 : 1) : 0;
}

function duplicates(ids) {
  const seen = new Set();
  return [...new Set(ids.filter((id) => (seen.has(id) ? true : (seen.add(id), false))))];
}

function assertSortedUnique(role, snap) {
  const ids = snap.entries.map((e) => e.id);
  assert.deepEqual(duplicates(ids), [], `page ${role}: elements with the same data-id\n${brief(snap)}`);
  assert.deepEqual(duplicates(snap.seenIds), [], `page ${role}: chatRelay.seenIds() has duplicates`);
  const sorted = [...ids].sort(cmpId);
  assert.deepEqual(ids, sorted, `page ${role}: stored entries are not in stream-id order\n${brief(snap)}`);
}

/**
 * Records, in the page, every length the text of each streaming LLM bubble takes. A
 * MutationObserver sees each delta (each is its own WebSocket message task), which polling
 * from Node could miss when the model is fast.
 */
function recordStreaming(role) {
  return pages[role].evaluate(() => {
    const rec = { turns: {} };
    window.__e2eStreaming = rec;
    const look = () => {
      for (const b of document.querySelectorAll('#messages [data-turn]')) {
        const t = (rec.turns[b.dataset.turn] ||= { lengths: [], streamedText: '', states: [] });
        const state = b.dataset.state;
        if (t.states[t.states.length - 1] !== state) t.states.push(state);
        if (state !== 'streaming') continue;
        const text = b.querySelector('.text')?.textContent ?? '';
        if (t.lengths[t.lengths.length - 1] !== text.length) t.lengths.push(text.length);
        t.streamedText = text;
      }
    };
    new MutationObserver(look).observe(document.getElementById('messages'),
      { subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ['data-state'] });
    look();
  });
}

async function saveArtifacts(suffix = '') {
  mkdirSync(ARTIFACTS_DIR, { recursive: true });
  const names = { A: 'a', B: reloaded ? 'b-after-reload' : 'b', C: 'c-reloaded-mid-reply' };
  for (const [role, page] of Object.entries(pages)) {
    if (!page || page.isClosed()) continue;
    const base = path.join(ARTIFACTS_DIR, `${names[role]}${suffix}`);
    try {
      await page.screenshot({ path: `${base}.png`, fullPage: true });
      writeFileSync(`${base}.html`, await page.evaluate(() => document.getElementById('messages')?.outerHTML ?? ''));
    } catch (e) {
      logs.push(`[${role}] screenshot failed: ${e.message}`);
    }
  }
}

/** One scenario step: skipped after an earlier failure; on its own failure, screenshots + logs. */
function step(name, fn) {
  it(name, { timeout: STEP_TIMEOUT }, async (t) => {
    if (failed) return t.skip(`an earlier step failed: ${failed}`);
    try {
      await fn(t);
    } catch (e) {
      failed = name;
      await saveArtifacts();
      t.diagnostic(`screenshots of the failure: ${ARTIFACTS_DIR}`);
      for (const l of logs) t.diagnostic(l);
      throw e;
    }
  });
}

// ------------------------------------------------------------------------------------ scenario

describe(`room page, two browsers, room ${SID}`, () => {
  before(async () => {
    assert.ok(RELAY_URL, 'set RELAY_URL to the relay base URL, e.g. http://127.0.0.1:3000');
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 60_000 });
  });

  after(async () => {
    await browser?.close();
  });

  step('A and B open the page with autojoin and go live', async () => {
    const [a, b] = await Promise.all([openPage('A'), openPage('B')]);
    await Promise.all([a.goto(roomUrl('A')), b.goto(roomUrl('B'))]);
    await Promise.all([waitLive('A'), waitLive('B')]);
    // Each page renders at least its own session.join once it is in the room.
    for (const role of ['A', 'B']) {
      await waitUntil(role, 'its own session.join entry', (r) => [...document.querySelectorAll('#messages [data-event="session.join"]')]
        .some((e) => e.dataset.role === r), role, MESSAGE_TIMEOUT);
    }
  });

  step('A and B chat: both pages show both messages, same order, same ids', async () => {
    await send('A', MSG_A);
    const idA = await waitStoredMessage('A', MSG_A);
    // B writes only after A's message is stored, so the expected order is known.
    await send('B', MSG_B);
    const idB = await waitStoredMessage('B', MSG_B);
    assert.ok(cmpId(idA, idB) < 0, `A's message (${idA}) should come before B's (${idB})`);

    for (const role of ['A', 'B']) {
      assert.equal(await waitStoredMessage(role, MSG_A), idA, `page ${role}: A's message has another data-id`);
      assert.equal(await waitStoredMessage(role, MSG_B), idB, `page ${role}: B's message has another data-id`);
    }
    const snaps = { A: await snapshot(pages.A), B: await snapshot(pages.B) };
    for (const [role, snap] of Object.entries(snaps)) {
      const chats = snap.entries.filter((e) => e.event === 'chat.message');
      assert.deepEqual(chats.map((e) => [e.id, e.role, e.text]), [[idA, 'A', MSG_A], [idB, 'B', MSG_B]],
        `page ${role}: chat messages differ from what was sent\n${brief(snap)}`);
      assertSortedUnique(role, snap);
    }
    // A's own send was promoted in place (no leftover pending copy), and so was B's.
    for (const [role, text] of [['A', MSG_A], ['B', MSG_B]]) {
      const own = await pages[role].evaluate((t) => [...document.querySelectorAll('#messages .own')]
        .filter((e) => (e.querySelector('.text')?.textContent ?? '') === t)
        .map((e) => ({ id: e.dataset.id ?? null, state: e.dataset.state ?? null })), text);
      assert.equal(own.length, 1, `page ${role}: expected one own bubble for ${JSON.stringify(text)}, got ${JSON.stringify(own)}`);
      assert.equal(own[0].state, 'delivered', `page ${role}: own message not marked delivered: ${JSON.stringify(own)}`);
    }
  });

  step('A asks the LLM: both pages stream the reply and end with the same text', async (t) => {
    await Promise.all([recordStreaming('A'), recordStreaming('B')]);
    await send('A', LLM_PROMPT);
    const requestId = await waitStoredMessage('A', LLM_PROMPT);

    // The bubble shows up on both pages (from llm.start / the first delta) ...
    const turns = {};
    for (const role of ['A', 'B']) {
      turns[role] = await waitUntil(role, 'an LLM bubble [data-turn]',
        () => document.querySelector('#messages [data-turn]')?.dataset.turn ?? false, null, LLM_START_TIMEOUT);
    }
    assert.equal(turns.A, turns.B, 'both pages should show the same LLM turn');
    assert.equal(turns.A, requestId, 'the turn id should be the id of the @llm message');

    // ... and ends, on both, within the LLM timeout.
    const finals = {};
    for (const role of ['A', 'B']) {
      await waitUntil(role, 'the LLM bubble leaving data-state=streaming', (turn) => {
        const b = document.querySelector(`#messages [data-turn="${turn}"]`);
        return b && b.dataset.state !== 'streaming';
      }, turns.A, LLM_TIMEOUT);
      const snap = await snapshot(pages[role]);
      const bubbles = snap.turns.filter((x) => x.turn === turns.A);
      assert.equal(bubbles.length, 1, `page ${role}: expected one bubble for turn ${turns.A}\n${brief(snap)}`);
      const [bubble] = bubbles;
      assert.equal(bubble.state, 'done',
        `page ${role}: LLM turn ended in state ${bubble.state}${bubble.error ? ` (${bubble.error})` : ''}, expected done`);
      assert.equal(bubble.event, 'llm.response', `page ${role}: the finished bubble should be the stored llm.response`);
      assert.ok(bubble.id && cmpId(bubble.id, requestId) > 0, `page ${role}: the llm.response id ${bubble.id} should follow the request ${requestId}`);
      assert.ok(bubble.text.trim().length > 0, `page ${role}: the LLM reply is empty`);
      finals[role] = bubble;
      assertSortedUnique(role, snap);
    }
    assert.equal(finals.B.text, finals.A.text, 'both pages should end with the same LLM text');
    assert.equal(finals.B.id, finals.A.id, 'both pages should show the same llm.response entry');

    // Streaming: while the bubble was streaming its text took at least two different non-empty
    // lengths, growing, and what was streamed is the start of the final text.
    for (const role of ['A', 'B']) {
      const rec = await pages[role].evaluate((turn) => window.__e2eStreaming?.turns[turn] ?? null, turns.A);
      assert.ok(rec, `page ${role}: no record of the streaming bubble`);
      const nonEmpty = rec.lengths.filter((n) => n > 0);
      t.diagnostic(`page ${role}: streamed lengths ${JSON.stringify(rec.lengths)}, states ${rec.states.join(' -> ')}, final ${finals[role].text.length} chars`);
      assert.ok(nonEmpty.length >= 2 && nonEmpty.some((n, i) => i > 0 && n > nonEmpty[i - 1]),
        `page ${role}: the bubble text never grew while streaming (lengths seen: ${JSON.stringify(rec.lengths)})`);
      assert.deepEqual(rec.states.filter((s) => s !== 'streaming'), ['done'], `page ${role}: bubble states ${rec.states.join(' -> ')}`);
      assert.ok(finals[role].text.startsWith(rec.streamedText.trimEnd()) || finals[role].text.trim().startsWith(rec.streamedText.trim()),
        `page ${role}: the streamed text is not the start of the final text\n  streamed: ${JSON.stringify(rec.streamedText)}\n  final:    ${JSON.stringify(finals[role].text)}`);
    }
    t.diagnostic(`LLM reply: ${JSON.stringify(finals.A.text)}`);
    await saveArtifacts(); // a.png, b.png
  });

  step('B reloads: same entries again, no duplicates', async () => {
    beforeReload = await snapshot(pages.B);
    const oldIds = beforeReload.entries.map((e) => e.id);
    assert.deepEqual(duplicates(oldIds), [], 'page B had duplicate data-ids before the reload');

    reloaded = true;
    await pages.B.reload();
    await waitLive('B');
    // History arrives after the first live entry (B's new session.join); wait for all old ids.
    await waitUntil('B', 'every entry it showed before the reload', (ids) => {
      const now = new Set([...document.querySelectorAll('#messages [data-id]')].map((e) => e.dataset.id));
      return ids.every((id) => now.has(id));
    }, oldIds, MESSAGE_TIMEOUT);
    // A sees B's old connection leave and the new one join.
    await waitUntil('A', "B's new session.join", (n) => document.querySelectorAll('#messages [data-event="session.join"][data-role="B"]').length >= n,
      2, MESSAGE_TIMEOUT);

    const snap = await snapshot(pages.B);
    const ids = snap.entries.map((e) => e.id);
    assertSortedUnique('B', snap);
    const missing = oldIds.filter((id) => !ids.includes(id));
    assert.deepEqual(missing, [], `page B lost entries over the reload\n${brief(snap)}`);
    assert.deepEqual(duplicates(snap.seenIds), [], 'chatRelay.seenIds() has duplicates after the reload');
    for (const id of ids) assert.ok(snap.seenIds.includes(id), `page B renders ${id}, which is not in seenIds()`);
    // The old entries render as before: same event, role and text.
    const before = new Map(beforeReload.entries.map((e) => [e.id, e]));
    for (const e of snap.entries) {
      const old = before.get(e.id);
      if (old) assert.deepEqual([e.event, e.role, e.text], [old.event, old.role, old.text], `page B renders ${e.id} differently after the reload`);
    }
    // The LLM reply comes back from history as a finished bubble, not a second one.
    const oldTurn = beforeReload.turns[0];
    const turns = snap.turns.filter((x) => x.turn === oldTurn.turn);
    assert.equal(turns.length, 1, `page B: expected one bubble for turn ${oldTurn.turn} after the reload\n${brief(snap)}`);
    assert.deepEqual([turns[0].state, turns[0].text], ['done', oldTurn.text], 'page B: the LLM bubble differs after the reload');

    // Page A, which stayed, is still consistent too.
    assertSortedUnique('A', await snapshot(pages.A));
    assert.deepEqual(logs.filter((l) => l.includes('page error')), [], 'uncaught errors in the pages');
    await saveArtifacts(); // a.png, b-after-reload.png
  });

  step('C reloads in the middle of an LLM reply: the text so far at once, then the exact final text', async (t) => {
    assert.ok(SLOW_RELAY_URL, 'SLOW_RELAY_URL is not set (scripts/e2e-browser.sh sets it)');
    const sid = `${SID}-slow`;
    const page = await openPage('C');
    await page.goto(roomUrl('A', SLOW_RELAY_URL, sid));
    await waitLive('C');
    await send('C', '@llm tell us a long story');
    const before = await waitUntil('C', 'a streaming bubble with some text', () => {
      const b = document.querySelector('#messages [data-turn]');
      const text = b?.querySelector('.text')?.textContent ?? '';
      return b && b.dataset.state === 'streaming' && text.length >= 20 ? { turn: b.dataset.turn, text } : false;
    }, null, LLM_START_TIMEOUT);

    await page.reload();
    await waitLive('C');
    await recordStreaming('C');
    // The text so far shows at once (from the catch-up llm.start), while the reply still streams.
    const after = await waitUntil('C', 'the bubble with the text so far, still streaming', (prev) => {
      const b = [...document.querySelectorAll('#messages [data-turn]')].find((x) => x.dataset.turn === prev.turn);
      const text = b?.querySelector('.text')?.textContent ?? '';
      return b && b.dataset.state === 'streaming' && text.length >= prev.text.length ? { text } : false;
    }, before, MESSAGE_TIMEOUT);
    assert.ok(after.text.startsWith(before.text), `the rebuilt text continues the text before the reload\n  before: ${JSON.stringify(before.text)}\n  after:  ${JSON.stringify(after.text)}`);

    const done = await waitUntil('C', 'the reply to finish', (turn) => {
      const b = [...document.querySelectorAll('#messages [data-turn]')].find((x) => x.dataset.turn === turn);
      return b && b.dataset.state === 'done' ? { text: b.querySelector('.text')?.textContent ?? '' } : false;
    }, before.turn, LLM_TIMEOUT);
    const rec = await page.evaluate((turn) => window.__e2eStreaming?.turns[turn] ?? null, before.turn);
    t.diagnostic(`bubble lengths after the reload: ${JSON.stringify(rec?.lengths)}`);
    assert.ok(rec && rec.lengths.length >= 2, 'the bubble kept growing after the reload');
    assert.ok(rec.lengths.every((n, i) => i === 0 || n >= rec.lengths[i - 1]), `the text only ever grew: ${JSON.stringify(rec.lengths)}`);
    assert.ok(done.text.startsWith(rec.streamedText), 'what streamed after the reload is the start of the final text');

    const history = await (await fetch(`${SLOW_RELAY_URL}/v1/sessions/${sid}/messages?limit=100`)).json();
    const stored = history.messages.find((m) => m.hd.event === 'llm.response' && m.hd.turn_id === before.turn);
    assert.ok(stored, 'the reply is stored');
    assert.equal(done.text, stored.bd.text, 'the bubble ends with exactly the stored reply');
    assert.equal(rec.streamedText, stored.bd.text, 'the streamed text grew to exactly the stored reply');
    const bubbles = await page.evaluate((turn) => document.querySelectorAll(`#messages [data-turn="${turn}"]`).length, before.turn);
    assert.equal(bubbles, 1, 'one bubble for the turn');
    await saveArtifacts();
  });
});
