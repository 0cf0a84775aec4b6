// Browser tests of Natter's web client (run by `./natter-dev test`).
//
// 1. Runs the README's command as a new user would — `./natter-dev up --demo`
//    on a temp data dir and free ports — waits for the printed URL, checks
//    it answers and the page loads, and logs in as a demo user.
// 2. Against that same cluster + router, two users in two browser contexts
//    (headless Debian chromium via playwright-core): register, befriend,
//    chat both ways live (typing, sending → sent), send an image that
//    renders on the other side, make a group and rename it, delete a
//    message for everyone (it disappears for the other), lose the network
//    (send fails, then retry) and come back to find what was missed, once
//    exactly. Once at 1280×800, once at a 390×844 phone viewport.
// Screenshots go to tests/browser/artifacts/ (gitignored).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const ART = path.join(HERE, 'artifacts');
const CHROMIUM = process.env.NATTER_CHROMIUM || '/usr/bin/chromium';
const PW = 'correct horse battery';
const STEP_MS = 30000; // longest wait for one UI condition

fs.rmSync(ART, { recursive: true, force: true });
fs.mkdirSync(ART, { recursive: true });

function log(...a) { console.log('[browser]', ...a); }

function portFree(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

async function freePorts(n) {
  for (let i = 0; i < 200; i++) {
    // Below the kernel's ephemeral range (32768+): those ports can be taken
    // as source ports of outgoing connections before a server binds them.
    const base = 10000 + Math.floor(Math.random() * 22000);
    let ok = true;
    for (let p = base; p < base + n && ok; p++) ok = await portFree(p);
    if (ok) return base;
  }
  throw new Error('no free ports');
}

/** `./natter-dev up --demo` on a temp dir and free ports; resolves with the printed URL. */
async function startCluster() {
  const data = fs.mkdtempSync(path.join(os.tmpdir(), 'natter-browser-'));
  const nodePort = await freePorts(3);
  let port;
  do { port = await freePorts(1); } while (port >= nodePort && port < nodePort + 3);
  const env = { ...process.env, NATTER_DATA: data, NATTER_PORT: String(port), NATTER_NODE_PORT: String(nodePort), NATTER_SHARDS: '4' };
  const child = spawn(path.join(ROOT, 'natter-dev'), ['up', '--demo'], { env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const stop = () => new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once('exit', resolve);
    try { process.kill(-child.pid, 'SIGTERM'); } catch { resolve(); }
  });
  const url = await new Promise((resolve, reject) => {
    const onData = (d) => {
      out += d.toString();
      const m = out.match(/open (http:\/\/127\.0\.0\.1:\d+\/)/);
      if (m) resolve(m[1]);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', (code) => reject(new Error(`natter-dev up exited (${code}) before printing a URL:\n${out.slice(-4000)}`)));
    // A deadline on readiness (it includes a no-op cargo build), not a timing assertion.
    setTimeout(() => reject(new Error(`no URL printed in 5 minutes:\n${out.slice(-4000)}`)), 300000).unref();
  });
  return { url, data, stop, output: () => out };
}

async function expectVisible(locator, what) {
  try {
    await locator.first().waitFor({ state: 'visible', timeout: STEP_MS });
  } catch (e) {
    throw new Error(`${what}: not visible (${e.message.split('\n')[0]})`);
  }
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(ART, `${name}.png`) });
}

async function register(page, url, username) {
  await page.goto(url);
  await page.getByTestId('auth-switch').click();
  await page.locator('input[name=username]').fill(username);
  await page.locator('input[name=password]').fill(PW);
  await page.getByTestId('auth-submit').click();
  await expectVisible(page.getByTestId('new-chat'), `${username} logged in`);
}

async function toFeed(page) {
  const back = page.getByTestId('back');
  if (await back.isVisible()) await back.click();
}

async function openChat(page, title) {
  await toFeed(page);
  const item = page.locator(`[data-testid=feed-item][data-title="${title}"]`);
  await expectVisible(item, `feed item ${title}`);
  await item.first().click();
  await expectVisible(page.getByTestId('conv-title').filter({ hasText: title }), `conversation ${title} open`);
}

function msg(page, text) {
  return page.getByTestId('msg').filter({ has: page.getByTestId('msg-text').filter({ hasText: text }) });
}

async function send(page, text) {
  await page.getByTestId('composer').fill(text);
  await page.getByTestId('composer').press('Enter');
}

