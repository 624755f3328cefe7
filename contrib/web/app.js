// app.js - the chatd web client: state, rendering and the UI's events.
//
// transport.js carries JSON over one WebSocket per tab, protocol.js turns
// it into requests with promises and events; this file keeps the state
// (the user, friends, groups, conversations with their messages and unread
// counts) and renders it.  Every string a user supplied is put into the
// page with textContent (el() below), never as HTML.  The session (id,
// name, resume token) and the conversations are kept in localStorage, so a
// reload or a lost network logs in again with the token and shows what was
// there.  docs/web.md describes the structure.

import { Transport, defaultUrl } from './transport.js';
import { Protocol, ChatError, newCid } from './protocol.js';

const SESSION_KEY = 'chatd.session';
const KEEP_PER_CONV = 200; // messages kept per conversation in localStorage

const $ = (id) => document.getElementById(id);

// An element with text: the one way user strings reach the page.
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

// ---- state ----------------------------------------------------------------

const state = {
  me: null,               // {id, name, token}
  loggedIn: false,
  friends: new Map(),     // id -> {id, name, state}
  groups: new Map(),      // id -> {id, groupname, groupdesc, users: [...]}
  convs: new Map(),       // "u:ID" | "g:ID" -> {kind, id, title, messages, unread}
  requests: [],           // friend requests (policy = mutual)
  current: null,          // key of the open conversation
  durable: null,          // the store answers SYNC (null: not known yet)
  syncing: null,          // the SYNC loop running (a promise)
  typing: new Map(),      // conv key -> Map(user id -> {name, timer}): who types there
  presenceLive: false,    // the server sends PRESENCE (19): poll the lists rarely
  elsewhere: 0,           // resumes refused in a row (errno 2): the retry backs off
};

const TYPING_SEND_MS = 3000; // at most one TYPING per conversation this often
const TYPING_SHOW_MS = 5000; // "... is typing" without a new TYPING: gone

function convKey(kind, id) { return kind + ':' + id; }

function loadSession() {
  try { return JSON.parse(localStorage.getItem(SESSION_KEY)); } catch (e) { return null; }
}

function saveSession() {
  if (state.me) localStorage.setItem(SESSION_KEY, JSON.stringify(state.me));
  else localStorage.removeItem(SESSION_KEY);
}

function convStoreKey() { return 'chatd.convs.' + state.me.id; }

function loadConvs() {
  state.convs.clear();
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(convStoreKey())); } catch (e) { saved = null; }
  if (!saved || !Array.isArray(saved.convs)) return;
  for (const c of saved.convs) {
    if (!c || (c.kind !== 'u' && c.kind !== 'g')) continue;
    state.convs.set(convKey(c.kind, c.id), Object.assign(newConv(c.kind, c.id, String(c.title || '')), {
      unread: c.unread | 0, pos: c.pos | 0, read: c.read | 0,
      peerRead: c.peerRead | 0, peerDelivered: c.peerDelivered | 0,
      older: c.older !== false,
      messages: Array.isArray(c.messages) ? c.messages : [],
    }));
  }
  state.current = saved.current && state.convs.has(saved.current) ? saved.current : null;
}

let saveTimer = null;
function saveConvs() {
  if (!state.me) return;
  clearTimeout(saveTimer);
  saveTimer = setTimeout(() => {
    const convs = [...state.convs.values()].map((c) => ({
      kind: c.kind, id: c.id, title: c.title, unread: c.unread, pos: c.pos, read: c.read,
      peerRead: c.peerRead, peerDelivered: c.peerDelivered,
      older: c.older || c.messages.length > KEEP_PER_CONV,
      messages: c.messages.slice(-KEEP_PER_CONV).map((m) => Object.assign({}, m, { inflight: false })),
    }));
    try {
      localStorage.setItem(convStoreKey(), JSON.stringify({ convs, current: state.current }));
    } catch (e) { /* full: the conversations live on in memory */ }
  }, 50);
}

function newConv(kind, id, title) {
  return {
    kind, id, title: title || (kind === 'u' ? 'user ' + id : 'group ' + id), messages: [], unread: 0,
    // durable messaging: pos = the last cseq held with none missing below
    // it (the SYNC position), read = our read mark, peer* = the other
    // user's marks (pairs), older = HISTORY may have earlier messages
    pos: 0, read: 0, peerRead: 0, peerDelivered: 0, older: true,
  };
}

// The store's name of a conversation: "pA:B" (A < B) or "gG".
function storeName(c) {
  if (c.kind === 'g') return 'g' + c.id;
  const a = Math.min(state.me.id, c.id), b = Math.max(state.me.id, c.id);
  return 'p' + a + ':' + b;
}

function convOfStoreName(name, title) {
  let m = /^g([0-9]+)$/.exec(name);
  if (m) return conv('g', Number(m[1]), title);
  m = /^p([0-9]+):([0-9]+)$/.exec(name);
  if (!m) return null;
  const a = Number(m[1]), b = Number(m[2]);
  return conv('u', a === state.me.id ? b : a, title);
}

