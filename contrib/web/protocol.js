// protocol.js - chatd protocol 2 over a Transport (docs/protocol.md).
//
// Every request carries "proto":2 and a "seq"; the one reply that echoes
// the seq resolves (errno 0) or rejects (a ChatError) the request's
// promise.  Messages that are not replies (msgid 6 and 10 from other
// users and from this user's other devices, 12 NOTICE, 17 READ marks,
// 18 TYPING, 19 PRESENCE) are emitted as events.  A request still unanswered
// when the connection drops is rejected with errno -1 ("disconnected"):
// the server may or may not have executed it (issue 8's client message
// ids will make a resend safe).  docs/web.md maps the client to the
// protocol.

export const MSG = Object.freeze({
  LOGIN: 1, LOGIN_ACK: 2, LOGOUT: 3, REG: 4, REG_ACK: 5, ONE_CHAT: 6,
  ADD_FRIEND: 7, CREATE_GROUP: 8, ADD_GROUP: 9, GROUP_CHAT: 10, ACK: 11,
  NOTICE: 12, FRIEND_LIST: 13, GROUP_LIST: 14,
  // durable messaging (issue 8, docs/protocol.md "Durable messages")
  SYNC: 15, HISTORY: 16, READ: 17,
  // live events (docs/protocol.md): a user typing in a conversation, and
  // a friend's first device online / last device offline
  TYPING: 18, PRESENCE: 19,
});

const ERRORS = {
  1: 'wrong id or password',
  2: 'this account is logged in elsewhere',
  104: 'the request was refused',
  105: 'too long',
  106: 'not logged in',
  108: 'no such user or group',
  109: 'you are not a member of this group',
  110: 'already done',
  111: 'a limit is reached',
  112: 'server error, try again',
  121: 'not a participant of the conversation',
  113: 'the server is busy, try again',
  125: 'rate limited',
  126: 'quota exceeded',
  127: 'too many devices are logged in to this account',
  128: 'the stored-message quota is reached',
  129: 'the stored-message quota is reached',
};

export class ChatError extends Error {
  constructor(reply) {
    const n = reply.errno;
    super(reply.errmsg && reply.errmsg !== 'ok' ? reply.errmsg : (ERRORS[n] || 'error ' + n));
    this.errno = n;
    this.retryAfterMs = reply.retry_after_ms || 0;
    this.reply = reply;
  }

  // A sentence for the UI: our words for the errno, the server's detail.
  get text() {
    if (this.errno === 125)
      return 'Rate limited: try again in ' + Math.max(1, Math.ceil(this.retryAfterMs / 1000)) + ' s';
    if (this.errno === 113) return 'Busy: ' + this.message;
    if (this.errno === 109) return 'Not a member of this group';
    if (this.errno === 105) return 'Too long: ' + this.message;
    if (this.errno === -1) return 'Not connected: try again';
    return this.message;
  }
}

export class Protocol extends EventTarget {
  constructor(transport, { timeoutMs = 15000 } = {}) {
    super();
    this.t = transport;
    this.seq = 0;
    this.uid = 0; // the logged-in user: sent as "id" after login
    this.pending = new Map(); // seq -> {resolve, reject, timer}
    this.timeoutMs = timeoutMs;
    transport.addEventListener('message', (e) => this.onMessage(e.detail));
    transport.addEventListener('close', () => this.failAll());
  }

  request(msgid, fields = {}) {
    const seq = ++this.seq;
    const obj = Object.assign({ msgid, proto: 2, seq }, fields);
    if (this.uid && msgid !== MSG.LOGIN && msgid !== MSG.REG) obj.id = this.uid;
    return new Promise((resolve, reject) => {
      if (!this.t.send(obj)) {
        reject(new ChatError({ errno: -1, errmsg: 'not connected' }));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        reject(new ChatError({ errno: -2, errmsg: 'no answer from the server' }));
      }, this.timeoutMs);
      this.pending.set(seq, { resolve, reject, timer });
    });
  }

  onMessage(m) {
    if (typeof m.seq === 'number' && this.pending.has(m.seq) &&
        (m.msgid === MSG.ACK || m.msgid === MSG.LOGIN_ACK || m.msgid === MSG.REG_ACK)) {
      const p = this.pending.get(m.seq);
      this.pending.delete(m.seq);
      clearTimeout(p.timer);
      if (m.errno === 0) p.resolve(m);
      else p.reject(new ChatError(m));
      return;
    }
    switch (m.msgid) {
      case MSG.ONE_CHAT:
      case MSG.GROUP_CHAT:
        this.emit('chat', m);
        break;
      case MSG.NOTICE:
        this.emit('notice', m);
        break;
      case MSG.READ: // delivered/read marks: a peer's, a group's, our other devices'
        this.emit('receipt', m);
        break;
      case MSG.TYPING:
        this.emit('typing', m);
        break;
      case MSG.PRESENCE:
        this.emit('presence', m);
        break;
      default:
        if (m.msgid === MSG.ACK && m.errno) this.emit('protoerror', m);
    }
  }

  failAll() {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new ChatError({ errno: -1, errmsg: 'disconnected' }));
    }
    this.pending.clear();
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ---- requests (docs/protocol.md, one section each) ----
  register(name, password) { return this.request(MSG.REG, { name, password }); }
  login(id, password) { return this.request(MSG.LOGIN, { id, password }); }
  resume(id, token) { return this.request(MSG.LOGIN, { id, token }); }
  logout() { return this.request(MSG.LOGOUT, {}); }
  // cid: the client's message id; the same cid again never stores twice
  sendTo(toid, msg, time, cid) { return this.request(MSG.ONE_CHAT, { toid, msg, time, cid }); }
  sendGroup(groupid, msg, time, cid) { return this.request(MSG.GROUP_CHAT, { groupid, msg, time, cid }); }
  addFriend(friendid) { return this.request(MSG.ADD_FRIEND, { friendid }); }
  createGroup(groupname, groupdesc) { return this.request(MSG.CREATE_GROUP, { groupname, groupdesc }); }
  // userid: add that user (a member's invite); without: join yourself
  joinGroup(groupid, userid) {
    return this.request(MSG.ADD_GROUP, userid ? { groupid, userid } : { groupid });
  }
  friendList() { return this.request(MSG.FRIEND_LIST, {}); }
  groupList() { return this.request(MSG.GROUP_LIST, {}); }

  // positions: [{conv, cseq}], the last cseq held of each conversation
  sync(positions, limit) {
    const f = { convs: positions };
    if (limit) f.limit = limit;
    return this.request(MSG.SYNC, f);
  }
  history(conv, before, limit = 50) {
    const f = { conv, limit };
    if (before) f.before = before;
    return this.request(MSG.HISTORY, f);
  }
  // marks: {delivered: N} and/or {read: N}
  markRead(conv, marks) { return this.request(MSG.READ, Object.assign({ conv }, marks)); }

  // target: {toid} or {groupid}; typing false: "stopped typing".  Never
  // stored and dropped by the server when nobody is there to see it.
  typing(target, typing = true) {
    return this.request(MSG.TYPING, typing ? target : Object.assign({ typing: false }, target));
  }
}

// A client message id: 128 random bits in hex (crypto.randomUUID needs a
// secure context; getRandomValues does not).
export function newCid() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
