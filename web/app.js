// Natter web client: plain ES modules, no build step.
import { Session, http } from './api.js';

const $app = document.getElementById('app');
const STORE_KEY = 'natter.session';

// ---------- tiny DOM helper ----------
function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat()) if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

const COLORS = ['#4f46e5', '#0891b2', '#059669', '#d97706', '#db2777', '#7c3aed', '#2563eb', '#dc2626'];
function avatar(name, id) {
  let n = 0;
  for (const ch of id || name || '') n = (n * 31 + ch.charCodeAt(0)) >>> 0;
  return h('div', { class: 'avatar', style: `background:${COLORS[n % COLORS.length]}` },
    (name || '?').slice(0, 1).toUpperCase());
}

export function relTime(ms, now = Date.now()) {
  if (!ms) return '';
  const d = Math.max(0, now - ms) / 1000;
  if (d < 60) return 'now';
  if (d < 3600) return `${Math.floor(d / 60)}m`;
  if (d < 86400) return `${Math.floor(d / 3600)}h`;
  if (d < 7 * 86400) return new Date(ms).toLocaleDateString(undefined, { weekday: 'short' });
  return new Date(ms).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
}
const clock = (ms) => new Date(ms).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
const dayLabel = (ms) => new Date(ms).toLocaleDateString(undefined, { weekday: 'long', month: 'short', day: 'numeric' });
function fmtSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}
const isImage = (ct) => /^image\/(png|jpeg|gif|webp)$/.test(ct || '');
// A v4 UUID (crypto.randomUUID exists only in secure contexts).
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, '0')).join('');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

// ---------- login ----------
function showAuth(mode = 'login', error = '') {
  const err = h('div', { class: 'error', 'data-testid': 'auth-error' }, error);
  const user = h('input', { name: 'username', placeholder: 'Username', autocomplete: 'username', required: true });
  const pass = h('input', { name: 'password', type: 'password', placeholder: 'Password (8+ characters)',
    autocomplete: mode === 'login' ? 'current-password' : 'new-password', required: true });
  const submit = h('button', { type: 'submit', 'data-testid': 'auth-submit' }, mode === 'login' ? 'Log in' : 'Create account');
  const form = h('form', {
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      err.textContent = '';
      try {
        if (mode === 'register') await http('POST', '/v1/register', { username: user.value, password: pass.value });
        const l = await http('POST', '/v1/login', { username: user.value, password: pass.value, device: navigator.userAgent.slice(0, 120) });
        localStorage.setItem(STORE_KEY, JSON.stringify(l));
        start(l);
      } catch (x) {
        err.textContent = x.message;
        submit.disabled = false;
      }
    },
  }, user, pass, err, submit);
  $app.replaceChildren(h('div', { class: 'auth' }, h('div', { class: 'auth-card' },
    h('h1', {}, 'Natter'),
    h('p', {}, mode === 'login' ? 'Welcome back.' : 'Create your account.'),
    form,
    h('div', { class: 'switch' }, mode === 'login' ? 'New here? ' : 'Have an account? ',
      h('a', { 'data-testid': 'auth-switch', onclick: () => showAuth(mode === 'login' ? 'register' : 'login') },
        mode === 'login' ? 'Create an account' : 'Log in')))));
  user.focus();
}

// ---------- the app ----------
let S = null;          // Session
let current = null;    // open conversation id
const outbox = new Map(); // conversation id -> [{cmid, text, media, file, preview, status, progress, createdMs}]
const typingUntil = new Map(); // conversation id -> Map(user_id -> until ms)
let lastTypingSent = 0;
let readTimer = null;
const ui = {};