function conv(kind, id, title) {
  const key = convKey(kind, id);
  let c = state.convs.get(key);
  if (!c) {
    c = newConv(kind, id, title);
    state.convs.set(key, c);
  } else if (title) {
    c.title = title;
  }
  return c;
}

// ---- transport and protocol -------------------------------------------------

const transport = new Transport(defaultUrl());
const proto = new Protocol(transport);

transport.addEventListener('open', () => {
  setConn('connected');
  if (state.me && state.me.token) resume();
});
transport.addEventListener('close', () => {
  state.loggedIn = false;
  setConn('offline');
});
transport.addEventListener('retry', (e) => setConn('reconnecting in ' + Math.ceil(e.detail.inMs / 1000) + ' s'));
transport.addEventListener('connecting', () => setConn('connecting'));

proto.addEventListener('chat', (e) => onChat(e.detail, false));
proto.addEventListener('notice', (e) => onNotice(e.detail));
proto.addEventListener('receipt', (e) => onReceipt(e.detail));
proto.addEventListener('typing', (e) => onTyping(e.detail));
proto.addEventListener('presence', (e) => onPresence(e.detail));

async function resume() {
  // another tab of this origin may hold a newer token (they share it)
  const saved = loadSession();
  if (saved && saved.id === state.me.id && saved.token) state.me.token = saved.token;
  const token = state.me.token;
  try {
    const ack = await proto.resume(state.me.id, token);
    state.elsewhere = 0;
    afterLogin(ack);
  } catch (err) {
    const now = loadSession();
    if (err.errno === 1 && now && now.token && now.token !== token) {
      transport.reconnect(); // another tab changed the token meanwhile
    } else if (err.errno === 1) { // the token is gone: log in with the password
      state.me = null;
      saveSession();
      showLogin('Your session has ended: log in again.');
    } else if (err.errno === 2 || err.errno === 110) {
      // multi_login = refuse: the other tab (or a dead connection the
      // server has not noticed yet) holds the login.  Ask again, less and
      // less often; never take it over.
      const wait = Math.min(60000, 3000 * 2 ** Math.min(state.elsewhere++, 5));
      showStatus('This account is logged in elsewhere (another tab?). Retrying in ' +
        Math.round(wait / 1000) + ' s', true);
      setTimeout(() => transport.reconnect(), wait);
    } else if (err.errno === 127) { // multi: devices_max devices are logged in
      park('too many devices', 'Too many tabs or devices are logged in to this account: close one, then reconnect.');
    } else if (err.errno === 125) {
      setTimeout(() => transport.reconnect(), err.retryAfterMs || 1000);
    } else if (err.errno !== -1) {
      showStatus('Could not resume: ' + err.text, true);
    }
  }
}

function afterLogin(ack) {
  const first = !state.me || state.me.id !== ack.id;
  state.me = { id: ack.id, name: ack.name, token: ack.token || (state.me && state.me.token) };
  state.loggedIn = true;
  proto.uid = ack.id;
  saveSession();
  if (first || state.convs.size === 0) loadConvs();
  setFriends(ack.friends || []);
  setGroups(ack.groups || []);
  for (const m of ack.offlinemsg || []) onChat(m, true);
  if (ack.truncated) refreshLists();
  showChat();
  setConn('online');
  // what this device missed, from its stored positions; then our unsent
  Promise.resolve(sync()).then(resendUnacked);
}

// ---- durable messaging: SYNC, HISTORY, READ (docs/protocol.md) -------------

// SYNC until "more" is false: every message after our positions, once.
function sync() {
  if (state.syncing || state.durable === false) return state.syncing;
  state.syncing = (async () => {
    try {
      for (let round = 0; round < 100 && state.loggedIn; round++) {
        const positions = [...state.convs.values()].filter((c) => c.pos > 0)
          .map((c) => ({ conv: storeName(c), cseq: c.pos }));
        const r = await proto.sync(positions);
        state.durable = true;
        for (const m of r.msgs || []) {
          const c = convOfStoreName(m.conv);
          // a run after position 0 starts where the conversation starts
          // for us (a group joined late, a purge): not a gap
          if (c && !c.pos && m.cseq > 1) c.pos = m.cseq - 1;
          onChat(m, true);
        }
        for (const h of r.convs || []) applyMarks(h);
        if (!r.more) { // our position in each conversation is now its head
          for (const h of r.convs || []) {
            const c = convOfStoreName(h.conv);
            if (c && h.head > c.pos) c.pos = h.head;
          }
          break;
        }
      }
      recountUnread();
      markDelivered();
    } catch (err) {
      if (err.errno === 103) state.durable = false; // no store plugin
    } finally {
      state.syncing = null;
      saveConvs();
      render();
    }
  })();
  return state.syncing;
}

function applyMarks(h) {
  const c = convOfStoreName(h.conv);
  if (!c) return;
  if (h.read > c.read) c.read = h.read;
  if (c.kind === 'g') applyGroupMarks(c, h);
  else {
    if (h.peer_read > c.peerRead) c.peerRead = h.peer_read;
    if (h.peer_delivered > c.peerDelivered) c.peerDelivered = h.peer_delivered;
  }
  c.head = h.head;
}