async function pngFrom(page) {
  const b64 = await page.evaluate(() => {
    const c = document.createElement('canvas');
    c.width = 640; c.height = 480;
    const g = c.getContext('2d');
    const grd = g.createLinearGradient(0, 0, 640, 480);
    grd.addColorStop(0, '#4f46e5'); grd.addColorStop(1, '#f59e0b');
    g.fillStyle = grd; g.fillRect(0, 0, 640, 480);
    g.fillStyle = '#fff'; g.font = 'bold 64px sans-serif'; g.fillText('Natter', 180, 260);
    return c.toDataURL('image/png').split(',')[1];
  });
  return Buffer.from(b64, 'base64');
}

async function scenario(browser, url, label, viewport) {
  const suffix = `${label.slice(0, 1)}${Date.now().toString(36).slice(-5)}`;
  const ann = `ann_${suffix}`;
  const ben = `ben_${suffix}`;
  const opts = { viewport, deviceScaleFactor: 1, isMobile: viewport.width < 500, hasTouch: viewport.width < 500 };
  const ca = await browser.newContext(opts);
  const cb = await browser.newContext(opts);
  const a = await ca.newPage();
  const b = await cb.newPage();
  for (const [p, n] of [[a, 'ann'], [b, 'ben']]) {
    p.on('pageerror', (e) => log(`${label} ${n} page error:`, e.message));
  }
  let step = 0;
  const snap = async (name) => { step++; const n = `${label}-${String(step).padStart(2, '0')}-${name}`; await shot(a, `${n}-ann`); await shot(b, `${n}-ben`); };

  log(label, 'register');
  await register(a, url, ann);
  await register(b, url, ben);

  log(label, 'befriend');
  await a.getByTestId('friends-btn').click();
  await a.getByTestId('friend-username').fill(ben);
  await a.getByTestId('add-friend').click();
  await expectVisible(a.getByTestId('friend-note').filter({ hasText: 'Request sent' }), 'request sent');
  await a.keyboard.press('Escape');
  await expectVisible(b.locator('[data-testid=friends-btn] .dot:not(.hidden)'), 'ben sees a friend request');
  await b.getByTestId('friends-btn').click();
  await b.locator(`[data-testid=friend-incoming][data-name="${ann}"] [data-testid=accept]`).click();
  await b.locator(`[data-testid=friend-friend][data-name="${ann}"] [data-testid=chat-with]`).click();
  await expectVisible(b.getByTestId('conv-title').filter({ hasText: ann }), 'ben opened the direct chat');

  log(label, 'chat both ways');
  await a.getByTestId('new-chat').click();
  await a.getByTestId('direct-username').fill(ben);
  await a.getByTestId('direct-go').click();
  await expectVisible(a.getByTestId('conv-title').filter({ hasText: ben }), 'ann opened the direct chat');
  await send(b, 'hello from ben');
  await expectVisible(msg(a, 'hello from ben'), 'ann receives ben\'s message live');
  await a.getByTestId('composer').pressSequentially('hi ben', { delay: 20 });
  await expectVisible(b.getByTestId('typing').filter({ hasText: `${ann} is typing` }), 'ben sees ann typing');
  await a.getByTestId('composer').press('Enter');
  await expectVisible(msg(b, 'hi ben'), 'ben receives ann\'s reply live');
  await expectVisible(a.locator('[data-testid=msg][data-status=sent]').filter({ hasText: 'hi ben' }), 'ann\'s message shows as sent');
  await snap('chat');

  log(label, 'image');
  const png = await pngFrom(a);
  await a.getByTestId('file-input').setInputFiles({ name: 'sunset.png', mimeType: 'image/png', buffer: png });
  const img = b.getByTestId('msg-image');
  await expectVisible(img, 'ben sees the image');
  await b.waitForFunction(() => {
    const i = [...document.querySelectorAll('[data-testid=msg-image]')].pop();
    return i && i.complete && i.naturalWidth > 0;
  }, null, { timeout: STEP_MS });
  const natural = await img.last().evaluate((i) => [i.naturalWidth, i.naturalHeight]);
  if (natural[0] !== 320 || natural[1] !== 240) throw new Error(`ben's image renders as a 320x240 thumbnail, got ${natural}`);
  await snap('image');

  log(label, 'delete for everyone');
  await send(a, 'oops, wrong chat');
  await expectVisible(msg(b, 'oops, wrong chat'), 'ben receives the message to delete');
  const m = msg(a, 'oops, wrong chat');
  await m.hover();
  await m.getByTestId('msg-more').click();
  await a.getByTestId('delete-for-everyone').click();
  await msg(b, 'oops, wrong chat').waitFor({ state: 'detached', timeout: STEP_MS });
  await msg(a, 'oops, wrong chat').waitFor({ state: 'detached', timeout: STEP_MS });

  log(label, 'group and rename');
  await toFeed(a);
  await a.getByTestId('new-chat').click();
  await a.getByTestId('tab-group').click();
  await a.getByTestId('group-name').fill('Trip');
  await a.locator(`[data-testid=group-pick][data-name="${ben}"]`).check();
  await a.getByTestId('group-create').click();
  await expectVisible(a.getByTestId('conv-title').filter({ hasText: 'Trip' }), 'the group opens');
  await send(a, 'group hello');
  await a.getByTestId('conv-settings').click();
  await a.getByTestId('rename-input').fill('Trip 2026');
  await a.getByTestId('rename').click();
  await expectVisible(a.getByTestId('conv-title').filter({ hasText: 'Trip 2026' }), 'renamed for ann');
  await a.keyboard.press('Escape');
  await openChat(b, 'Trip 2026');
  await expectVisible(msg(b, 'group hello'), 'ben sees the group message');
  await snap('group');

  log(label, 'network loss');
  // Ben stays in the group; ann writes in the direct chat while ben is offline.
  await cb.setOffline(true);
  // (On a phone the chat list, which holds the status bar, is hidden.)
  await b.locator('[data-testid=status][data-state=offline]').waitFor({ state: 'attached', timeout: STEP_MS });
  await send(b, 'sent while offline');
  await expectVisible(b.locator('[data-testid=msg][data-status=failed]').filter({ hasText: 'sent while offline' }), 'the offline send shows failed');
  await openChat(a, ben);
  for (const t of ['missed 1', 'missed 2', 'missed 3']) {
    await send(a, t);
    await expectVisible(a.locator('[data-testid=msg][data-status=sent]').filter({ hasText: t }), `ann's ${t} sent`);
  }
  await snap('offline');
  await cb.setOffline(false);
  // Online: the status bar is hidden again.
  await b.locator('[data-testid=status][data-state=online]').waitFor({ state: 'attached', timeout: STEP_MS });
  await b.locator('[data-testid=msg][data-status=failed]').getByTestId('retry').click();
  await expectVisible(b.locator('[data-testid=msg][data-status=sent]').filter({ hasText: 'sent while offline' }), 'retry shows sent');
  await openChat(a, 'Trip 2026');
  await expectVisible(msg(a, 'sent while offline'), 'the retried message arrives');
  await toFeed(b);
  await expectVisible(b.locator(`[data-testid=feed-item][data-title="${ann}"] [data-testid=unread]`).filter({ hasText: '3' }), 'ben sees 3 unread');
  await snap('feed-unread');
  await openChat(b, ann);
  for (const t of ['missed 1', 'missed 2', 'missed 3', 'hello from ben', 'hi ben']) {
    await expectVisible(msg(b, t), `ben has "${t}" after reconnecting`);
    const n = await msg(b, t).count();
    if (n !== 1) throw new Error(`"${t}" shown ${n} times after the reconnect (want exactly once)`);
  }
  await snap('caught-up');
  await ca.close();
  await cb.close();
}