function start(login) {
  S = new Session(login);
  S.users.set(login.user_id, login.username);
  S.addEventListener('feed', () => { renderFeed(); if (current) renderTitle(); });
  S.addEventListener('conversation', (e) => {
    if (e.detail.id === current) renderConversation();
    // Resolve sends whose message arrived by push.
    const c = S.convs.get(e.detail.id);
    const list = outbox.get(e.detail.id);
    if (c && list) {
      const sent = new Set([...c.messages.values()].filter((m) => m.sender_id === S.userId).map((m) => m.client_msg_id));
      const keep = list.filter((o) => !sent.has(o.cmid));
      if (keep.length !== list.length) { outbox.set(e.detail.id, keep); if (e.detail.id === current) renderConversation(); }
    }
  });
  S.addEventListener('gone', (e) => { if (e.detail.id === current) openConversation(null); });
  S.addEventListener('status', () => renderStatus());
  S.addEventListener('friends', () => { refreshFriends(); });
  S.addEventListener('typing', (e) => {
    const v = e.detail;
    if (v.user_id === S.userId) return;
    if (!typingUntil.has(v.conversation_id)) typingUntil.set(v.conversation_id, new Map());
    typingUntil.get(v.conversation_id).set(v.user_id, Date.now() + 5000);
    renderTyping();
    setTimeout(renderTyping, 5100);
  });
  S.addEventListener('session_ended', () => {
    localStorage.removeItem(STORE_KEY);
    S.stop();
    showAuth('login', 'Your session ended. Please log in again.');
  });
  buildShell();
  S.connect();
  refreshFriends();
  setInterval(() => { renderFeed(); }, 30000); // relative times
}

function buildShell() {
  ui.status = h('div', { class: 'status-bar hidden', 'data-testid': 'status' });
  ui.feed = h('div', { class: 'feed', 'data-testid': 'feed' });
  ui.friendsDot = h('span', { class: 'dot hidden' });
  ui.main = h('div', { class: 'main' }, h('div', { class: 'placeholder' }, 'Select a chat or start a new one'));
  ui.shell = h('div', { class: 'shell' },
    h('aside', { class: 'sidebar' },
      h('div', { class: 'side-head' },
        avatar(S.username, S.userId),
        h('h2', {}, 'Chats'),
        h('button', { class: 'icon-btn ghost', title: 'Friends', 'data-testid': 'friends-btn', onclick: showFriends }, '👥', ui.friendsDot),
        h('button', { class: 'icon-btn', title: 'New chat', 'data-testid': 'new-chat', onclick: showNewChat }, '✎'),
        h('button', { class: 'icon-btn ghost', title: 'Log out', 'data-testid': 'logout', onclick: logout }, '⎋')),
      ui.status,
      ui.feed),
    ui.main);
  $app.replaceChildren(ui.shell);
  renderFeed();
}

async function logout() {
  try { await http('POST', '/v1/logout', null, S.token); } catch { /* already ended */ }
  S.stop();
  localStorage.removeItem(STORE_KEY);
  location.reload();
}

function renderStatus() {
  if (!ui.status) return;
  const on = S.online;
  ui.status.classList.toggle('hidden', on);
  ui.status.dataset.state = on ? 'online' : 'offline';
  ui.status.textContent = navigator.onLine === false ? 'You are offline. Waiting for the network…' : 'Connecting…';
}

function entryTitle(e) {
  if (e.kind === 'group') return e.title || 'Group';
  return S.users.get(e.peer_user_id) || '…';
}

function ensureNames(ids) {
  const missing = ids.filter((id) => id && !S.users.has(id));
  if (!missing.length || !S.online) return;
  Promise.all(missing.map((id) => S.nameOf(id))).then(() => { renderFeed(); if (current) renderConversation(); });
}

