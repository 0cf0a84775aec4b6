// Natter protocol v1 client (docs/protocol.md): accounts over HTTP, one
// WebSocket for requests and pushed delta-sync pages, automatic reconnect
// with `resume` from the tokens of the last pages applied (no gap, no
// duplicate), and the client rules of delta sync.

const REQUEST_TIMEOUT_MS = 15000;
const PING_EVERY_MS = 20000;

export async function http(method, path, body, token) {
  const headers = { 'Content-Type': 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  let v = null;
  try { v = await r.json(); } catch { /* empty body */ }
  if (!r.ok) {
    const e = new Error(v?.error?.message || `HTTP ${r.status}`);
    e.code = v?.error?.code || 'internal';
    e.status = r.status;
    throw e;
  }
  return v;
}

export class ApiError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

/** One conversation as this device holds it. */
/**
 * The metadata held after a metadata change arrives (the model's client
 * rule): it replaces what was held, member list included when
 * `members_complete`; otherwise it names only the members whose view
 * changed, which replace theirs (by user_id) in the list held.
 */
export function mergeConversation(held, next) {
  if (next.members_complete || !held) return { ...next, members_complete: true };
  const members = held.members.map((m) => ({ ...m }));
  for (const m of next.members) {
    const i = members.findIndex((x) => x.user_id === m.user_id);
    if (i >= 0) members[i] = m;
    else members.push(m);
  }
  return { ...next, members, members_complete: true };
}

class Conv {
  constructor(id) {
    this.id = id;
    this.meta = null;          // Conversation object
    this.messages = new Map(); // seq -> Message (live ones only)
    this.token = 0;            // token of the last page applied
    this.beforeSeq = 0;        // older history: pass to `history` (0 = none)
    this.nowMs = 0;
  }
}

export class Session extends EventTarget {
  constructor({ token, user_id, username }) {
    super();
    this.token = token;
    this.userId = user_id;
    this.username = username;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, timer}
    this.feedToken = 0;
    this.feed = new Map();    // conversation_id -> FeedEntry
    this.convs = new Map();   // conversation_id -> Conv
    this.users = new Map();   // user_id -> username (cache)
    this.online = false;
    this.stopped = false;
    this.backoff = 500;
    this.pingTimer = null;
    this.reconnectTimer = null;
    window.addEventListener('offline', () => this.drop('the browser is offline'));
    window.addEventListener('online', () => this.reconnectSoon(0));
  }

  emit(name, detail) { this.dispatchEvent(new CustomEvent(name, { detail })); }

  conv(id) {
    let c = this.convs.get(id);
    if (!c) { c = new Conv(id); this.convs.set(id, c); }
    return c;
  }

  connect() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.reconnectTimer);
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    const ws = new WebSocket(`${proto}://${location.host}/v1/ws?token=${encodeURIComponent(this.token)}`);
    this.ws = ws;
    this.emit('status', { state: 'connecting' });
    ws.onopen = () => {
      this.online = true;
      this.backoff = 500;
      this.emit('status', { state: 'online' });
      this.resume();
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => {
        this.request('ping', {}, 10000).catch(() => this.drop('no answer to ping'));
      }, PING_EVERY_MS);
    };
    ws.onmessage = (m) => {
      let v;
      try { v = JSON.parse(m.data); } catch { return; }
      if (v.event) this.onEvent(v);
      else this.onReply(v);
    };
    ws.onclose = async (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.online = false;
      clearInterval(this.pingTimer);
      this.failPending('connection lost');
      if (e.code === 4001) {
        this.stopped = true;
        this.emit('session_ended', {});
        return;
      }
      // A refused upgrade (401) looks like a close without a code: check
      // the session before retrying forever.
      if (e.code === 1006 && navigator.onLine) {
        try {
          const r = await fetch('/v1/ws', { headers: { Authorization: `Bearer ${this.token}` } });
          if (r.status === 401) { this.stopped = true; this.emit('session_ended', {}); return; }
        } catch { /* network down */ }
      }
      this.emit('status', { state: 'offline' });
      this.reconnectSoon(this.backoff);
      this.backoff = Math.min(this.backoff * 2, 5000);
    };
  }

  reconnectSoon(ms) {
    if (this.stopped || this.ws) return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      if (navigator.onLine === false) { this.reconnectSoon(1000); return; }
      this.connect();
    }, ms);
  }

  /** Ends the current connection (it reconnects by itself). */
  drop(why) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    this.online = false;
    clearInterval(this.pingTimer);
    try { ws.close(); } catch { /* already closed */ }
    this.failPending(why);
    this.emit('status', { state: 'offline' });
    this.reconnectSoon(navigator.onLine === false ? 1000 : 300);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearInterval(this.pingTimer);
    if (this.ws) this.ws.close(1000);
    this.ws = null;
  }

  failPending(why) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new ApiError('unavailable', why));
    }
    this.pending.clear();
  }

  request(op, params = {}, timeout = REQUEST_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new ApiError('unavailable', 'not connected'));
        return;
      }
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ApiError('timeout', `${op}: no answer`));
      }, timeout);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ v: 1, id, op, ...params }));
    });
  }

  onReply(v) {
    const p = this.pending.get(v.id);
    if (!p) return;
    this.pending.delete(v.id);
    clearTimeout(p.timer);
    if (v.error) p.reject(new ApiError(v.error.code, v.error.message));
    else p.resolve(v.ok);
  }

  resume() {
    const conversations = {};
    for (const [id, c] of this.convs) if (c.token) conversations[id] = c.token;
    this.request('resume', { feed_token: this.feedToken, conversations }).catch((e) => {
      if (e.code !== 'unavailable') console.warn('resume failed', e);
    });
  }

  onEvent(v) {
    switch (v.event) {
      case 'feed': return this.applyFeed(v);
      case 'conversation': return this.applyConversation(v);
      case 'conversation_gone':
        this.convs.delete(v.conversation_id);
        this.feed.delete(v.conversation_id);
        this.emit('feed', {});
        this.emit('gone', { id: v.conversation_id });
        return;
      case 'friends': return this.emit('friends', {});
      case 'typing': return this.emit('typing', v);
      case 'session_ended': this.stopped = true; return this.emit('session_ended', v);
      case 'reconnect': return; // a close 1012 follows; we reconnect
      default: return; // unknown events are ignored
    }
  }

  applyFeed(p) {
    if (!p.cold_start && p.from_token !== this.feedToken) {
      // Out of step (should not happen): resync from our token.
      console.warn('feed page out of order', p.from_token, this.feedToken);
      this.resume();
      return;
    }
    if (p.cold_start) this.feed.clear();
    for (const e of p.entries) {
      if (e.hidden || e.removed || e.deleted) this.feed.delete(e.conversation_id);
      else this.feed.set(e.conversation_id, e);
    }
    this.feedToken = p.token;
    this.feedNow = p.now_ms;
    this.emit('feed', {});
  }

  applyConversation(p) {
    const c = this.conv(p.conversation_id);
    if (!p.cold_start && p.from_token !== c.token) {
      console.warn('conversation page out of order', p.conversation_id, p.from_token, c.token);
      this.resume();
      return;
    }
    if (p.cold_start) {
      c.messages.clear();
      c.beforeSeq = p.before_seq;
    }
    this.applyChanges(c, p.changes, p.now_ms);
    c.token = p.token;
    this.emit('conversation', { id: c.id, cold: p.cold_start });
  }

  applyChanges(c, changes, nowMs) {
    c.nowMs = nowMs || Date.now();
    for (const ch of changes) {
      if (ch.conversation) c.meta = mergeConversation(c.meta, ch.conversation);
      else if (ch.message) this.upsertMessage(c, ch.message);
    }
    const cleared = c.meta?.my_cleared_through_seq || 0;
    const retention = c.meta?.retention_ms || 0;
    for (const [seq, m] of c.messages) {
      if (seq <= cleared || (m.expires_at_ms && m.expires_at_ms <= c.nowMs) ||
          (retention && m.created_at_ms + retention <= c.nowMs)) c.messages.delete(seq);
    }
  }

  upsertMessage(c, m) {
    if (m.deleted || m.expired) c.messages.delete(m.seq);
    else c.messages.set(m.seq, m);
  }

  /** Older messages of a conversation (paging up); answers how many. */
  async loadOlder(id) {
    const c = this.conv(id);
    if (!c.beforeSeq) return 0;
    const r = await this.request('history', { conversation_id: id, before_seq: c.beforeSeq, limit: 50 });
    const cleared = c.meta?.my_cleared_through_seq || 0;
    for (const m of r.messages) if (m.seq > cleared && !c.messages.has(m.seq)) this.upsertMessage(c, m);
    c.beforeSeq = r.before_seq;
    return r.messages.length;
  }

  async nameOf(userId) {
    if (userId === this.userId) return this.username;
    const known = this.users.get(userId);
    if (known) return known;
    try {
      const r = await this.request('get_user', { user_id: userId });
      this.users.set(userId, r.user.username);
      return r.user.username;
    } catch {
      return 'unknown';
    }
  }

  async upload(conversationId, file, onProgress) {
    // XMLHttpRequest for upload progress; the body is the raw file.
    return new Promise((resolve, reject) => {
      const x = new XMLHttpRequest();
      const q = `conversation_id=${encodeURIComponent(conversationId)}&name=${encodeURIComponent(file.name || 'file')}`;
      x.open('POST', `/v1/media?${q}`);
      x.setRequestHeader('Authorization', `Bearer ${this.token}`);
      x.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
      x.onload = () => {
        let v = null;
        try { v = JSON.parse(x.responseText); } catch { /* not JSON */ }
        if (x.status === 201) resolve(v);
        else reject(new ApiError(v?.error?.code || 'internal', v?.error?.message || `upload failed (${x.status})`));
      };
      x.onerror = () => reject(new ApiError('unavailable', 'upload failed: network error'));
      x.send(file);
    });
  }
}