async function main() {
  const started = Date.now();
  log('starting ./natter-dev up --demo (temp data dir, free ports)');
  const cluster = await startCluster();
  let failed = null;
  let browser = null;
  try {
    log('URL printed:', cluster.url);
    if (!/Demo users/.test(cluster.output())) throw new Error('the demo logins were not printed');
    const r = await fetch(cluster.url);
    const html = await r.text();
    if (r.status !== 200 || !html.includes('<div id="app">')) throw new Error(`the printed URL answers ${r.status}: ${html.slice(0, 200)}`);
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'] });

    log('newcomer: the demo login shows a working messenger');
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const p = await ctx.newPage();
    await p.goto(cluster.url);
    await p.locator('input[name=username]').fill('alice');
    await p.locator('input[name=password]').fill('natter-demo');
    await p.getByTestId('auth-submit').click();
    await openChat(p, 'Weekend trip');
    await expectVisible(msg(p, 'Count me in'), 'the demo group shows its messages');
    await shot(p, 'demo-alice');
    await ctx.close();

    await scenario(browser, cluster.url, 'desktop', { width: 1280, height: 800 });
    await scenario(browser, cluster.url, 'phone', { width: 390, height: 844 });
  } catch (e) {
    failed = e;
  } finally {
    if (browser) await browser.close();
    await cluster.stop();
    if (failed) log(`cluster logs kept in ${cluster.data}`);
    else fs.rmSync(cluster.data, { recursive: true, force: true });
  }
  if (failed) {
    console.error('[browser] FAILED:', failed.message);
    console.error(`[browser] screenshots: ${ART}`);
    process.exit(1);
  }
  log(`passed in ${((Date.now() - started) / 1000).toFixed(0)} s; screenshots in ${ART}`);
}

main();