function renderFeed() {
  if (!ui.feed) return;
  const entries = [...S.feed.values()].filter((e) => !e.archived);
  entries.sort((a, b) => (Number(b.unread_count > 0) - Number(a.unread_count > 0)) || (b.last_activity_ms - a.last_activity_ms));
  ensureNames(entries.flatMap((e) => [e.peer_user_id, e.preview?.sender_id]));
  if (!entries.length) {
    ui.feed.replaceChildren(h('div', { class: 'empty' }, S.online ? 'No chats yet. Tap ✎ to start one.' : 'Loading…'));
    return;
  }
  ui.feed.replaceChildren(...entries.map((e) => {
    const title = entryTitle(e);
    const unread = e.conversation_id === current ? 0 : e.unread_count;
    let preview = e.preview?.text || (e.preview ? '📎 Attachment' : 'No messages yet');
    if (e.preview && e.preview.expires_at_ms && e.preview.expires_at_ms <= Date.now()) preview = '';
    if (e.preview && e.kind === 'group') {
      const who = e.preview.sender_id === S.userId ? 'You' : (S.users.get(e.preview.sender_id) || '…');
      preview = `${who}: ${preview}`;
    } else if (e.preview?.sender_id === S.userId) preview = `You: ${preview}`;
    return h('div', {
      class: `feed-item${unread ? ' unread' : ''}${e.conversation_id === current ? ' active' : ''}`,
      'data-testid': 'feed-item', dataset: { id: e.conversation_id, title },
      onclick: () => openConversation(e.conversation_id),
    },
    avatar(title, e.conversation_id),
    h('div', { class: 'feed-main' },
      h('div', { class: 'feed-top' }, h('span', { class: 'feed-title' }, title), h('span', { class: 'feed-time' }, relTime(e.last_activity_ms))),
      h('div', { class: 'feed-bottom' }, h('span', { class: 'feed-preview' }, preview),
        unread ? h('span', { class: 'badge', 'data-testid': 'unread' }, unread > 99 ? '99+' : unread) : null)));
  }));
}

// ---------- conversation view ----------
function openConversation(id) {
  current = id;
  ui.shell.classList.toggle('in-conv', !!id);
  if (!id) {
    ui.main.replaceChildren(h('div', { class: 'placeholder' }, 'Select a chat or start a new one'));
    renderFeed();
    return;
  }
  const e = S.feed.get(id);
  ui.title = h('b', { 'data-testid': 'conv-title' }, e ? entryTitle(e) : '');
  ui.sub = h('div', { class: 'sub' });
  ui.messages = h('div', { class: 'messages', 'data-testid': 'messages', onscroll: onScroll });
  ui.typing = h('div', { class: 'typing', 'data-testid': 'typing' });
  ui.file = h('input', { type: 'file', class: 'hidden', multiple: true, 'data-testid': 'file-input',
    onchange: () => { for (const f of ui.file.files) sendMessage('', f); ui.file.value = ''; } });
  ui.input = h('textarea', { rows: 1, placeholder: 'Message', 'data-testid': 'composer',
    onkeydown: (ev) => { if (ev.key === 'Enter' && !ev.shiftKey) { ev.preventDefault(); submitText(); } },
    oninput: () => {
      ui.input.style.height = 'auto';
      ui.input.style.height = `${Math.min(ui.input.scrollHeight, 140)}px`;
      if (Date.now() - lastTypingSent > 3000 && ui.input.value) {
        lastTypingSent = Date.now();
        S.request('typing', { conversation_id: current }).catch(() => {});
      }
    } });
  ui.main.replaceChildren(
    h('div', { class: 'conv-head' },
      h('button', { class: 'icon-btn ghost back', 'data-testid': 'back', onclick: () => openConversation(null) }, '←'),
      avatar(e ? entryTitle(e) : '?', id),
      h('div', { class: 'title' }, ui.title, ui.sub),
      h('button', { class: 'icon-btn ghost', title: 'Details', 'data-testid': 'conv-settings', onclick: showSettings }, 'ⓘ')),
    ui.messages, ui.typing,
    h('div', { class: 'composer' },
      h('button', { class: 'icon-btn', title: 'Attach', 'data-testid': 'attach', onclick: () => ui.file.click() }, '📎'),
      ui.file, ui.input,
      h('button', { class: 'icon-btn send', title: 'Send', 'data-testid': 'send', onclick: submitText }, '➤')));
  ui.stickBottom = true;
  renderConversation();
  renderFeed();
  ui.input.focus();
  const c = S.conv(id);
  if (!c.meta && S.online) {
    // Not pushed yet (e.g. just created): ask for it.
    S.request('sync_conversation', { conversation_id: id, token: c.token }).then((r) => {
      if (r.cold_start || r.token !== c.token) S.applyConversation({ ...r, conversation_id: id, from_token: c.token });
    }).catch(() => {});
  }
}

function submitText() {
  const text = ui.input.value.trim();
  if (!text) return;
  ui.input.value = '';
  ui.input.style.height = 'auto';
  sendMessage(text, null);
}