// Group receipts: how far every other member has got (delivered to all,
// read by all).  The store's aggregate fields are read here and nowhere
// else; their names are not settled yet, so the likely ones are accepted.
// Without them, the live marks of each member (msgid 17 with "id") are
// kept and their minimum over the members we know is the group's.
const GROUP_DELIVERED = ['all_delivered', 'group_delivered', 'peer_delivered', 'members_delivered'];
const GROUP_READ = ['all_read', 'group_read', 'peer_read', 'members_read'];

function firstNumber(o, names) {
  for (const n of names) if (typeof o[n] === 'number') return o[n];
  return undefined;
}

// true when h carried aggregate marks
function applyGroupMarks(c, h) {
  const d = firstNumber(h, GROUP_DELIVERED), r = firstNumber(h, GROUP_READ);
  if (d === undefined && r === undefined) return false;
  c.groupTicks = true;
  if (r > c.peerRead) c.peerRead = r;
  if (Math.max(d || 0, r || 0) > c.peerDelivered) c.peerDelivered = Math.max(d || 0, r || 0);
  return true;
}

function applyMemberMark(c, m) {
  const g = state.groups.get(c.id);
  c.members = c.members || {};
  const k = c.members[m.id] || { delivered: 0, read: 0 };
  if (m.delivered > k.delivered) k.delivered = m.delivered;
  if (m.read > k.read) k.read = m.read;
  c.members[m.id] = k;
  if (!g || !Array.isArray(g.users)) return;
  const others = g.users.filter((u) => u.id !== state.me.id);
  if (!others.length) return;
  const mark = (u, f) => (c.members[u.id] ? Math.max(c.members[u.id][f], f === 'delivered' ? c.members[u.id].read : 0) : 0);
  c.groupTicks = true;
  c.peerDelivered = Math.max(c.peerDelivered, Math.min(...others.map((u) => mark(u, 'delivered'))));
  c.peerRead = Math.max(c.peerRead, Math.min(...others.map((u) => mark(u, 'read'))));
}

// Unread = messages of others above our read mark (the mark is shared by
// every tab and device of the user); messages without a cseq (no store)
// keep the count kept as they came.
function recountUnread() {
  for (const c of state.convs.values()) {
    if (!c.pos) continue;
    if (convKey(c.kind, c.id) === state.current && !document.hidden) {
      c.unread = 0;
      continue;
    }
    c.unread = c.messages.filter((m) => !m.mine && (m.cseq ? m.cseq > c.read : false)).length;
  }
}

let deliveredTimer = null;
// Tell the store what reached this device (debounced): the peer's ticks.
function markDelivered() {
  clearTimeout(deliveredTimer);
  deliveredTimer = setTimeout(() => {
    for (const c of state.convs.values()) {
      if (c.pos > (c.sentDelivered || 0)) {
        c.sentDelivered = c.pos;
        proto.markRead(storeName(c), { delivered: c.pos }).catch(() => { c.sentDelivered = 0; });
      }
    }
  }, 300);
}

function markRead(c) {
  if (!state.durable || !c.pos || c.read >= c.pos || !state.loggedIn) return;
  const upto = c.pos;
  proto.markRead(storeName(c), { read: upto }).then((r) => {
    if (r.read > c.read) c.read = r.read;
    saveConvs();
  }).catch(() => {});
}

// Marks, live (msgid 17): a peer's or a group's give ticks on our
// messages; our own (another tab or device read the conversation) clear
// the unread count here too.
function onReceipt(m) {
  const c = convOfStoreName(m.conv);
  if (!c) return;
  const aggregate = c.kind === 'g' && applyGroupMarks(c, m);
  if (m.id === state.me.id) {
    if (m.read > c.read) {
      c.read = m.read;
      c.unread = c.messages.filter((x) => !x.mine && x.cseq > c.read).length;
    }
  } else if (c.kind === 'g') {
    if (!aggregate && m.id) applyMemberMark(c, m);
  } else {
    if (m.read > c.peerRead) c.peerRead = m.read;
    if (m.delivered > c.peerDelivered) c.peerDelivered = m.delivered;
  }
  saveConvs();
  render();
}

// ---- typing and presence (msgid 18, 19) ----------------------------------------

function typingKey(m) { return m.groupid ? convKey('g', m.groupid) : convKey('u', m.id); }

// TYPING from someone else: "... is typing" for TYPING_SHOW_MS, renewed by
// each TYPING, gone at typing:false or at their message.
function onTyping(m) {
  if (!state.me || m.id === state.me.id || typeof m.id !== 'number') return;
  const key = typingKey(m);
  if (m.typing === false) { stopTyping(key, m.id); return; }
  let who = state.typing.get(key);
  if (!who) state.typing.set(key, (who = new Map()));
  const prev = who.get(m.id);
  if (prev) clearTimeout(prev.timer);
  who.set(m.id, { name: String(m.name || '#' + m.id), timer: setTimeout(() => stopTyping(key, m.id), TYPING_SHOW_MS) });
  renderTyping();
  renderList();
}

function stopTyping(key, uid, quiet) {
  const who = state.typing.get(key);
  if (!who || !who.has(uid)) return;
  clearTimeout(who.get(uid).timer);
  who.delete(uid);
  if (!who.size) state.typing.delete(key);
  if (quiet) return; // the caller renders
  renderTyping();
  renderList();
}

function typingText(key) {
  const who = state.typing.get(key);
  if (!who || !who.size) return '';
  const names = [...who.values()].map((x) => x.name);
  if (names.length === 1) return names[0] + ' is typing…';
  if (names.length === 2) return names[0] + ' and ' + names[1] + ' are typing…';
  return names.length + ' people are typing…';
}

// Our side: TYPING when the composer changes, at most every
// TYPING_SEND_MS per conversation; typing:false when the message is sent,
// the composer is emptied or left, or another conversation is opened.
const typingOut = { key: null, at: 0, off: false };

function typingTarget(c) { return c.kind === 'u' ? { toid: c.id } : { groupid: c.id }; }

function sendTyping(c, on) {
  proto.typing(typingTarget(c), on).catch((err) => {
    // a server without TYPING: stop asking (a busy or lost one: next time)
    if (err.errno > 0 && err.errno !== 113 && err.errno !== 125) typingOut.off = true;
  });
}

function typingInput() {
  const c = state.convs.get(state.current);
  if (!c || !state.loggedIn || typingOut.off) return;
  if (!$('message-input').value.trim()) { typingStop(); return; }
  const key = convKey(c.kind, c.id);
  const t = Date.now();
  if (typingOut.key === key && t - typingOut.at < TYPING_SEND_MS) return;
  if (typingOut.key && typingOut.key !== key) typingStop();
  typingOut.key = key;
  typingOut.at = t;
  sendTyping(c, true);
}

function typingStop() {
  if (!typingOut.key) return;
  const c = state.convs.get(typingOut.key);
  typingOut.key = null;
  typingOut.at = 0;
  if (c && state.loggedIn && !typingOut.off) sendTyping(c, false);
}

// PRESENCE: a friend's first device came online or last went offline.
function onPresence(m) {
  if (typeof m.id !== 'number') return;
  const st = m.online ? 'online' : 'offline';
  state.presenceLive = true;
  const f = state.friends.get(m.id);
  if (f) f.state = st;
  for (const g of state.groups.values())
    for (const u of g.users || []) if (u.id === m.id) u.state = st;
  if (!m.online) for (const key of [...state.typing.keys()]) stopTyping(key, m.id, true);
  render();
}

// HISTORY: the page of messages before the oldest we hold.
async function loadOlder(c) {
  if (!state.durable || !c.older || c.loadingOlder || !state.loggedIn) return;
  const first = c.messages.find((m) => m.cseq);
  if (first && first.cseq <= 1) { c.older = false; return; }
  c.loadingOlder = true;
  try {
    const r = await proto.history(storeName(c), first ? first.cseq : 0, 50);
    const ol = $('messages');
    const fromBottom = ol.scrollHeight - ol.scrollTop;
    for (const m of r.msgs || []) onChat(m, true, true);
    c.older = !!r.more;
    render();
    ol.scrollTop = ol.scrollHeight - fromBottom; // keep what was in view
  } catch (err) {
    if (err.errno === 121 || err.errno === 103) c.older = false;
  } finally {
    c.loadingOlder = false;
    saveConvs();
  }
}

async function refreshLists() {
  try {
    const f = await proto.friendList();
    setFriends(f.friends || []);
    state.requests = f.requests || [];
    const g = await proto.groupList();
    setGroups(g.groups || []);
  } catch (e) { /* shown elsewhere; the lists stay as they were */ }
  render();
}

function setFriends(list) {
  state.friends.clear();
  for (const f of list) {
    state.friends.set(f.id, f);
    conv('u', f.id, f.name);
  }
  render();
}

function setGroups(list) {
  state.groups.clear();
  for (const g of list) {
    state.groups.set(g.id, g);
    conv('g', g.id, g.groupname);
  }
  render();
}

function now() { return new Date(); }

function fmtTime(ts) {
  const d = new Date(ts);
  const today = new Date();
  const t = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return d.toDateString() === today.toDateString() ? t : d.toLocaleDateString() + ' ' + t;
}