function sendMessage(text, file) {
  const o = { cmid: newId(), text, file, status: 'sending', createdMs: Date.now(), conv: current, media: null, progress: 0 };
  if (file && isImage(file.type)) o.preview = URL.createObjectURL(file);
  if (!outbox.has(current)) outbox.set(current, []);
  outbox.get(current).push(o);
  ui.stickBottom = true;
  renderConversation();
  deliver(o);
}

async function deliver(o) {
  o.status = 'sending';
  if (o.conv === current) renderConversation();
  try {
    if (o.file && !o.media) {
      const up = await S.upload(o.conv, o.file, (p) => { o.progress = p; if (o.conv === current) renderConversation(); });
      o.media = [{ object_id: up.object_id, name: o.file.name || '' }];
    }
    const r = await S.request('send', { conversation_id: o.conv, client_msg_id: o.cmid, text: o.text, media: o.media || [] });
    const c = S.conv(o.conv);
    if (r.message && !c.messages.has(r.message.seq) && r.message.seq > (c.meta?.my_cleared_through_seq || 0)) {
      // Shown at once; the pushed page will carry the same message (upsert).
      S.upsertMessage(c, r.message);
    }
    outbox.set(o.conv, (outbox.get(o.conv) || []).filter((x) => x !== o));
  } catch (e) {
    o.status = 'failed';
    o.error = e.message;
  }
  if (o.conv === current) renderConversation();
}

function onScroll() {
  const m = ui.messages;
  ui.stickBottom = m.scrollHeight - m.scrollTop - m.clientHeight < 60;
  if (m.scrollTop < 80) loadOlder();
  scheduleRead();
}

let loadingOlder = false;
async function loadOlder() {
  const c = S.convs.get(current);
  if (loadingOlder || !c || !c.beforeSeq || !S.online) return;
  loadingOlder = true;
  const id = current;
  const before = ui.messages.scrollHeight;
  try {
    const n = await S.loadOlder(id);
    if (n && id === current) {
      renderConversation();
      ui.messages.scrollTop += ui.messages.scrollHeight - before;
    }
  } catch { /* retried on the next scroll */ }
  loadingOlder = false;
}

function mediaView(m, mine) {
  return (m.media || []).map((x) => {
    if (isImage(x.content_type) && (x.thumbnail_url || x.url)) {
      return h('img', { src: x.thumbnail_url || x.url, alt: x.name || 'image', loading: 'lazy',
        'data-testid': 'msg-image', width: x.width ? Math.min(x.width, 320) : null,
        onclick: () => showLightbox(x.url) });
    }
    return h('a', { class: 'file', href: x.url || '#', download: x.name || '', 'data-testid': 'msg-file' },
      h('span', { class: 'ficon' }, '📄'),
      h('span', {}, x.name || 'file', h('small', {}, `${fmtSize(x.size || 0)}${mine ? '' : ' · download'}`)));
  });
}

function showLightbox(url) {
  if (!url) return;
  const box = h('div', { class: 'lightbox', onclick: () => box.remove() }, h('img', { src: url, alt: '' }));
  document.body.append(box);
}

function messageMenu(m, mine, anchor) {
  document.querySelectorAll('.menu').forEach((x) => x.remove());
  const del = (everyone) => async () => {
    menu.remove();
    try {
      await S.request('delete_message', { conversation_id: m.conversation_id, seq: m.seq, for_everyone: everyone });
      S.conv(m.conversation_id).messages.delete(m.seq);
      renderConversation();
    } catch (e) { alert(e.message); }
  };
  const menu = h('div', { class: 'menu', 'data-testid': 'msg-menu' },
    h('button', { 'data-testid': 'delete-for-me', onclick: del(false) }, 'Delete for me'),
    mine || S.conv(m.conversation_id).meta?.my_role === 'admin'
      ? h('button', { 'data-testid': 'delete-for-everyone', onclick: del(true) }, 'Delete for everyone') : null,
    m.text ? h('button', { onclick: () => { navigator.clipboard?.writeText(m.text); menu.remove(); } }, 'Copy text') : null);
  // On <body>, so re-rendering the messages (a push) doesn't close it.
  const r = anchor.getBoundingClientRect();
  menu.style.position = 'fixed';
  menu.style.top = `${Math.min(r.top + 26, window.innerHeight - 140)}px`;
  if (mine) menu.style.right = `${Math.max(8, window.innerWidth - r.right)}px`;
  else menu.style.left = `${Math.max(8, r.left)}px`;
  document.body.append(menu);
  setTimeout(() => document.addEventListener('click', () => menu.remove(), { once: true }), 0);
}