// msgid 6 or 10 (live; the login ack's offlinemsg; SYNC; HISTORY).  With
// the store, a message carries mid/conv/cseq: it is kept once (by mid, or
// by cid for our own), in cseq order, and a cseq that skips asks SYNC.
function onChat(m, offline, old) {
  if (m.conv) {
    const g = m.msgid === 10 ? state.groups.get(m.groupid) : null;
    const c = convOfStoreName(m.conv, m.msgid === 6 && m.id !== state.me.id ? m.name
      : g ? g.groupname : null);
    // live from a group we did not know of (a member added us): its name
    if (m.msgid === 10 && !g && !offline) refreshLists();
    if (c && !offline && m.id !== state.me.id) stopTyping(convKey(c.kind, c.id), m.id, true);
    if (c && addDurable(c, m, offline, old)) {
      if (!offline) {
        if (convKey(c.kind, c.id) === state.current && !document.hidden) markRead(c);
        saveConvs();
      }
      render();
    }
    return;
  }
  let c;
  const mine = m.id === state.me.id; // sent from another device (tab) of ours
  if (m.msgid === 10) {
    const g = state.groups.get(m.groupid);
    c = conv('g', m.groupid, g ? g.groupname : null);
    if (!g) refreshLists(); // a group we did not know of (added by a member)
  } else if (mine) {
    if (!m.toid) return;
    c = conv('u', m.toid);
  } else {
    c = conv('u', m.id, m.name);
    const f = state.friends.get(m.id);
    if (f) f.state = 'online';
  }
  if (!mine) stopTyping(convKey(c.kind, c.id), m.id, true);
  c.messages.push({ from: m.id, name: String(m.name || ''), text: String(m.msg), ts: msgTime(m), mine });
  if (!mine && (state.current !== convKey(c.kind, c.id) || document.hidden)) c.unread++;
  if (!offline) saveConvs();
  render();
}

function msgTime(m) {
  const parsed = Date.parse(m.time);
  return Number.isFinite(parsed) ? parsed : Date.now();
}

// A stored message into its conversation; false when it was there already.
function addDurable(c, m, offline, old) {
  const mine = m.id === state.me.id;
  if (c.messages.some((x) => x.mid === m.mid)) return false;
  if (mine && m.cid) { // our own, sent from this device: the ACK may be lost
    const own = c.messages.find((x) => x.cid === m.cid);
    if (own) {
      Object.assign(own, { mid: m.mid, cseq: m.cseq, pending: false });
      advance(c);
      return true;
    }
  }
  const rec = { from: m.id, name: String(m.name || ''), text: String(m.msg), ts: msgTime(m),
    mine, mid: m.mid, cseq: m.cseq, cid: m.cid };
  // in cseq order among the stored messages: live ones go last; what
  // SYNC or HISTORY fills in goes before the first with a higher cseq.
  // Messages without a cseq (ours unacknowledged, a peer without the
  // store) stay where they arrived.
  const at = c.messages.findIndex((x) => x.cseq > m.cseq);
  if (at < 0) c.messages.push(rec);
  else c.messages.splice(at, 0, rec);
  if (!mine && !old && (state.current !== convKey(c.kind, c.id) || document.hidden) && m.cseq > c.read) c.unread++;
  const before = c.pos;
  advance(c);
  if (!old && !offline) {
    if (m.cseq > before + 1 && state.durable) sync(); // a gap while live
    markDelivered();
  }
  return true;
}

// pos: the SYNC position, the highest cseq held with nothing missing
// between the position SYNC started from and it.  HISTORY pages lie below.
function advance(c) {
  const held = new Set();
  for (const x of c.messages) if (x.cseq) held.add(x.cseq);
  let p = c.pos;
  while (held.has(p + 1)) p++;
  c.pos = p;
}

// Stop reconnecting (another tab holds the login): this tab waits for the
// user to press Reconnect, so two tabs never take the login from each
// other in a loop.
function park(conn, text) {
  showStatus(text, true);
  transport.stop();
  state.loggedIn = false;
  setConn(conn);
  const again = el('button', 'secondary', 'Reconnect');
  again.type = 'button';
  again.id = 'reconnect';
  again.addEventListener('click', () => { setConn('connecting'); transport.start(); });
  $('conn').append(' ', again);
}

function onNotice(n) {
  if (n.errno === 116) { // multi_login = replace: a newer tab or device took over
    park('signed in elsewhere', 'Logged in elsewhere (another tab?): this tab is disconnected.');
    return;
  }
  if (n.errno === 118 || n.errno === 119) { // the node stops or drains: go to
    // another one now (nginx picks it); SYNC fills in what comes meanwhile
    showStatus('The server is restarting: reconnecting…');
    transport.reconnect();
    return;
  }
  showStatus(n.errmsg ? 'Server: ' + n.errmsg : 'Server notice ' + n.errno, n.errno !== 0);
}

// ---- sending ----------------------------------------------------------------

async function send(text) {
  const c = state.convs.get(state.current);
  if (!c || !text) return;
  typingStop();
  const msg = { from: state.me.id, name: state.me.name, text, ts: Date.now(), mine: true,
    pending: true, cid: newCid() };
  c.messages.push(msg);
  render();
  await deliver(c, msg);
}