function renderConversation() {
  if (!current || !ui.messages) return;
  const c = S.conv(current);
  const meta = c.meta;
  renderTitle();
  if (meta) {
    const others = meta.members.filter((x) => x.user_id !== S.userId).map((x) => x.user_id);
    ensureNames(others);
    ui.sub.textContent = meta.kind === 'group'
      ? `${meta.members.length} members${meta.retention_ms ? ` · messages kept ${retentionLabel(meta.retention_ms)}` : ''}`
      : 'Direct chat';
  }
  const msgs = [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  const out = [];
  if (c.beforeSeq) out.push(h('div', { class: 'day' }, 'Scroll up for older messages'));
  let lastDay = '';
  let lastSender = '';
  for (const m of msgs) {
    const day = new Date(m.created_at_ms).toDateString();
    if (day !== lastDay) { out.push(h('div', { class: 'day' }, dayLabel(m.created_at_ms))); lastDay = day; lastSender = ''; }
    const mine = m.sender_id === S.userId;
    const wrap = h('div', { class: `msg${mine ? ' mine' : ''}`, 'data-testid': 'msg', dataset: { seq: m.seq, cmid: m.client_msg_id, status: 'sent' } });
    if (!mine && meta?.kind === 'group' && lastSender !== m.sender_id) wrap.append(h('div', { class: 'sender' }, S.users.get(m.sender_id) || '…'));
    lastSender = m.sender_id;
    const bubble = h('div', { class: 'bubble' }, ...mediaView(m, mine), m.text ? h('div', { 'data-testid': 'msg-text' }, m.text) : null);
    wrap.append(
      h('button', { class: 'more', title: 'More', 'data-testid': 'msg-more', onclick: (ev) => { ev.stopPropagation(); messageMenu(m, mine, wrap); } }, '⋯'),
      bubble,
      h('div', { class: 'meta' }, clock(m.created_at_ms), mine ? h('span', { 'data-testid': 'msg-status' }, seenLabel(m, meta)) : null));
    out.push(wrap);
  }
  for (const o of outbox.get(current) || []) {
    const bubble = h('div', { class: 'bubble' },
      o.preview ? h('img', { src: o.preview, alt: '' }) : null,
      o.file && !o.preview ? h('div', { class: 'file' }, h('span', { class: 'ficon' }, '📄'), h('span', {}, o.file.name, h('small', {}, fmtSize(o.file.size)))) : null,
      o.text ? h('div', { 'data-testid': 'msg-text' }, o.text) : null);
    const status = o.status === 'failed'
      ? [h('span', { class: 'failed' }, `Not sent${o.error ? `: ${o.error}` : ''}`), h('button', { 'data-testid': 'retry', onclick: () => deliver(o) }, 'Retry')]
      : [h('span', { 'data-testid': 'msg-status' }, o.file && !o.media ? `Uploading ${Math.round(o.progress * 100)}%` : 'Sending…')];
    out.push(h('div', { class: 'msg mine', 'data-testid': 'msg', dataset: { cmid: o.cmid, status: o.status } }, bubble, h('div', { class: 'meta' }, ...status)));
  }
  if (!msgs.length && !(outbox.get(current) || []).length) out.push(h('div', { class: 'empty' }, meta ? 'No messages yet. Say hi!' : 'Loading…'));
  const prevScroll = ui.messages.scrollTop;
  ui.messages.replaceChildren(...out);
  if (ui.stickBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  else ui.messages.scrollTop = prevScroll;
  renderTyping();
  scheduleRead();
}

function renderTitle() {
  if (!current || !ui.title) return;
  const meta = S.convs.get(current)?.meta;
  const e = S.feed.get(current);
  let title = e ? entryTitle(e) : '';
  if (meta?.kind === 'group') title = meta.name || 'Group';
  else if (meta) {
    const other = meta.members.find((x) => x.user_id !== S.userId);
    title = (other && S.users.get(other.user_id)) || title || '…';
  }
  ui.title.textContent = title;
}

function seenLabel(m, meta) {
  if (!meta) return 'Sent';
  const others = meta.members.filter((x) => x.user_id !== S.userId);
  if (others.length && others.every((x) => x.last_read_seq >= m.seq)) return 'Seen';
  return 'Sent';
}

function retentionLabel(ms) {
  const d = ms / 86400000;
  if (d >= 1) return `${Math.round(d)} day${d >= 2 ? 's' : ''}`;
  return `${Math.round(ms / 3600000)} h`;
}

function renderTyping() {
  if (!ui.typing || !current) return;
  const m = typingUntil.get(current);
  const now = Date.now();
  const who = m ? [...m.entries()].filter(([, until]) => until > now).map(([id]) => S.users.get(id) || 'Someone') : [];
  ui.typing.textContent = who.length ? `${who.join(', ')} ${who.length > 1 ? 'are' : 'is'} typing…` : '';
}

// Mark read: the newest message visible in the open conversation, while
// the page is visible.
function scheduleRead() {
  clearTimeout(readTimer);
  readTimer = setTimeout(markRead, 300);
}
function markRead() {
  if (!current || document.visibilityState !== 'visible' || !S.online) return;
  const c = S.convs.get(current);
  if (!c?.meta) return;
  const box = ui.messages.getBoundingClientRect();
  let seen = 0;
  for (const el of ui.messages.querySelectorAll('[data-seq]')) {
    const r = el.getBoundingClientRect();
    if (r.top < box.bottom && r.bottom > box.top) seen = Math.max(seen, Number(el.dataset.seq));
  }
  if (seen > (c.meta.my_last_read_seq || 0)) {
    c.meta.my_last_read_seq = seen;
    S.request('mark_read', { conversation_id: current, seq: seen }).catch(() => { c.meta.my_last_read_seq = 0; });
  }
}
document.addEventListener('visibilitychange', scheduleRead);

// ---------- dialogs ----------
function dialog(title, ...body) {
  const overlay = h('div', { class: 'overlay', onclick: (e) => { if (e.target === overlay) overlay.remove(); } },
    h('div', { class: 'dialog', role: 'dialog', 'data-testid': 'dialog' }, h('h3', {}, title), ...body));
  document.body.append(overlay);
  const esc = (e) => { if (e.key === 'Escape') { overlay.remove(); document.removeEventListener('keydown', esc); } };
  document.addEventListener('keydown', esc);
  return overlay;
}

let friendsCache = [];
async function refreshFriends() {
  if (!S) return;
  const wait = () => new Promise((r) => { if (S.online) r(); else S.addEventListener('status', function f() { if (S.online) { S.removeEventListener('status', f); r(); } }); });
  await wait();
  try {
    const r = await S.request('list_friends', { limit: 500 });
    friendsCache = r.friends;
    await Promise.all(friendsCache.map((f) => S.nameOf(f.user_id)));
    const incoming = friendsCache.filter((f) => f.relation === 'incoming').length;
    ui.friendsDot.textContent = incoming || '';
    ui.friendsDot.classList.toggle('hidden', !incoming);
    document.dispatchEvent(new Event('friends-changed'));
  } catch { /* retried on the next change */ }
}

async function findUser(username) {
  const r = await S.request('lookup_user', { username });
  S.users.set(r.user.user_id, r.user.username);
  return r.user;
}

function showFriends() {
  const list = h('div', { class: 'list', 'data-testid': 'friends-list' });
  const name = h('input', { placeholder: 'Username', 'data-testid': 'friend-username' });
  const note = h('div', { class: 'note', 'data-testid': 'friend-note' });
  const render = () => {
    const rows = friendsCache.filter((f) => f.relation !== 'none').map((f) => {
      const n = S.users.get(f.user_id) || '…';
      const act = (op) => async () => { try { await S.request(op, { user_id: f.user_id }); await refreshFriends(); } catch (e) { note.textContent = e.message; } };
      const buttons = {
        incoming: [h('button', { 'data-testid': 'accept', onclick: act('friend_accept') }, 'Accept'), h('button', { class: 'ghost', onclick: act('friend_remove') }, 'Decline')],
        outgoing: [h('span', { class: 'note' }, 'Requested'), h('button', { class: 'ghost', onclick: act('friend_remove') }, 'Cancel')],
        friend: [h('button', { 'data-testid': 'chat-with', onclick: () => startDirect(f.user_id, overlay) }, 'Chat')],
        blocked: [h('button', { class: 'ghost', onclick: act('friend_unblock') }, 'Unblock')],
      }[f.relation] || [];
      return h('div', { class: 'item', 'data-testid': `friend-${f.relation}`, dataset: { name: n } }, avatar(n, f.user_id), h('span', {}, n), ...buttons);
    });
    list.replaceChildren(...(rows.length ? rows : [h('div', { class: 'note' }, 'No friends yet.')]));
  };
  const add = async () => {
    note.textContent = '';
    try {
      const u = await findUser(name.value.trim());
      const r = await S.request('friend_request', { user_id: u.user_id });
      note.textContent = r.friendship.relation === 'friend' ? `You and ${u.username} are now friends.` : `Request sent to ${u.username}.`;
      name.value = '';
      await refreshFriends();
    } catch (e) { note.textContent = e.code === 'not_found' ? 'No such user.' : e.message; }
  };
  const overlay = dialog('Friends',
    h('div', { class: 'row' }, name, h('button', { 'data-testid': 'add-friend', onclick: add }, 'Add')), note, list);
  document.addEventListener('friends-changed', render);
  render();
  refreshFriends();
}

async function startDirect(userId, overlay) {
  try {
    const r = await S.request('create_direct', { user_id: userId });
    overlay?.remove();
    openConversation(r.conversation.id);
  } catch (e) { alert(e.message); }
}

function showNewChat() {
  let mode = 'direct';
  const body = h('div', { style: 'display:grid;gap:12px' });
  const note = h('div', { class: 'note', 'data-testid': 'new-chat-note' });
  const tabs = h('div', { class: 'tabs' });
  const render = () => {
    tabs.replaceChildren(
      h('button', { class: mode === 'direct' ? 'on' : '', 'data-testid': 'tab-direct', onclick: () => { mode = 'direct'; render(); } }, 'Direct'),
      h('button', { class: mode === 'group' ? 'on' : '', 'data-testid': 'tab-group', onclick: () => { mode = 'group'; render(); } }, 'Group'));
    note.textContent = '';
    if (mode === 'direct') {
      const name = h('input', { placeholder: 'Username', 'data-testid': 'direct-username' });
      const go = async () => {
        try {
          const u = await findUser(name.value.trim());
          const f = await S.request('get_friendship', { user_id: u.user_id });
          if (f.friendship.relation === 'friend') return startDirect(u.user_id, overlay);
          const r = await S.request('friend_request', { user_id: u.user_id });
          await refreshFriends();
          if (r.friendship.relation === 'friend') return startDirect(u.user_id, overlay);
          note.textContent = `Friend request sent to ${u.username}. You can chat once they accept.`;
        } catch (e) { note.textContent = e.code === 'not_found' ? 'No such user.' : e.message; }
      };
      const friends = friendsCache.filter((f) => f.relation === 'friend');
      body.replaceChildren(h('div', { class: 'row' }, name, h('button', { 'data-testid': 'direct-go', onclick: go }, 'Chat')), note,
        h('div', { class: 'list' }, ...friends.map((f) => h('div', { class: 'item' }, avatar(S.users.get(f.user_id), f.user_id),
          h('span', {}, S.users.get(f.user_id) || '…'), h('button', { class: 'ghost', onclick: () => startDirect(f.user_id, overlay) }, 'Chat')))));
    } else {
      const name = h('input', { placeholder: 'Group name', 'data-testid': 'group-name' });
      const picks = friendsCache.filter((f) => f.relation === 'friend').map((f) =>
        h('label', { class: 'item' }, h('input', { type: 'checkbox', value: f.user_id, style: 'width:auto', 'data-testid': 'group-pick', dataset: { name: S.users.get(f.user_id) || '' } }),
          h('span', {}, S.users.get(f.user_id) || '…')));
      const go = async () => {
        const ids = picks.map((p) => p.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
        try {
          const r = await S.request('create_group', { name: name.value.trim(), member_ids: ids, conversation_id: newId() });
          overlay.remove();
          openConversation(r.conversation.id);
        } catch (e) { note.textContent = e.message; }
      };
      body.replaceChildren(name, h('div', { class: 'note' }, picks.length ? 'Members' : 'Add friends first to invite them.'),
        h('div', { class: 'list' }, ...picks), note, h('button', { 'data-testid': 'group-create', onclick: go }, 'Create group'));
    }
  };
  const overlay = dialog('New chat', tabs, body);
  render();
}

const RETENTIONS = [[0, 'Forever'], [86400000, '1 day'], [7 * 86400000, '7 days'], [30 * 86400000, '30 days']];

function showSettings() {
  const c = S.conv(current);
  const meta = c.meta;
  if (!meta) return;
  const id = current;
  const note = h('div', { class: 'note', 'data-testid': 'settings-note' });
  const run = async (params) => {
    note.textContent = '';
    try {
      const r = await S.request('update_conversation', { conversation_id: id, ...params });
      c.meta = r.conversation;
      renderConversation();
      overlay.remove();
      showSettings();
    } catch (e) { note.textContent = e.message; }
  };
  const parts = [];
  if (meta.kind === 'group') {
    const name = h('input', { value: meta.name, 'data-testid': 'rename-input' });
    parts.push(h('div', { class: 'row' }, name, h('button', { 'data-testid': 'rename', onclick: () => run({ name: name.value.trim() }) }, 'Rename')));
    const ret = h('select', { 'data-testid': 'retention', onchange: () => run({ retention_ms: Number(ret.value) }) },
      ...RETENTIONS.map(([ms, label]) => h('option', { value: ms, selected: ms === meta.retention_ms }, label)));
    parts.push(h('label', { class: 'note' }, 'Keep messages'), ret);
    const add = h('input', { placeholder: 'Add member by username', 'data-testid': 'add-member-input' });
    parts.push(h('div', { class: 'row' }, add, h('button', { 'data-testid': 'add-member', onclick: async () => {
      try { const u = await findUser(add.value.trim()); run({ add_member_ids: [u.user_id] }); } catch (e) { note.textContent = e.code === 'not_found' ? 'No such user.' : e.message; }
    } }, 'Add')));
  } else {
    parts.push(h('div', { class: 'note' }, 'Direct chat'));
  }
  parts.push(h('div', { class: 'note' }, 'Members'));
  parts.push(h('div', { class: 'list', 'data-testid': 'members' }, ...meta.members.map((m) => {
    const n = S.users.get(m.user_id) || '…';
    return h('div', { class: 'item', dataset: { name: n } }, avatar(n, m.user_id), h('span', {}, n, m.role === 'admin' ? h('small', { class: 'note' }, ' · admin') : null),
      meta.kind === 'group' && meta.my_role === 'admin' && m.user_id !== S.userId
        ? h('button', { class: 'ghost', 'data-testid': 'remove-member', onclick: () => run({ remove_member_ids: [m.user_id] }) }, 'Remove') : null);
  })));
  if (meta.kind === 'group') {
    parts.push(h('button', { class: 'danger', 'data-testid': 'leave', onclick: async () => {
      try {
        await S.request('update_conversation', { conversation_id: id, remove_member_ids: [S.userId] });
        overlay.remove();
        openConversation(null);
      } catch (e) { note.textContent = e.message; }
    } }, 'Leave group'));
  }
  parts.push(note);
  const overlay = dialog(meta.kind === 'group' ? (meta.name || 'Group') : 'Chat details', ...parts);
}

// ---------- boot ----------
const saved = (() => { try { return JSON.parse(localStorage.getItem(STORE_KEY)); } catch { return null; } })();
if (saved?.token && saved.expires_at_ms > Date.now()) start(saved);
else showAuth('login');