// Send until an answer that is final.  With the store (durable), 113, a
// lost connection and a timeout are retried with the same cid: the server
// stores and delivers it once whatever happened.  125 waits retry_after_ms.
async function deliver(c, msg) {
  const time = new Date(msg.ts).toISOString();
  msg.inflight = true;
  msg.pending = true;
  msg.failed = null;
  for (let attempt = 0; ; attempt++) {
    try {
      if (!state.loggedIn) throw new ChatError({ errno: -1, errmsg: 'not connected' });
      const ack = c.kind === 'u' ? await proto.sendTo(c.id, msg.text, time, msg.cid)
        : await proto.sendGroup(c.id, msg.text, time, msg.cid);
      msg.pending = false;
      if (ack.mid) {
        Object.assign(msg, { mid: ack.mid, cseq: ack.cseq });
        addDurable(c, { msgid: 0, id: state.me.id, cid: msg.cid, mid: ack.mid, cseq: ack.cseq,
          conv: ack.conv, msg: msg.text }, true, false);
      }
      showError('send-error', '');
      break;
    } catch (err) {
      const transient = err.errno === 125 || err.errno === 113 ||
        (state.durable && (err.errno === -1 || err.errno === -2));
      if (!(err instanceof ChatError) || !transient || attempt >= 8) {
        msg.pending = false;
        msg.failed = err.text || String(err);
        showError('send-error', msg.failed);
        break;
      }
      showError('send-error', err.text + ' (retrying)');
      const wait = err.errno === 125 ? (err.retryAfterMs || 1000) : Math.min(8000, 500 * 2 ** attempt);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
  msg.inflight = false;
  saveConvs();
  render();
}

// After a (re)login: what we sent and never saw acknowledged, again with
// its cid (SYNC has already matched those the server had stored).
function resendUnacked() {
  if (!state.durable) return;
  for (const c of state.convs.values())
    for (const m of c.messages)
      if (m.mine && m.cid && !m.mid && !m.failed && !m.inflight) deliver(c, m);
}

// ---- rendering --------------------------------------------------------------

function setConn(text) {
  $('conn').textContent = text;
  document.body.dataset.conn = text;
}

let statusTimer = null;
function showStatus(text, isError) {
  const s = $('status');
  s.textContent = text;
  s.classList.toggle('error', !!isError);
  s.classList.add('show');
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => s.classList.remove('show'), 6000);
}

function showError(id, text) { $(id).textContent = text || ''; }

function showLogin(msg) {
  $('chat-screen').hidden = true;
  $('login-screen').hidden = false;
  showError('login-error', msg || '');
  document.title = 'chatd';
}

function showChat() {
  $('login-screen').hidden = true;
  $('chat-screen').hidden = false;
  render();
}

function presenceOf(c) {
  if (c.kind !== 'u') return null;
  const f = state.friends.get(c.id);
  return f ? f.state : null;
}

function renderList() {
  const ul = $('conv-list');
  // the list is built anew: the keyboard's place in it is kept
  const focused = document.activeElement && document.activeElement.classList.contains('conv-item')
    ? document.activeElement.dataset.key : null;
  ul.replaceChildren();
  const convs = [...state.convs.values()].sort((a, b) => {
    const la = a.messages.length ? a.messages[a.messages.length - 1].ts : 0;
    const lb = b.messages.length ? b.messages[b.messages.length - 1].ts : 0;
    return lb - la || a.title.localeCompare(b.title);
  });
  for (const c of convs) {
    const li = el('li');
    const b = el('button', 'conv-item');
    b.type = 'button';
    b.dataset.key = convKey(c.kind, c.id);
    if (b.dataset.key === state.current) b.setAttribute('aria-current', 'true');
    const p = presenceOf(c);
    const dot = el('span', 'dot ' + (c.kind === 'g' ? 'group' : p === 'online' ? 'online' : 'offline'));
    dot.setAttribute('aria-hidden', 'true');
    const title = el('span', 'conv-name', c.title);
    const kind = el('span', 'sr-only', c.kind === 'g' ? ' (group)' : p ? ' (' + p + ')' : '');
    const last = c.messages[c.messages.length - 1];
    const typing = typingText(b.dataset.key);
    const preview = typing ? el('span', 'conv-preview typing', typing)
      : el('span', 'conv-preview', last ? last.text : (c.kind === 'g' ? 'group #' + c.id : '#' + c.id));
    b.append(dot, title, kind, preview);
    if (c.unread > 0) {
      const u = el('span', 'unread', c.unread);
      u.setAttribute('aria-label', c.unread + ' unread');
      b.append(u);
    }
    b.addEventListener('click', () => openConv(b.dataset.key));
    li.append(b);
    ul.append(li);
    if (b.dataset.key === focused) b.focus();
  }
  const rq = $('requests');
  rq.hidden = state.requests.length === 0;
  const rl = $('request-list');
  rl.replaceChildren();
  for (const r of state.requests) {
    const li = el('li');
    li.append(el('span', 'req-name', r.name), el('span', 'me-id', ' #' + r.id));
    const ok = el('button', 'secondary', 'Accept');
    ok.type = 'button';
    ok.addEventListener('click', () => addFriend(r.id));
    li.append(' ', ok);
    rl.append(li);
  }
}

function renderConv() {
  const c = state.current ? state.convs.get(state.current) : null;
  document.body.classList.toggle('in-conv', !!c);
  $('empty').hidden = !!c;
  $('conv').hidden = !c;
  if (!c) return;
  $('conv-title').textContent = c.title;
  const p = presenceOf(c);
  const g = c.kind === 'g' ? state.groups.get(c.id) : null;
  $('conv-sub').textContent = c.kind === 'g'
    ? 'group #' + c.id + (g ? ' · ' + g.users.length + ' members' : '')
    : '#' + c.id + (p ? ' · ' + p : '');
  $('members-toggle').hidden = c.kind !== 'g';
  if (c.kind !== 'g') $('members').hidden = true;
  const ml = $('member-list');
  ml.replaceChildren();
  if (g) {
    if (g.groupdesc) ml.append(el('li', 'group-desc', g.groupdesc));
    for (const u of g.users) {
      const li = el('li', 'member');
      const dot = el('span', 'dot ' + (u.state === 'online' ? 'online' : 'offline'));
      dot.setAttribute('aria-hidden', 'true');
      li.append(dot, el('span', 'member-name', u.name), el('span', 'me-id', ' #' + u.id + (u.role === 'creator' ? ' · creator' : '')),
        el('span', 'sr-only', ' (' + u.state + ')'));
      ml.append(li);
    }
  }
  const ol = $('messages');
  const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
  ol.replaceChildren();
  // older pages (HISTORY) load when the list is scrolled to its top, or
  // with this button (keyboard users)
  if (state.durable && c.older && c.messages.some((m) => m.cseq > 1)) {
    const li = el('li', 'older');
    const b = el('button', 'secondary', c.loadingOlder ? 'Loading…' : 'Load older messages');
    b.type = 'button';
    b.id = 'load-older';
    b.addEventListener('click', () => loadOlder(c));
    li.append(b);
    ol.append(li);
  }
  for (const m of c.messages) {
    const li = el('li', 'msg' + (m.mine ? ' mine' : '') + (m.pending ? ' pending' : '') + (m.failed ? ' failed' : ''));
    if (m.cseq) li.dataset.cseq = m.cseq;
    if (c.kind === 'g' && !m.mine) li.append(el('span', 'msg-from', m.name || '#' + m.from));
    li.append(el('span', 'msg-text', m.text));
    const meta = el('span', 'msg-meta');
    const t = el('time', 'msg-time', fmtTime(m.ts));
    t.dateTime = new Date(m.ts).toISOString();
    meta.append(t);
    if (m.pending) meta.append(el('span', 'msg-state', ' · sending'));
    if (m.failed) meta.append(el('span', 'msg-state', ' · not sent: ' + m.failed));
    if (m.mine && !m.pending && !m.failed && (c.kind === 'u' || c.groupTicks)) {
      // ✓ stored/sent, ✓✓ delivered to a device of the peer (of every
      // other member), blue ✓✓ read (by every other member)
      const read = m.cseq && m.cseq <= c.peerRead;
      const delivered = read || (m.cseq && m.cseq <= c.peerDelivered);
      const tick = el('span', 'tick' + (read ? ' read' : delivered ? ' delivered' : ' sent'),
        delivered ? ' ✓✓' : ' ✓');
      tick.title = (read ? 'read' : delivered ? 'delivered' : 'sent') +
        (c.kind === 'g' && delivered ? (read ? ' by everyone' : ' to everyone') : '');
      tick.setAttribute('aria-label', tick.title);
      meta.append(tick);
    }
    li.append(meta);
    ol.append(li);
  }
  if (atBottom || c.messages.length && c.messages[c.messages.length - 1].mine) ol.scrollTop = ol.scrollHeight;
  renderTyping();
}

function renderTyping() {
  const t = $('typing');
  const text = state.current ? typingText(state.current) : '';
  if (t.textContent !== text) t.textContent = text;
}

function render() {
  if (!state.me) return;
  $('me-name').textContent = state.me.name;
  $('me-id').textContent = state.me.id;
  renderList();
  renderConv();
  const total = [...state.convs.values()].reduce((n, c) => n + c.unread, 0);
  document.title = (total ? '(' + total + ') ' : '') + 'chatd';
}

function openConv(key) {
  if (typingOut.key && typingOut.key !== key) typingStop();
  state.current = key;
  const c = state.convs.get(key);
  if (c) {
    c.unread = 0;
    markRead(c); // the read mark: other tabs and devices clear it too
  }
  saveConvs();
  render();
  const ol = $('messages');
  ol.scrollTop = ol.scrollHeight;
  $('message-input').focus();
  if (c && c.messages.length < 20) loadOlder(c);
}

// ---- forms ------------------------------------------------------------------

function busy(form, on) {
  for (const b of form.querySelectorAll('button')) b.disabled = on;
}

async function withForm(form, errId, fn) {
  busy(form, true);
  showError(errId, '');
  try {
    await fn();
  } catch (err) {
    showError(errId, err instanceof ChatError ? err.text : String(err.message || err));
  } finally {
    busy(form, false);
  }
}

function positiveInt(s) {
  const n = Number(String(s).trim());
  if (!Number.isSafeInteger(n) || n < 1) throw new Error('enter a number (an id)');
  return n;
}

function ensureConnected() {
  if (!transport.connected) throw new Error('not connected to the server yet: try again in a moment');
}

async function addFriend(id) {
  const ack = await proto.addFriend(id);
  if (ack.mutual === false) showStatus('Request sent: #' + id + ' must add you too.');
  else showStatus('Friend added.');
  await refreshLists();
}

// Forget the user in this tab and go back to a fresh, logged-out connection.
function logoutHere(msg) {
  state.me = null;
  state.loggedIn = false;
  proto.uid = 0;
  state.current = null;
  state.convs.clear();
  if (transport.stopped) transport.start(); // a parked tab connects again
  else transport.reconnect();
  showLogin(msg);
}

function bindForms() {
  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const f = e.currentTarget;
    withForm(f, 'login-error', async () => {
      ensureConnected();
      const ack = await proto.login(positiveInt($('login-id').value), $('login-password').value);
      $('login-password').value = '';
      afterLogin(ack);
    });
  });
  $('register-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const f = e.currentTarget;
    withForm(f, 'register-error', async () => {
      ensureConnected();
      const name = $('register-name').value;
      const pw = $('register-password').value;
      const reg = await proto.register(name, pw);
      showStatus('Registered: your user id is ' + reg.id + '. Keep it to log in.');
      const ack = await proto.login(reg.id, pw);
      $('register-password').value = '';
      afterLogin(ack);
    });
  });
  $('logout').addEventListener('click', async () => {
    try { await proto.logout(); } catch (e) { /* logged out locally all the same */ }
    logoutHere();
    saveSession(); // the other tabs of this origin follow (their 'storage' event)
  });
  $('add-friend-form').addEventListener('submit', (e) => {
    e.preventDefault();
    withForm(e.currentTarget, 'tools-error', async () => {
      await addFriend(positiveInt($('friend-id').value));
      $('friend-id').value = '';
    });
  });
  $('create-group-form').addEventListener('submit', (e) => {
    e.preventDefault();
    withForm(e.currentTarget, 'tools-error', async () => {
      const ack = await proto.createGroup($('group-name').value, $('group-desc').value);
      $('group-name').value = '';
      $('group-desc').value = '';
      await refreshLists();
      openConv(convKey('g', ack.groupid));
    });
  });
  $('join-group-form').addEventListener('submit', (e) => {
    e.preventDefault();
    withForm(e.currentTarget, 'tools-error', async () => {
      const ack = await proto.joinGroup(positiveInt($('join-group-id').value));
      $('join-group-id').value = '';
      await refreshLists();
      openConv(convKey('g', ack.groupid));
    });
  });
  $('add-member-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const c = state.convs.get(state.current);
    withForm(e.currentTarget, 'send-error', async () => {
      await proto.joinGroup(c.id, positiveInt($('member-id').value));
      $('member-id').value = '';
      await refreshLists();
    });
  });
  $('members-toggle').addEventListener('click', () => {
    const m = $('members');
    m.hidden = !m.hidden;
    $('members-toggle').setAttribute('aria-expanded', String(!m.hidden));
  });
  $('back').addEventListener('click', () => {
    state.current = null;
    saveConvs();
    render();
    const first = document.querySelector('.conv-item');
    if (first) first.focus();
  });
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $('message-input');
    const text = input.value;
    if (!text.trim()) return;
    input.value = '';
    send(text);
  });
  $('message-input').addEventListener('input', typingInput);
  $('message-input').addEventListener('blur', typingStop);
  $('message-input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) { // Shift+Enter: a new line
      e.preventDefault();
      $('composer').requestSubmit();
    }
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && state.current && window.matchMedia('(max-width: 700px)').matches) $('back').click();
  });
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && state.current) {
      const c = state.convs.get(state.current);
      if (c) markRead(c);
      if (c && c.unread) { c.unread = 0; saveConvs(); render(); }
    }
  });
  $('messages').addEventListener('scroll', () => {
    const c = state.convs.get(state.current);
    if (c && $('messages').scrollTop < 30) loadOlder(c);
  });
}

// The lists now and then: every 30 s while the server sends no PRESENCE
// (19), every 2 min once it does (friend requests, groups others changed).
let polls = 0;
setInterval(() => {
  polls++;
  if (state.loggedIn && (!state.presenceLive || polls % 4 === 0)) refreshLists();
}, 30000);

function start() {
  bindForms();
  const s = loadSession();
  if (s && s.id && s.token) {
    state.me = s;
    proto.uid = s.id;
    loadConvs();
    showChat(); // what we had, at once; the resume fills in the rest
  } else {
    showLogin();
  }
  transport.start();
  // Leaving the page ends the session at once (the server logs the user
  // out on close), so the next page load or tab resumes without "online
  // elsewhere"; a page restored from the back/forward cache connects again.
  window.addEventListener('pagehide', () => transport.stop());
  // another tab of this origin logged out (the tokens are revoked): so do we
  window.addEventListener('storage', (e) => {
    if (e.key === SESSION_KEY && e.newValue === null && state.me) logoutHere('Logged out in another tab.');
  });
  window.addEventListener('pageshow', (e) => { if (e.persisted) transport.start(); });
}

start();
