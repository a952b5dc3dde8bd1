/* echoserver page: connect, send, log. Plain JS, no dependencies, no build step. */
(function () {
  "use strict";

  var MAX_ENTRIES = 500;          // log entries kept (data and DOM)
  var BACKOFF_BASE_MS = 500;      // first retry after 250..500 ms
  var BACKOFF_CAP_MS = 15000;     // never wait longer than 7.5..15 s
  var MEMBERS_POLL_MS = 2000;
  var HEALTH_TIMEOUT_MS = 3000;
  var HEALTH_POLL_MS = 5000;      // /healthz while the page is visible, and right after a close
  var TEXT_PREVIEW_CHARS = 4000;
  var HEX_PREVIEW_BYTES = 256;
  var MAX_PENDING_KEYS = 1000;
  // Learned from the server (GET /api/protocol), their one source: the channel-name rule
  // and the names of close codes. Until then any non-empty channel name is let through (the
  // server refuses a bad one) and close codes show as numbers.
  var CHANNEL_RE = null;
  var CLOSE_NAMES = {};

  function channelOk(name) { return CHANNEL_RE ? CHANNEL_RE.test(name) : name.length > 0; }

  function learnProtocol() {
    return fetch("/api/protocol", { cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (p) {
        if (!p) return;
        if (p.channel_pattern) CHANNEL_RE = new RegExp("^(?:" + p.channel_pattern + ")$");
        CLOSE_NAMES = p.close_codes || {};
      })
      .catch(function () { /* an older server: keep the defaults */ });
  }

  function $(id) { return document.getElementById(id); }
  var el = {};
  [
    "status", "status-text", "retry", "mode", "channel", "channel-field", "channel-help", "members",
    "members-field", "connect", "disconnect", "reconnect", "token", "token-need", "url", "hint",
    "server-about", "health", "server-stats",
    "composer", "msgtype-field", "msgtype", "encoding-field", "encoding", "envelope-field", "envelope",
    "message", "message-help", "file-field", "file", "send", "compose-error", "log", "log-count",
    "filter", "clear", "autoscroll", "offsets-note", "cli-card", "cli-channel", "curl-publish",
    "curl-subscribe", "copy-publish", "copy-subscribe", "copy-status",
    "jwt-claims", "jwt-sub", "jwt-exp-wrap", "jwt-exp", "jwt-left", "jwt-noexp", "refresh-token",
    "token-warning", "token-warning-text", "token-warning-left", "token-warning-hint",
    "send-channel-field", "send-channel", "channels-card", "follow-form", "follow-channel",
    "follow-error", "channels"
  ].forEach(function (id) { el[id.replace(/-(\w)/g, function (_, c) { return c.toUpperCase(); })] = $(id); });

  var state = {
    mode: null,            // "echo" | "broadcast" | "mixed" | null (unknown)
    ws: null,
    opened: false,         // the current socket reached OPEN
    wanted: false,         // the user wants to be connected (false after Disconnect)
    attempt: 0,            // reconnect attempts since the last successful open
    retryTimer: null,
    retryAt: 0,
    countdownTimer: null,
    closedText: "Closed",
    connectSeq: 0,
    healthOk: null,        // did the last GET /healthz answer?
    healthTimer: null,
    healthInflight: null,  // the GET /healthz under way, shared by every caller
    authRequired: null,    // does the server require a token? null = not known yet
    authKind: null,        // what /healthz says it wants: "none" | "token" | "jwt" | null
    // JWTs (display only, see decodeJwt): the field's token, the expiry the open connection
    // is held to (from the token it connected with, then from each "refreshed"), and the
    // claims of a refresh sent and not yet answered.
    fieldJwt: null,
    connToken: null,       // {sub, exp (ms or null), start (ms: when its lifetime began)}
    refreshPending: null,
    jwtTimer: null,
    warnPhase: "",         // what the warning's live region last said: "", "soon", "past"
    // The channels this connection follows (mixed mode), the URL's first: name -> record
    // (see newFollow), each with its resume point (epoch, offset) taken from the envelopes.
    // A reconnect resumes the URL's channel with ?since=&epoch= and every other one with a
    // subscribe carrying its since and epoch; another URL channel (or a page load) starts fresh.
    follows: new Map(),
    recovery: null,        // the URL channel's ?since= replay under way: {channel, since, recovered, first, count, from, to, syncId}
    syncSeq: 0,
    syncPending: null,     // the sync echo sent right after a resuming handshake
    composeErrorKind: "",  // "not-connected" is cleared once a connection opens
    wsPath: "/ws",         // the WebSocket endpoint; channels are <wsPath>/<channel>
    channel: "default",    // the channel of the current/last connection
    membersTimer: null,
    membersInflight: false,
    membersLocked: false,  // the server keeps member counts behind its API key (401)
    total: 0               // entries ever logged
  };

  /* ---------- small helpers ---------- */

  function utf8Length(s) {
    var n = 0;
    for (var i = 0; i < s.length; i++) {
      var c = s.charCodeAt(i);
      if (c < 0x80) n += 1;
      else if (c < 0x800) n += 2;
      else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length &&
               (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) { n += 4; i++; }
      else n += 3;
    }
    return n;
  }

  var HEX = [];
  for (var h = 0; h < 256; h++) HEX.push((h < 16 ? "0" : "") + h.toString(16));

  function hexOf(bytes, start, end, sep) {
    var out = [];
    for (var i = start; i < end; i++) out.push(HEX[bytes[i]]);
    return out.join(sep);
  }

  function parseHex(s) {
    var t = s.replace(/0x/gi, "").replace(/[\s:,_\-]/g, "");
    if (!/^[0-9a-fA-F]*$/.test(t)) {
      throw new Error("Hex input may only contain 0-9 and a-f (spaces, colons and 0x are ignored).");
    }
    if (t.length % 2) throw new Error("Hex input needs an even number of digits.");
    var bytes = new Uint8Array(t.length / 2);
    for (var i = 0; i < bytes.length; i++) bytes[i] = parseInt(t.substr(i * 2, 2), 16);
    return bytes;
  }

  function parseBase64(s) {
    var t = s.replace(/\s+/g, "").replace(/-/g, "+").replace(/_/g, "/");
    while (t.length % 4) t += "=";
    var bin;
    try { bin = atob(t); } catch (e) { throw new Error("That is not valid base64."); }
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  function binaryKey(bytes) {
    var n = bytes.length;
    return "b:" + n + ":" + hexOf(bytes, 0, Math.min(n, 32), "") + ":" +
      hexOf(bytes, Math.max(0, n - 32), n, "");
  }

  function pad(n, w) { n = String(n); while (n.length < w) n = "0" + n; return n; }
  function clock(d) {
    return pad(d.getHours(), 2) + ":" + pad(d.getMinutes(), 2) + ":" + pad(d.getSeconds(), 2) +
      "." + pad(d.getMilliseconds(), 3);
  }
  function fmtBytes(n) { return n.toLocaleString("en-US") + " B"; }
  function fmtMs(ms) { return ms.toFixed(ms < 10 ? 2 : ms < 100 ? 1 : 0) + " ms"; }
  function fmtUptime(sec) {
    sec = Math.floor(sec);
    var d = Math.floor(sec / 86400), hh = Math.floor(sec % 86400 / 3600),
        mm = Math.floor(sec % 3600 / 60), ss = sec % 60;
    if (d) return d + "d " + hh + "h";
    if (hh) return hh + "h " + mm + "m";
    if (mm) return mm + "m " + ss + "s";
    return ss + "s";
  }
  function closeLabel(code, reason) {
    var s = String(code);
    var name = CLOSE_NAMES[code];
    if (name) s += " " + name;
    if (reason && (!name || reason.toLowerCase() !== String(name).toLowerCase())) s += " — " + reason;
    return s;
  }

  function isChannelMode() { return state.mode === "broadcast" || state.mode === "mixed"; }
  function isOpen() { return !!(state.ws && state.ws.readyState === WebSocket.OPEN); }

  /* ---------- status & controls ---------- */

  function setStatus(kind, text) {
    el.retry.textContent = "";
    el.status.setAttribute("data-state", kind);
    el.statusText.textContent = text;
    document.title = (kind === "open" ? "● " : kind === "connecting" ? "○ " : "× ") + "echoserver";
    updateControls();
  }

  function moveFocusOff(btn, to) {
    if (document.activeElement === btn && !to.disabled) to.focus();
  }

  function updateControls() {
    var ws = state.ws;
    var active = !!ws && (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN);
    var connecting = el.status.getAttribute("data-state") === "connecting";
    el.connect.disabled = active || connecting;
    el.disconnect.disabled = !(active || connecting || state.retryTimer);
    el.send.disabled = !isOpen();
    renderJwt();
    moveFocusOff(el.connect, el.disconnect);
    moveFocusOff(el.disconnect, el.connect);
  }

  function setMode(mode) {
    var known = mode === "echo" || mode === "broadcast" || mode === "mixed";
    state.mode = known ? mode : (mode ? mode : null);
    el.mode.textContent = mode || "unknown";
    var channels = isChannelMode();
    el.channelField.hidden = !channels;
    el.membersField.hidden = !channels || state.membersLocked;
    var mixed = state.mode === "mixed";
    el.envelopeField.hidden = !mixed;
    el.sendChannelField.hidden = !mixed;
    el.channelsCard.hidden = !mixed;
    // Mixed mode refuses every binary frame: offer text only there.
    if (mixed && el.msgtype.value !== "text") el.msgtype.value = "text";
    if (mixed && el.file.value) el.file.value = "";
    el.msgtype.querySelector('option[value="binary"]').disabled = mixed;
    el.msgtypeField.hidden = mixed;
    el.encodingField.hidden = mixed;
    el.fileField.hidden = mixed;
    el.offsetsNote.hidden = state.mode !== "broadcast";
    el.cliCard.hidden = !channels;
    el.refreshToken.hidden = !mixed;
    renderJwt();
    renderCli();
    updateComposerHints();
  }

  function showHint(text) { el.hint.textContent = text; el.hint.hidden = !text; }

  /* ---------- health ---------- */

  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

  function showHealth(status, text) {
    // Only the health part is a live region: it changes when the server's state does,
    // not with every connection count or uptime tick.
    if (el.health.getAttribute("data-status") !== status) el.health.setAttribute("data-status", status);
    setText(el.health, text);
  }

  function refreshHealth() {
    if (state.healthInflight) return state.healthInflight;
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = setTimeout(function () { if (ctl) ctl.abort(); }, HEALTH_TIMEOUT_MS);
    var p = fetch("/healthz", { cache: "no-store", signal: ctl ? ctl.signal : undefined })
      .then(function (r) { return r.json(); })  // 503 (degraded, draining) has a JSON body too
      .then(function (j) {
        if (!j || typeof j !== "object") throw new Error("not JSON");
        if (typeof j.mode === "string" && j.mode !== state.mode) setMode(j.mode);
        // A server with a non-default WebSocket path may announce it here.
        if (typeof j.path === "string" && /^\/[^?#\s]*$/.test(j.path)) state.wsPath = j.path.replace(/\/+$/, "") || "/ws";
        if (typeof j.auth === "boolean") setAuthRequired(j.auth);
        else if (j.auth === "none" || j.auth === "token" || j.auth === "jwt") setAuthKind(j.auth, j.anonymous === true);
        if (typeof j.protect_reads === "boolean") setMembersLocked(j.protect_reads);
        setText(el.serverAbout, j.version ? "echoserver " + j.version + " · " : "");
        var status = typeof j.status === "string" ? j.status : "unknown";
        showHealth(status, "health: " + status + (j.reason ? " — " + j.reason : ""));
        var bits = [""];
        if (typeof j.connections === "number") bits.push(j.connections + " connection" + (j.connections === 1 ? "" : "s"));
        if (typeof j.uptime === "number") bits.push("up " + fmtUptime(j.uptime));
        setText(el.serverStats, bits.length > 1 ? bits.join(" · ") : "");
        state.healthOk = true;
      })
      .catch(function () {
        state.healthOk = false;
        setText(el.serverAbout, "");
        setText(el.serverStats, "");
        showHealth("unreachable", "GET /healthz failed: the server is not reachable");
        if (state.mode === null) setMode(null);
      })
      .then(function () { clearTimeout(timer); state.healthInflight = null; });
    state.healthInflight = p;
    return p;
  }

  function pollHealth() {
    if (!document.hidden) refreshHealth();
  }

  function startHealthPolling() {
    if (state.healthTimer) clearInterval(state.healthTimer);
    state.healthTimer = setInterval(pollHealth, HEALTH_POLL_MS);
  }

  /* ---------- token ---------- */

  function setAuthRequired(required) {
    state.authRequired = required;
    var jwt = state.authKind === "jwt";
    setText(el.tokenNeed, required ? (jwt ? "(a JWT, required)" : "(required)")
      : jwt ? "(a JWT, or none to join as a guest)" : "(not required)");
    renderCli();
  }

  // /healthz says which token the server wants: "none", "token" (one shared secret) or
  // "jwt" (per user; with `anonymous`, a client without one joins as a guest).
  function setAuthKind(kind, anonymous) {
    state.authKind = kind;
    setAuthRequired(kind === "token" || (kind === "jwt" && !anonymous));
  }

  /* ---------- JWTs: who the token names and when it expires ---------- */

  // Display only: the page decodes a JWT's payload to show its user and expiry, and never
  // verifies the signature (it has no key, and needs none): the server checks every token
  // and alone decides. Claims are untrusted input, so they reach the page as textContent.
  var JWT_RE = /^[\w-]+\.[\w-]+\.[\w-]*$/;  // base64url parts (\w is ASCII in JS)
  var MAX_JWT_CHARS = 16384;
  var MAX_SUB_CHARS = 200;
  var WARN_BEFORE_MS = 60000;     // warn this long before the expiry ...
  var WARN_FRACTION = 0.2;        // ... or for this part of the lifetime, if shorter
  var JWT_TICK_MS = 250;

  function jsonPart(part) {
    var t = part.replace(/-/g, "+").replace(/_/g, "/");
    while (t.length % 4) t += "=";
    var bin = atob(t);
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var v = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    if (!v || typeof v !== "object" || Array.isArray(v)) throw new Error("not a JSON object");
    return v;
  }

  function seconds(v) { return typeof v === "number" && isFinite(v) ? v * 1000 : null; }

  // {sub, exp, iat} (times in ms, null when absent) of a JWT-shaped token, else null: three
  // base64url parts whose first two are JSON objects. Anything else is left to the server.
  function decodeJwt(token) {
    if (!token || token.length > MAX_JWT_CHARS || !JWT_RE.test(token)) return null;
    var parts = token.split(".");
    var claims;
    try {
      jsonPart(parts[0]);
      claims = jsonPart(parts[1]);
    } catch (e) {
      return null;
    }
    return {
      sub: typeof claims.sub === "string" ? claims.sub : null,
      exp: seconds(claims.exp),
      iat: seconds(claims.iat)
    };
  }

  function fmtWhen(ms) {
    var d = new Date(ms), now = new Date();
    var t = pad(d.getHours(), 2) + ":" + pad(d.getMinutes(), 2) + ":" + pad(d.getSeconds(), 2);
    if (d.toDateString() === now.toDateString()) return t;
    return d.getFullYear() + "-" + pad(d.getMonth() + 1, 2) + "-" + pad(d.getDate(), 2) + " " + t;
  }

  function fmtSpan(ms) {
    var sec = Math.max(0, Math.ceil(ms / 1000));
    var d = Math.floor(sec / 86400), hh = Math.floor(sec % 86400 / 3600),
        mm = Math.floor(sec % 3600 / 60), ss = sec % 60;
    if (d) return d + " d " + hh + " h";
    if (hh) return hh + " h " + pad(mm, 2) + " min";
    if (mm) return mm + " min " + pad(ss, 2) + " s";
    return ss + " s";
  }

  // "in 42 s" or "expired 3 s ago", against this computer's clock (the server uses its own).
  function fmtLeft(exp) {
    var left = exp - Date.now();
    return left > 0 ? "in " + fmtSpan(left) : "expired " + fmtSpan(-left) + " ago";
  }

  function onTokenInput() {
    state.fieldJwt = decodeJwt(el.token.value);
    renderJwt();
  }

  function renderJwt() {
    var now = Date.now();
    var jwt = state.fieldJwt;
    el.jwtClaims.hidden = !jwt;
    if (jwt) {
      var sub = jwt.sub === null ? "(none)" : jwt.sub.length > MAX_SUB_CHARS ? jwt.sub.slice(0, MAX_SUB_CHARS) + "…" : jwt.sub;
      setText(el.jwtSub, sub);
      el.jwtExpWrap.hidden = jwt.exp === null;
      el.jwtNoexp.hidden = jwt.exp !== null;
      if (jwt.exp !== null) {
        var iso = new Date(jwt.exp).toISOString();
        if (el.jwtExp.dateTime !== iso) el.jwtExp.dateTime = iso;
        setText(el.jwtExp, fmtWhen(jwt.exp));
        setText(el.jwtLeft, "(" + fmtLeft(jwt.exp) + ")");
        el.jwtClaims.setAttribute("data-expired", String(jwt.exp <= now));
      } else {
        el.jwtClaims.removeAttribute("data-expired");
      }
    }
    var mixed = state.mode === "mixed";
    el.refreshToken.disabled = !(mixed && isOpen() && jwt);
    renderWarning(now);
    // Tick while there is a countdown on show.
    var ticking = (jwt && jwt.exp !== null) || (state.connToken && state.connToken.exp !== null);
    if (ticking && !state.jwtTimer) state.jwtTimer = setInterval(renderJwt, JWT_TICK_MS);
    else if (!ticking && state.jwtTimer) { clearInterval(state.jwtTimer); state.jwtTimer = null; }
  }

  // The open connection's token runs out soon: say so (the live region speaks once per
  // phase; the countdown beside it is not live, so screen readers are not flooded).
  function renderWarning(now) {
    var tok = isOpen() ? state.connToken : null;
    var phase = "";
    if (tok && tok.exp !== null) {
      var left = tok.exp - now;
      var ahead = Math.min(WARN_BEFORE_MS, Math.max(0, tok.exp - tok.start) * WARN_FRACTION);
      if (left <= 0) phase = "past";
      else if (left <= ahead) phase = "soon";
    }
    el.tokenWarning.hidden = !phase;
    if (phase !== state.warnPhase) {
      state.warnPhase = phase;
      var mixed = state.mode === "mixed";
      setText(el.tokenWarningText, !phase ? "" : phase === "soon"
        ? "The connection's token expires soon, at " + fmtWhen(tok.exp) + "."
        : "The connection's token expired at " + fmtWhen(tok.exp) + ": the server closes the connection any moment.");
      setText(el.tokenWarningHint, !phase ? "" : mixed
        ? "Paste a new token above and press Refresh token to keep this connection."
        : "The server then closes the connection: paste a new token above and press Connect.");
    }
    setText(el.tokenWarningLeft, phase === "soon" ? fmtLeft(tok.exp) : "");
  }

  function refreshToken() {
    var token = el.token.value;
    var claims = decodeJwt(token);
    if (!isOpen() || state.mode !== "mixed" || !claims) return;
    var wire = JSON.stringify({ type: "refresh", token: token });
    state.ws.send(wire);
    state.refreshPending = claims;
    // The token itself is a credential: the log names what it says, not what it is.
    addEntry({
      dir: "out", kind: "text", size: utf8Length(wire), tag: "refresh",
      text: "New token for " + (claims.sub === null ? "(no sub)" : claims.sub) +
        (claims.exp === null ? ", without expiry" : ", expiring " + fmtWhen(claims.exp))
    });
  }

  function onRefreshed(msg, size) {
    var exp = seconds(msg.exp);
    var sent = state.refreshPending;
    state.refreshPending = null;
    state.warnPhase = null;   // a new expiry: the warning's words are written afresh
    state.connToken = {
      sub: sent ? sent.sub : state.connToken ? state.connToken.sub : null,
      exp: exp,
      start: sent && sent.iat !== null && sent.iat < Date.now() ? sent.iat : Date.now()
    };
    addEntry({
      dir: "in", kind: "text", size: size, tag: "refreshed",
      text: exp === null
        ? "Token refreshed: the connection no longer expires."
        : "Token refreshed: the connection now lasts until " + fmtWhen(exp) + " (" + fmtLeft(exp) + ")."
    });
    renderJwt();
  }

  /* ---------- connection ---------- */

  function currentChannel() {
    var v = el.channel.value.trim();
    return v === "" ? "default" : v;
  }

  function buildUrl(channel, since, epoch) {
    var path = isChannelMode() ? state.wsPath + "/" + channel : state.wsPath;
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
    var token = el.token.value;
    var query = [], shownQuery = [];
    if (since !== null) {
      query.push("since=" + since);
      shownQuery.push("since=" + since);
      if (epoch !== null) {
        query.push("epoch=" + encodeURIComponent(epoch));
        shownQuery.push("epoch=" + epoch);
      }
    }
    if (token) {
      query.push("token=" + encodeURIComponent(token));
      shownQuery.push("token=•••");
    }
    return {
      url: url + (query.length ? "?" + query.join("&") : ""),
      shown: url + (shownQuery.length ? "?" + shownQuery.join("&") : "")
    };
  }

  function clearRetry() {
    if (state.retryTimer) { clearTimeout(state.retryTimer); state.retryTimer = null; }
    if (state.countdownTimer) { clearInterval(state.countdownTimer); state.countdownTimer = null; }
    el.retry.textContent = "";
  }

  function detachSocket() {
    var ws = state.ws;
    if (!ws) return;
    state.ws = null;
    state.opened = false;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    state.connToken = null;
    state.refreshPending = null;
    state.recovery = null;
    state.syncPending = null;
    followsClosed();
    try { ws.close(1000, "reconnecting"); } catch (e) { /* already closed */ }
    stopMembers();
  }

  function connect() {
    clearRetry();
    state.wanted = true;
    var seq = ++state.connectSeq;
    detachSocket();
    setStatus("connecting", "Connecting…");
    refreshHealth().then(function () {
      if (seq !== state.connectSeq || !state.wanted) return;
      openSocket();
    });
  }

  function openSocket() {
    var channel = currentChannel();
    if (isChannelMode() && !channelOk(channel)) {
      validateChannel();
      state.wanted = false;
      setStatus("closed", "Closed · invalid channel");
      return;
    }
    state.channel = channel;
    // Another channel than the URL's was: it is followed afresh (no since), unless it was
    // one of the channels followed by subscribe, whose resume point it keeps.
    var urlFollow = setUrlChannel(channel);
    var mixed = state.mode === "mixed";
    var since = mixed && urlFollow.offset !== null ? urlFollow.offset : null;
    var epoch = since !== null && urlFollow.epoch !== null ? urlFollow.epoch : null;
    var target = buildUrl(channel, since, epoch);
    var used = decodeJwt(el.token.value);   // the token this connection is held to
    el.url.textContent = target.shown;
    renderCli();
    var ws;
    try {
      ws = new WebSocket(target.url);
    } catch (e) {
      logSys("Cannot open " + target.shown + ": " + e.message);
      state.closedText = "Closed · bad URL";
      setStatus("closed", state.closedText);
      return;
    }
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    state.opened = false;
    updateControls();

    ws.onopen = function () {
      if (state.ws !== ws) return;
      state.opened = true;
      state.attempt = 0;
      state.connToken = used && {
        sub: used.sub, exp: used.exp, start: used.iat !== null && used.iat < Date.now() ? used.iat : Date.now()
      };
      state.refreshPending = null;
      state.recovery = null;
      state.syncPending = null;
      showHint("");
      el.token.removeAttribute("aria-invalid");
      if (!el.token.value && state.authRequired === null) setAuthRequired(false);
      if (state.composeErrorKind === "not-connected") showComposeError("");
      setStatus("open", "Open");
      logSys("Connected to " + target.shown + (state.mode ? " (" + state.mode + " mode)" : ""));
      if (mixed) followAll(urlFollow, since, epoch);
      startMembers();
      refreshHealth();  // the server info line now counts this connection too
    };
    ws.onmessage = function (ev) {
      if (state.ws !== ws) return;
      onMessage(ev.data);
    };
    ws.onclose = function (ev) {
      if (state.ws !== ws) return;
      var wasOpen = state.opened;
      var seq = state.connectSeq;
      state.ws = null;
      state.opened = false;
      state.recovery = null;
      state.syncPending = null;
      followsClosed();
      state.connToken = null;
      state.refreshPending = null;
      pending.clear();
      stopMembers();
      var label = closeLabel(ev.code, ev.reason);
      state.closedText = "Closed · " + label;
      if (!wasOpen) logSys("Could not connect: " + label);
      else if (isErrorClose(ev.code)) logError("The server closed the connection: " + label);
      else logSys("Connection closed: " + label);
      if (ev.code === 4001 || ev.code === 4003) {
        // The server ended this session on purpose: reconnecting (with the same, expired
        // token, or as a user just disconnected) would only be refused or undo it. Wait.
        state.wanted = false;
        if (ev.code === 4001) {
          state.closedText = "Closed · token expired";
          el.token.setAttribute("aria-invalid", "true");
          showHint("The token expired (4001). Paste a new token above and press Connect.");
        } else {
          state.closedText = "Closed · disconnected by the server";
          showHint("The server disconnected this user (4003). Press Connect to connect again.");
        }
        setStatus("closed", state.closedText);
        refreshHealth();
        return;
      }
      setStatus("closed", state.closedText);
      // What the server says now (degraded, draining, gone), and, for a refused handshake,
      // why it was refused, before deciding whether to retry.
      var checks = [refreshHealth()];
      if (!wasOpen) checks.push(probeHandshake(target.url));
      Promise.all(checks).then(function (results) {
        // The user moved on meanwhile (Connect, Disconnect, another channel).
        if (seq !== state.connectSeq || state.ws || !state.wanted) return;
        var refusal = wasOpen ? 0 : results[1];
        if (!wasOpen) explainRefusal(refusal);
        if (refusal === 401 || refusal === 403) {
          // A missing or wrong token, a channel the token does not open, an origin the
          // server does not allow: none will fix itself. Wait for the user.
          state.wanted = false;
          state.closedText = "Closed · " + (refusal === 403 ? "not allowed"
            : el.token.value ? "token refused" : "token required");
          setStatus("closed", state.closedText);
          return;
        }
        if (state.wanted && el.reconnect.checked) scheduleReconnect();
      });
    };
  }

  /* A browser does not expose why a WebSocket handshake failed. Ask the endpoint itself:
     a plain GET of the same URL goes through the same checks before the upgrade, so it
     answers 401 (token), 403 (origin, Host, the channel's rights), 503 (full, draining), or
     400 (no upgrade: those checks passed).
     Resolves to the status, or 0 when the server did not answer. */
  function probeHandshake(wsUrl) {
    var httpUrl = wsUrl.replace(/^ws/, "http");
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = setTimeout(function () { if (ctl) ctl.abort(); }, HEALTH_TIMEOUT_MS);
    return fetch(httpUrl, { cache: "no-store", redirect: "manual", signal: ctl ? ctl.signal : undefined })
      .then(function (r) { return r.status; }, function () { return 0; })
      .then(function (status) { clearTimeout(timer); return status; });
  }

  function explainRefusal(status) {
    if (status === 401) {
      setAuthRequired(true);
      el.token.setAttribute("aria-invalid", "true");
      var jwt = state.fieldJwt;
      showHint(jwt && jwt.exp !== null && jwt.exp <= Date.now()
        ? "The server refused the token (401): it expired at " + fmtWhen(jwt.exp) + ". Paste a new token and press Connect."
        : el.token.value
        ? "The server refused the token (401). Enter the right token and press Connect."
        : "This server requires a token (401 without one). Enter it above and press Connect.");
      logError(jwt && jwt.exp !== null && jwt.exp <= Date.now() ? "Handshake refused: the token expired (401)"
        : el.token.value ? "Handshake refused: wrong token (401)" : "Handshake refused: a token is required (401)");
    } else if (state.healthOk === false || status === 0) {
      showHint("The server is not reachable: it may be down or restarting." +
        (el.reconnect.checked && state.wanted ? " The page keeps retrying." : ""));
    } else if (status === 503) {
      showHint("The server refused the connection for now (503: full or shutting down)." +
        (el.reconnect.checked && state.wanted ? " The page keeps retrying." : ""));
    } else if (status === 403) {
      showHint(state.authKind === "jwt"
        ? "The server refused the connection (403): the token does not allow this channel, or the server does not allow this page's origin or host name."
        : "The server refused this page's origin or host name (403): check its allowed origins and allowed hosts.");
    } else {
      showHint("The connection failed before opening. Check the allowed origins and that the server is running.");
    }
  }

  // A close the server made because something went wrong: anything but a normal close,
  // the server going away, or a close without a code or without a close frame.
  function isErrorClose(code) {
    return code !== 1000 && code !== 1001 && code !== 1005 && code !== 1006;
  }

  function scheduleReconnect() {
    clearRetry();
    var exp = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, state.attempt));
    var delay = exp / 2 + Math.random() * exp / 2;     // "equal jitter"
    state.attempt++;
    state.retryAt = Date.now() + delay;
    state.retryTimer = setTimeout(function () {
      state.retryTimer = null;
      connect();
    }, delay);
    // The countdown lives outside the aria-live pill so screen readers are not flooded.
    var tick = function () {
      var left = Math.max(0, state.retryAt - Date.now()) / 1000;
      el.retry.textContent = "retrying in " + left.toFixed(1) + " s";
    };
    tick();
    state.countdownTimer = setInterval(tick, 200);
    updateControls();
  }

  function disconnect() {
    state.wanted = false;
    state.connectSeq++;
    clearRetry();
    var ws = state.ws;
    if (ws && (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)) {
      setStatus("connecting", "Closing…");
      ws.close(1000, "client disconnect");
    } else {
      detachSocket();
      state.closedText = "Closed";
      setStatus("closed", state.closedText);
    }
  }

  /* ---------- channel & members ---------- */

  function validateChannel() {
    var ok = channelOk(currentChannel());
    el.channel.setAttribute("aria-invalid", ok ? "false" : "true");
    el.channelHelp.textContent = ok
      ? "A–Z a–z 0–9 _ . - (1–64); changing it reconnects"
      : "Invalid channel: use 1–64 characters of A–Z a–z 0–9 _ . -";
    return ok;
  }

  function stopMembers() {
    if (state.membersTimer) { clearInterval(state.membersTimer); state.membersTimer = null; }
    el.members.textContent = "—";
  }

  // api.protect_reads: member counts need the API key, which a page cannot hold; the
  // count is hidden rather than polled into 401s.
  function setMembersLocked(locked) {
    if (locked === state.membersLocked) return;
    state.membersLocked = locked;
    el.membersField.hidden = !isChannelMode() || locked;
    if (locked) stopMembers();
    else if (isOpen()) startMembers();
  }

  function startMembers() {
    stopMembers();
    if (!isChannelMode() || state.membersLocked) return;
    pollMembers();
    state.membersTimer = setInterval(pollMembers, MEMBERS_POLL_MS);
  }

  function pollMembers() {
    if (state.membersInflight || !isOpen()) return;
    var channel = state.channel;
    var seq = state.connectSeq;
    state.membersInflight = true;
    fetch("/api/channels/" + encodeURIComponent(channel), { cache: "no-store" })
      .then(function (r) {
        if (r.status === 401) {  // reads became protected since /healthz said otherwise
          setMembersLocked(true);
          return null;
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (j) {
        if (j === null || seq !== state.connectSeq || !isOpen()) return;
        el.members.textContent = typeof j.members === "number" ? String(j.members) : "—";
      })
      .catch(function () {
        if (seq === state.connectSeq) el.members.textContent = "—";
      })
      .then(function () { state.membersInflight = false; });
  }

  /* ---------- round-trip matching ---------- */

  var pending = new Map();   // key -> [sent time (performance.now()), ...], oldest first

  function addPending(key) {
    var q = pending.get(key);
    if (!q) {
      if (pending.size >= MAX_PENDING_KEYS) pending.delete(pending.keys().next().value);
      q = [];
      pending.set(key, q);
    }
    if (q.length < 1000) q.push(performance.now());
  }

  function takePending(key) {
    var q = pending.get(key);
    if (!q) return null;
    var t = q.shift();
    if (!q.length) pending.delete(key);
    return performance.now() - t;
  }

  /* ---------- sending ---------- */

  function showComposeError(msg, kind) {
    el.composeError.textContent = msg;
    el.composeError.hidden = !msg;
    state.composeErrorKind = msg ? kind || "input" : "";
  }

  function send() {
    showComposeError("");
    if (!isOpen()) { showComposeError("Not connected — press Connect first.", "not-connected"); return; }
    var file = state.mode !== "mixed" && el.file.files && el.file.files[0];
    if (file) { sendFile(file); return; }
    var text = el.message.value;
    if (el.msgtype.value === "binary" && state.mode !== "mixed") {
      var bytes;
      try {
        bytes = el.encoding.value === "base64" ? parseBase64(text) : parseHex(text);
      } catch (e) {
        showComposeError(e.message);
        return;
      }
      if (!bytes.length) { showComposeError("Nothing to send: enter some bytes or pick a file."); return; }
      sendBinary(bytes, null);
    } else {
      if (text === "") { showComposeError("Nothing to send: type a message."); return; }
      sendText(text);
    }
    el.message.value = "";
  }

  function sendText(text) {
    var wire = text, key = "t:" + text, tag = null, channel = null;
    if (state.mode === "mixed") {
      tag = el.envelope.value === "broadcast" ? "broadcast" : "echo";
      if (tag === "echo") {
        wire = JSON.stringify({ type: tag, payload: text });
        key = "e:" + text;
      } else {
        // On the chosen followed channel; the URL's goes without "channel", as it always has.
        channel = el.sendChannel.value || state.channel;
        wire = JSON.stringify(channel === state.channel
          ? { type: tag, payload: text }
          : { type: tag, channel: channel, payload: text });
        key = "r:" + channel + "\n" + text;
      }
    }
    state.ws.send(wire);
    addPending(key);
    addEntry({ dir: "out", kind: "text", size: utf8Length(wire), text: text, tag: tag, channel: channel });
  }

  function sendBinary(bytes, name) {
    state.ws.send(bytes);
    addPending(binaryKey(bytes));
    addEntry({ dir: "out", kind: "binary", size: bytes.length, bytes: bytes, tag: name });
  }

  function sendFile(file) {
    var ws = state.ws;
    file.arrayBuffer().then(function (buf) {
      if (state.ws !== ws || !isOpen()) { showComposeError("Disconnected before the file was sent.", "not-connected"); return; }
      sendBinary(new Uint8Array(buf), file.name);
      el.file.value = "";
      updateComposerHints();
    }, function (e) {
      showComposeError("Could not read " + file.name + ": " + e.message);
    });
  }

  var DEFAULT_HELP_HTML = el.messageHelp.innerHTML;      // static markup from index.html
  var DEFAULT_HELP_TEXT = "Enter sends, Shift+Enter adds a new line.";

  function updateComposerHints() {
    var binary = el.msgtype.value === "binary";
    var file = el.file.files && el.file.files[0];
    el.encoding.disabled = !binary;
    if (binary) {
      el.message.placeholder = el.encoding.value === "base64"
        ? "base64 bytes, e.g. 3q2+7w=="
        : "hex bytes, e.g. de ad be ef";
    } else {
      el.message.placeholder = "Type a message…";
    }
    var help = "Enter sends, Shift+Enter adds a new line.";
    if (file && state.mode !== "mixed") help = "File " + file.name + " (" + fmtBytes(file.size) + ") will be sent as binary on Send.";
    if (help === DEFAULT_HELP_TEXT) {
      if (el.messageHelp.innerHTML !== DEFAULT_HELP_HTML) el.messageHelp.innerHTML = DEFAULT_HELP_HTML;
    } else if (el.messageHelp.textContent !== help) {
      el.messageHelp.textContent = help;
    }
  }

  /* ---------- receiving ---------- */

  function onMessage(data) {
    if (typeof data === "string") {
      if (state.mode === "mixed") { receiveMixed(data); return; }
      addEntry({ dir: "in", kind: "text", size: utf8Length(data), text: data, rtt: takePending("t:" + data) });
      return;
    }
    var bytes = new Uint8Array(data);
    addEntry({ dir: "in", kind: "binary", size: bytes.length, bytes: bytes, rtt: takePending(binaryKey(bytes)) });
  }

  function channelOf(msg) { return typeof msg.channel === "string" ? msg.channel : state.channel; }

  // In mixed mode every peer's message reaches us inside a "broadcast" envelope, so the
  // other types can only come from the server itself.
  function receiveMixed(data) {
    var size = utf8Length(data);
    var msg = null;
    try { msg = JSON.parse(data); } catch (e) { msg = null; }
    if (!msg || typeof msg !== "object" || typeof msg.type !== "string") {
      addEntry({ dir: "in", kind: "text", size: size, text: data });
      return;
    }
    var type = msg.type;
    if (type === "error") { onServerError(msg, size); return; }
    if (type === "refreshed") { onRefreshed(msg, size); return; }
    if (type === "history") { onHistory(msg); return; }
    if (type === "recovery") { startRecovery(msg); return; }
    if (type === "subscribed") { onSubscribed(msg); return; }
    if (type === "unsubscribed") { onUnsubscribed(msg); return; }
    if ((type === "join" || type === "leave") && typeof msg.channel === "string" && typeof msg.user === "string") {
      onPresence(msg, size);
      return;
    }
    var p = msg.payload;
    if (type === "echo" && isSync(p)) {
      if (p.echoserverPageSync === state.syncPending) {
        state.syncPending = null;
        if (state.recovery && p.echoserverPageSync === state.recovery.syncId) endRecovery();
      }
      return;
    }
    var ptext = typeof p === "string" ? p : JSON.stringify(p);
    var offset = typeof msg.offset === "number" ? msg.offset : null;
    if (type === "echo") {
      addEntry({ dir: "in", kind: "text", size: size, text: ptext, tag: "echo", rtt: takePending("e:" + ptext) });
      return;
    }
    if (type === "broadcast") { onBroadcast(msg, ptext, offset, size); return; }
    if (type === "broadcastResult") {
      var n = msg.listenCount;
      var rch = channelOf(msg);
      addEntry({
        dir: "in", kind: "text", size: size, text: ptext, tag: "broadcastResult", channel: rch,
        extra: typeof n === "number" ? "delivered to " + n + " listener" + (n === 1 ? "" : "s") : null,
        offset: offset,
        rtt: takePending("r:" + rch + "\n" + ptext)
      });
      return;
    }
    addEntry({ dir: "in", kind: "text", size: size, text: data });
  }

  function onBroadcast(msg, ptext, offset, size) {
    var ch = channelOf(msg);
    var f = state.follows.get(ch);
    var entry = { dir: "in", kind: "text", size: size, text: ptext, tag: "broadcast", offset: offset, channel: ch };
    // Only a channel's own stream moves its resume point: it arrives in offset order.
    if (f && offset !== null) remember(f, offset, msg.epoch);
    if (f && f.replayLeft > 0) {
      // The messages announced by {"type":"history"} or {"type":"subscribed"}.
      f.replayLeft--;
      entry.replayed = true;
      entry.replayKind = f.replay.kind;
      countReplayed(f.replay, offset);
      addEntry(entry);
      if (f.replayLeft === 0) endReplay(f);
      return;
    }
    var rec = state.recovery;
    if (rec && rec.channel === ch) {
      // The URL channel's ?since= replay: it ends at the sync echo (see startRecovery).
      entry.replayed = true;
      entry.replayKind = "recovery";
      countReplayed(rec, offset);
    }
    addEntry(entry);
  }

  function countReplayed(rec, offset) {
    rec.count++;
    if (rec.from === null) rec.from = offset;
    rec.to = offset;
  }

  function onServerError(msg, size) {
    var ch = typeof msg.channel === "string" ? msg.channel : null;
    var text = String(msg.error);
    if (ch !== null) {
      var f = state.follows.get(ch);
      if (f && !f.url && (f.status === "pending" || f.status === "leaving")) {
        // A subscribe refused (too many channels, not allowed, ...), or an unsubscribe of
        // a channel the server no longer counted: either way it is not followed.
        var refused = f.status === "pending";
        state.follows.delete(ch);
        renderChannels();
        if (refused) showFollowError("Could not follow " + ch + ": " + text);
        addEntry({ dir: "error", kind: "text", size: size, text: text, channel: ch, tag: refused ? "subscribe refused" : "server notice" });
        return;
      }
      addEntry({ dir: "error", kind: "text", size: size, text: text, channel: ch, tag: "server notice" });
      return;
    }
    // The server answers a refused refresh with an error, and keeps the old expiry.
    var refresh = state.refreshPending !== null;
    state.refreshPending = null;
    addEntry({ dir: "error", kind: "text", size: size, text: text, tag: refresh ? "refresh refused" : "server notice" });
  }

  function nonNegative(v) { return typeof v === "number" && isFinite(v) && v > 0 ? Math.floor(v) : 0; }

  function onHistory(msg) {
    var f = state.follows.get(channelOf(msg));
    var count = nonNegative(msg.count);
    if (!f || !count) return;
    startReplay(f, "history", count, null);
    logSys("Replaying " + plural(count, "earlier message") + (f.url ? "" : " of " + f.name) + " kept by the server:");
  }

  function startReplay(f, kind, count, rec) {
    f.replayLeft = count;
    f.replay = rec || { kind: kind, count: 0, from: null, to: null };
    f.replay.kind = kind;
  }

  function endReplay(f) {
    var rec = f.replay;
    f.replay = null;
    var on = f.url ? "" : " on " + f.name;
    if (rec.kind === "history") logSys("End of replayed history" + on + "; live messages follow.");
    else logSys(recoverySummary(rec) + on + "; live messages follow.");
  }

  /* ---------- resuming every channel after a reconnect (mixed mode) ---------- */

  // A channel followed on this connection. offset/epoch: the last message seen on it (the
  // resume point); status: "waiting" (no connection), "pending" (subscribe sent),
  // "subscribed", "leaving" (unsubscribe sent). roster: user -> info, from join and leave
  // events only (a page cannot hold the API key that GET .../presence needs).
  function newFollow(name) {
    return {
      name: name, url: false, status: "waiting", offset: null, epoch: null,
      replayLeft: 0, replay: null, sent: null,
      roster: new Map(), presence: false, stale: false, joined: false, gap: ""
    };
  }

  function remember(f, offset, epoch) {
    // Epochs are the server's own (it refuses one it did not make), so any non-empty one is kept.
    if (typeof epoch === "string" && epoch) f.epoch = epoch;
    if (typeof offset === "number" && offset >= 0) f.offset = offset;
    renderChannels();
  }

  // What the server says a channel's numbering is now (a recovery or subscribed answer):
  // a new epoch makes the old offset meaningless; `last` (nothing to replay) is where the
  // channel stands, "" (nothing published yet) is offset 0 of a numbering still to come.
  function adopt(f, epoch, count, last) {
    if (typeof epoch === "string") {
      var now = epoch || null;
      if (now !== f.epoch) { f.epoch = now; f.offset = epoch === "" ? 0 : null; }
    }
    if (!count && typeof last === "number" && last >= 0) f.offset = last;
    renderChannels();
  }

  // The URL's channel is joined by the handshake (with ?since=&epoch= when the page has a
  // position on it); every other followed channel is subscribed now, with its own.
  function followAll(urlFollow, since, epoch) {
    urlFollow.status = "subscribed";
    urlFollow.sent = since === null ? null : { since: since, epoch: epoch };
    markStale(urlFollow);
    if (since !== null) {
      // Sent first: its reply comes after the URL channel's replay (already queued by the
      // handshake), so the broadcasts before it are that replay. See startRecovery.
      var id = ++state.syncSeq;
      state.syncPending = id;
      state.ws.send(JSON.stringify({ type: "echo", payload: { echoserverPageSync: id } }));
    }
    state.follows.forEach(function (f) {
      if (f.url) return;
      if (f.status === "leaving") state.follows.delete(f.name);   // its unsubscribe was not answered
      else subscribe(f);
    });
    renderChannels();
  }

  function markStale(f) {
    if (f.joined && f.roster.size) f.stale = true;
    f.joined = true;
  }

  function subscribe(f) {
    var req = { type: "subscribe", channel: f.name };
    if (f.offset !== null) {
      req.since = f.offset;
      if (f.epoch !== null) req.epoch = f.epoch;
    }
    f.sent = f.offset === null ? null : { since: f.offset, epoch: f.epoch };
    f.status = "pending";
    f.replayLeft = 0;
    f.replay = null;
    var wire = JSON.stringify(req);
    state.ws.send(wire);
    addEntry({
      dir: "out", kind: "text", size: utf8Length(wire), tag: "subscribe", channel: f.name,
      text: "Follow " + f.name + (f.sent ? " after offset " + f.sent.since + (f.sent.epoch ? " of epoch " + f.sent.epoch : "") : "")
    });
  }

  function followsClosed() {
    state.follows.forEach(function (f) {
      if (f.status === "leaving") state.follows.delete(f.name);
      else f.status = "waiting";
      f.replayLeft = 0;
      f.replay = null;
    });
    renderChannels();
  }

  function onSubscribed(msg) {
    var ch = channelOf(msg);
    var f = state.follows.get(ch);
    if (!f) { logSys("Subscribed to " + ch + "."); return; }
    if (f.status === "pending") f.status = "subscribed";
    markStale(f);
    var count = nonNegative(msg.count);
    var first = typeof msg.first === "number" ? msg.first : null;
    var sent = f.sent;
    var recovered = msg.recovered === true;
    if (sent !== null && !recovered) missed(f, sent, first, msg.epoch);
    adopt(f, msg.epoch, count, msg.last);
    if (sent === null) {
      logSys("Following " + ch + (count ? ": replaying " + plural(count, "earlier message") + " kept by the server:" : "."));
    } else if (recovered && !count) {
      logSys("Resumed " + ch + " after offset " + sent.since + ": nothing was published meanwhile.");
    }
    if (count) startReplay(f, sent === null ? "history" : "recovery", count, { recovered: recovered, count: 0, from: null, to: null });
  }

  function onUnsubscribed(msg) {
    var ch = channelOf(msg);
    var f = state.follows.get(ch);
    if (f && !f.url) state.follows.delete(ch);
    renderChannels();
    logSys("Stopped following " + ch + ".");
  }

  // The server answers a ?since= join with {"type":"recovery",...} and then replays the kept
  // messages after `since`; it does not say how many. So the page sends an echo of its own
  // as soon as the connection opens: the server queues its reply behind everything already
  // queued for this connection, so the URL channel's broadcasts before it are the replay
  // (plus any published in the moment the page was reconnecting, which it had missed all the same).
  function isSync(p) {
    return !!p && typeof p === "object" && !Array.isArray(p) && typeof p.echoserverPageSync === "number";
  }

  function range(a, b) { return a === b ? "offset " + a : "offsets " + a + "–" + b; }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  // A resume that was not complete: say what may be missing, in the log and on the channel.
  function missed(f, sent, first, epochNow) {
    var since = sent.since;
    var text;
    var limits = " The server keeps a bounded history per channel (broadcast.history messages, " +
      "for up to broadcast.history_ttl seconds).";
    if (sent.epoch !== null && typeof epochNow === "string" && epochNow !== sent.epoch) {
      text = "Some messages may have been missed: the server numbers the channel anew (epoch " +
        (epochNow === "" ? "not started yet" : epochNow) + ", was " + sent.epoch + "): it lost the channel's " +
        "state (a restart with the memory broker, a flushed or replaced Redis), so what came after offset " +
        since + " cannot be recovered." +
        (first !== null ? " Replaying what is kept of the new numbering from offset " + first + "." : "");
      f.gap = "Not recovered: a new epoch (" + (epochNow || "nothing published yet") + ") after offset " + since +
        " of epoch " + sent.epoch + ". Messages may have been missed.";
    } else {
      if (first !== null && first <= since) {
        text = "Some messages were missed: the channel's offsets started again from 1 (the server lost " +
          "its state: a restart with the memory broker, or a flushed Redis), so what came after offset " +
          since + " cannot be told apart. Replaying what is kept from offset " + first + ".";
      } else if (first !== null && first > since + 1) {
        text = "Some messages were missed: " + range(since + 1, first - 1) + " (" +
          plural(first - since - 1, "message") + ") are no longer kept." + limits +
          " Replaying the rest from offset " + first + ".";
      } else if (first === null) {
        text = "Some messages may have been missed: the server could replay none of those after offset " + since +
          "." + limits + " With history off, while the broker is unreachable, or after a restart that lost the " +
          "channel's offsets, nothing is kept to replay.";
      } else {
        text = "Could not recover every message after offset " + since + "." + limits;
      }
      f.gap = "Not recovered after offset " + since + ": messages may have been missed.";
    }
    f.gap += " (" + clock(new Date()) + ")";
    addEntry({ dir: "error", kind: "", size: null, text: text, channel: f.name, tag: "not recovered" });
    renderChannels();
  }

  function startRecovery(msg) {
    var f = state.follows.get(channelOf(msg));
    if (!f) return;
    var since = typeof msg.since === "number" ? msg.since : null;
    var first = typeof msg.first === "number" ? msg.first : null;
    var recovered = msg.recovered === true;
    var sent = f.sent || { since: since, epoch: null };
    if (!recovered) missed(f, sent, first, msg.epoch);
    adopt(f, msg.epoch, first === null ? 0 : 1, recovered && first === null ? since : null);
    if (first === null) {
      if (recovered) logSys("Resumed after offset " + since + ": nothing was published meanwhile.");
      return;
    }
    var id = state.syncPending;
    if (id === null && isOpen()) {
      id = state.syncPending = ++state.syncSeq;
      state.ws.send(JSON.stringify({ type: "echo", payload: { echoserverPageSync: id } }));
    }
    state.recovery = { channel: f.name, recovered: recovered, count: 0, from: null, to: null, syncId: id };
  }

  function recoverySummary(rec) {
    var what = rec.count ? plural(rec.count, "message") + " (" + range(rec.from, rec.to) + ")" : "no messages";
    return rec.recovered
      ? "Recovered " + what + " published while disconnected"
      : "Replayed the " + what + " still kept";
  }

  function endRecovery() {
    var rec = state.recovery;
    state.recovery = null;
    logSys(recoverySummary(rec) + "; live messages follow.");
  }

  /* ---------- presence: who is on each channel, from join and leave events ---------- */

  var MAX_INFO_CHARS = 300;
  var MAX_ROSTER = 200;      // users listed per channel

  function infoText(info) {
    if (info === undefined || info === null) return "";
    var t = typeof info === "string" ? info : JSON.stringify(info);
    return t.length > MAX_INFO_CHARS ? t.slice(0, MAX_INFO_CHARS) + "…" : t;
  }

  function isMe(user) { return !!state.connToken && state.connToken.sub === user; }

  function onPresence(msg, size) {
    var join = msg.type === "join";
    var f = state.follows.get(msg.channel);
    if (f) {
      f.presence = true;
      if (join) f.roster.set(msg.user, infoText(msg.info));
      else f.roster.delete(msg.user);
      renderChannels();
    }
    var info = infoText(msg.info);
    addEntry({
      dir: "sys", kind: "", size: size, tag: msg.type, channel: msg.channel,
      text: msg.user + (isMe(msg.user) ? " (you)" : "") + (join ? " joined" : " left") + (info ? " · " + info : "")
    });
  }

  /* ---------- the channels card: follow, unfollow, positions, rosters ---------- */

  // The URL's channel: first in state.follows, created afresh unless already followed.
  function setUrlChannel(channel) {
    var old = null;
    state.follows.forEach(function (f) { if (f.url) old = f; });
    if (old && old.name === channel) return old;
    var f = state.follows.get(channel) || newFollow(channel);
    f.url = true;
    var next = new Map([[channel, f]]);
    state.follows.forEach(function (g, name) { if (g !== old && name !== channel) next.set(name, g); });
    state.follows = next;
    renderChannels();
    return f;
  }

  function showFollowError(text) {
    el.followError.textContent = text;
    el.followError.hidden = !text;
  }

  function addFollow() {
    showFollowError("");
    var name = el.followChannel.value.trim();
    if (!channelOk(name)) {
      showFollowError(name ? "Invalid channel: use 1–64 characters of A–Z a–z 0–9 _ . -" : "Type a channel name to follow.");
      el.followChannel.setAttribute("aria-invalid", "true");
      return;
    }
    el.followChannel.removeAttribute("aria-invalid");
    if (state.follows.has(name)) { showFollowError("Already following " + name + "."); return; }
    var f = newFollow(name);
    state.follows.set(name, f);
    el.followChannel.value = "";
    if (isOpen() && state.mode === "mixed") subscribe(f);
    renderChannels();
  }

  function removeFollow(name) {
    var f = state.follows.get(name);
    if (!f || f.url) return;
    if (isOpen() && (f.status === "pending" || f.status === "subscribed")) {
      f.status = "leaving";
      var wire = JSON.stringify({ type: "unsubscribe", channel: name });
      state.ws.send(wire);
      addEntry({ dir: "out", kind: "text", size: utf8Length(wire), tag: "unsubscribe", channel: name, text: "Stop following " + name });
    } else {
      state.follows.delete(name);
    }
    renderChannels();
    if (document.activeElement === document.body) el.followChannel.focus();
  }

  var STATUS_TEXT = { waiting: "not connected", pending: "subscribing…", subscribed: "following", leaving: "leaving…" };
  var rows = new Map();     // channel -> {li, parts..., version}
  var channelsFrame = false;

  function renderChannels() {
    if (channelsFrame) return;
    channelsFrame = true;
    requestAnimationFrame(drawChannels);
  }

  function makeRow(name) {
    var li = document.createElement("li");
    li.className = "chan-row";
    li.setAttribute("data-channel", name);
    var head = document.createElement("div");
    head.className = "chan-head";
    li.appendChild(head);
    var r = { li: li, roster: null };
    r.name = appendSpan(head, "chan-name mono", name);
    r.urlTag = appendSpan(head, "chan-url", "URL channel");
    r.urlTag.title = "The channel in the connection's URL; change it in the Channel field above";
    r.status = appendSpan(head, "chan-status", "");
    r.pos = appendSpan(head, "chan-pos mono", "");
    r.pos.title = "The last message seen: where a reconnect resumes this channel";
    r.remove = document.createElement("button");
    r.remove.type = "button";
    r.remove.className = "btn small chan-remove";
    r.remove.textContent = "Remove";
    r.remove.setAttribute("aria-label", "Stop following " + name);
    r.remove.addEventListener("click", function () { removeFollow(name); });
    head.appendChild(r.remove);
    r.gap = document.createElement("p");
    r.gap.className = "chan-gap";
    li.appendChild(r.gap);
    r.who = document.createElement("div");
    r.who.className = "chan-who";
    li.appendChild(r.who);
    r.whoKey = null;
    return r;
  }

  function drawChannels() {
    channelsFrame = false;
    var order = [];
    state.follows.forEach(function (f, name) {
      var r = rows.get(name);
      if (!r) { r = makeRow(name); rows.set(name, r); }
      order.push(r.li);
      r.li.setAttribute("data-status", f.status);
      r.li.setAttribute("data-url", String(f.url));
      r.urlTag.hidden = !f.url;
      r.remove.hidden = f.url;
      r.remove.disabled = f.status === "leaving";
      setText(r.status, STATUS_TEXT[f.status] || f.status);
      setText(r.pos, f.offset === null ? "no position yet"
        : "offset " + f.offset + (f.epoch !== null ? " · epoch " + f.epoch : ""));
      if (f.offset === null) r.pos.removeAttribute("data-offset");
      else r.pos.setAttribute("data-offset", String(f.offset));
      if (f.epoch === null) r.pos.removeAttribute("data-epoch");
      else r.pos.setAttribute("data-epoch", f.epoch);
      setText(r.gap, f.gap);
      r.gap.hidden = !f.gap;
      drawRoster(r, f);
    });
    rows.forEach(function (r, name) {
      if (!state.follows.has(name)) { r.li.remove(); rows.delete(name); }
    });
    // Move rows only when the order changed (moving a node drops its focus).
    var kids = el.channels.children;
    var same = kids.length === order.length;
    for (var i = 0; same && i < order.length; i++) same = kids[i] === order[i];
    if (!same) order.forEach(function (li) { el.channels.appendChild(li); });
    renderSendChannels();
  }

  // Server data (user names, info) reaches the page as textContent only.
  function drawRoster(r, f) {
    var users = [];
    f.roster.forEach(function (info, user) { users.push([user, info]); });
    users.sort(function (a, b) { return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0; });
    var key = JSON.stringify([f.presence, f.stale, users, state.connToken && state.connToken.sub]);
    if (key === r.whoKey) return;
    r.whoKey = key;
    r.who.textContent = "";
    r.who.setAttribute("data-presence", String(f.presence));
    if (!f.presence) {
      appendSpan(r.who, "help", "Who is here: not shown (no join or leave events seen; only namespaces with join_leave send them).");
      return;
    }
    var head = document.createElement("p");
    head.className = "chan-who-head";
    appendSpan(head, "label", "Here");
    appendSpan(head, "muted small", " (" + plural(users.length, "user") + " seen joining since the page followed it; anyone there before is not listed)");
    r.who.appendChild(head);
    var ul = document.createElement("ul");
    ul.className = "roster";
    users.slice(0, MAX_ROSTER).forEach(function (u) {
      var li = document.createElement("li");
      li.setAttribute("data-user", u[0]);
      appendSpan(li, "user mono", u[0]);
      if (isMe(u[0])) appendSpan(li, "you muted", " (you)");
      if (u[1]) appendSpan(li, "info mono", u[1]);
      ul.appendChild(li);
    });
    r.who.appendChild(ul);
    if (users.length > MAX_ROSTER) appendSpan(r.who, "help", "… and " + (users.length - MAX_ROSTER) + " more");
    if (f.stale) {
      appendSpan(r.who, "help chan-stale", "Joins and leaves while the page was disconnected are not replayed: this list may be out of date.");
    }
  }

  // The composer's "Publish on": the URL's channel and every channel followed now.
  function renderSendChannels() {
    var names = [];
    state.follows.forEach(function (f, name) { if (f.url || f.status === "subscribed" || f.status === "pending") names.push(name); });
    var cur = el.sendChannel.value;
    var opts = el.sendChannel.options;
    var same = opts.length === names.length;
    for (var i = 0; same && i < names.length; i++) same = opts[i].value === names[i];
    if (!same) {
      el.sendChannel.textContent = "";
      names.forEach(function (n) {
        var o = document.createElement("option");
        o.value = n;
        o.textContent = n;
        el.sendChannel.appendChild(o);
      });
      el.sendChannel.value = names.indexOf(cur) >= 0 ? cur : names[0] || "";
    }
    el.sendChannel.disabled = el.envelope.value !== "broadcast";
  }

  /* ---------- publishing and subscribing with curl ---------- */

  function renderCli() {
    if (el.cliCard.hidden) return;
    var base = location.protocol + "//" + location.host;
    var channel = state.channel;
    var mixed = state.mode === "mixed";
    setText(el.cliChannel, channel);
    showCommand(el.curlPublish, ["curl", "-H \"Authorization: Bearer $ECHOSERVER_API_KEY\"",
      mixed ? "-H 'Content-Type: application/json'" : "-H 'Content-Type: text/plain'",
      mixed ? "--data '{\"text\":\"hello\"}'" : "--data 'hello'",
      base + "/api/channels/" + channel + "/messages"]);
    showCommand(el.curlSubscribe, ["curl -N"].concat(
      state.authRequired ? ["-H \"Authorization: Bearer $ECHOSERVER_TOKEN\""] : [],
      [base + "/sse/" + channel]));
  }

  // One unbreakable box per argument, so a line wraps between arguments (or inside one
  // wider than the line), never at the hyphen of "Content-Type"; the text stays the command.
  function showCommand(pre, args) {
    if (pre.textContent === args.join(" ")) return;
    pre.textContent = "";
    args.forEach(function (arg, i) {
      if (i) pre.appendChild(document.createTextNode(" "));
      appendSpan(pre, "arg", arg);
    });
  }

  var copyTimer = null;

  function copyCommand(btn) {
    var pre = $(btn.getAttribute("data-copy"));
    var text = pre.textContent;
    var what = btn.getAttribute("data-what");
    var said = function (ok) {
      el.copyStatus.textContent = ok
        ? "Copied the " + what + " command."
        : "Selected the " + what + " command: press Ctrl+C (⌘C on a Mac) to copy it.";
      el.copyPublish.textContent = el.copySubscribe.textContent = "Copy";
      btn.textContent = ok ? "Copied" : "Selected";
      if (copyTimer) clearTimeout(copyTimer);
      copyTimer = setTimeout(function () {
        el.copyPublish.textContent = el.copySubscribe.textContent = "Copy";
      }, 2000);
    };
    var fallback = function () {
      // No clipboard API (a page served over plain http from another host): select the
      // command, and try the older copy command on the selection.
      var sel = window.getSelection();
      var r = document.createRange();
      r.selectNodeContents(pre);
      sel.removeAllRanges();
      sel.addRange(r);
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      said(ok);
    };
    if (navigator.clipboard && typeof navigator.clipboard.writeText === "function") {
      navigator.clipboard.writeText(text).then(function () { said(true); }, fallback);
    } else {
      fallback();
    }
  }

  /* ---------- log (bounded, batched with requestAnimationFrame) ---------- */

  var entries = [];          // the last MAX_ENTRIES entries, oldest first
  var queue = [];            // entries not yet rendered
  var seqCounter = 0;
  var frameRequested = false;
  var rerenderAll = false;
  var DIR_LABEL = { out: "sent", "in": "received", sys: "system", error: "error" };

  function logSys(text) { addEntry({ dir: "sys", kind: "", size: null, text: text }); }
  function logError(text) { addEntry({ dir: "error", kind: "", size: null, text: text }); }

  function addEntry(e) {
    e.seq = ++seqCounter;
    e.time = new Date();
    state.total++;
    // Pre-compute what gets displayed so nothing large is kept around.
    if (e.bytes) {
      var n = e.bytes.length, shown = Math.min(n, HEX_PREVIEW_BYTES);
      e.display = hexOf(e.bytes, 0, shown, " ");
      e.more = n > shown ? "… +" + (n - shown).toLocaleString("en-US") + " more bytes" : "";
      e.hex = true;
      e.bytes = null;
    } else {
      var t = e.text || "";
      e.display = t.length > TEXT_PREVIEW_CHARS ? t.slice(0, TEXT_PREVIEW_CHARS) : t;
      e.more = t.length > TEXT_PREVIEW_CHARS
        ? "… +" + (t.length - TEXT_PREVIEW_CHARS).toLocaleString("en-US") + " more characters" : "";
      e.text = null;
    }
    e.search = (DIR_LABEL[e.dir] + " " + e.kind + " " + (e.tag || "") + " " +
      (e.channel ? "channel " + e.channel + " " : "") +
      (e.offset !== null && e.offset !== undefined ? "offset " + e.offset + " " : "") +
      (e.replayed ? (e.replayKind === "recovery" ? "recovered replayed " : "replayed ") : "") +
      (e.extra || "") + " " + e.display).toLowerCase();
    entries.push(e);
    if (entries.length > MAX_ENTRIES) entries.shift();
    queue.push(e);
    if (queue.length > MAX_ENTRIES) queue.shift();
    requestFrame();
  }

  function requestFrame() {
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(flush);
  }

  function matches(e, f) { return !f || e.search.indexOf(f) !== -1; }

  function renderEntry(e) {
    var div = document.createElement("div");
    div.className = "entry";
    div.setAttribute("data-dir", e.dir);
    div.setAttribute("data-seq", String(e.seq));

    var dir = document.createElement("span");
    dir.className = "dir";
    dir.textContent = DIR_LABEL[e.dir];
    div.appendChild(dir);

    var meta = document.createElement("span");
    meta.className = "meta";
    var time = document.createElement("time");
    time.dateTime = e.time.toISOString();
    time.textContent = clock(e.time);
    meta.appendChild(time);
    if (e.kind) appendSpan(meta, "kind", e.kind);
    if (e.size !== null && e.size !== undefined) appendSpan(meta, "size", fmtBytes(e.size));
    if (e.tag) appendSpan(meta, "tag", e.tag);
    if (e.channel) {
      var c = appendSpan(meta, "chan", e.channel);
      c.title = "Channel";
      div.setAttribute("data-channel", e.channel);
    }
    if (e.offset !== null && e.offset !== undefined) {
      appendSpan(meta, "offset", "offset " + e.offset).title = "The message's position on its channel";
    }
    if (e.replayed) {
      div.setAttribute("data-replayed", "true");
      if (e.replayKind === "recovery") {
        div.setAttribute("data-replay", "recovery");
        appendSpan(meta, "tag replay", "recovered").title = "Published while disconnected; recovered on reconnecting";
      } else {
        div.setAttribute("data-replay", "history");
        appendSpan(meta, "tag replay", "replayed").title = "Sent before you joined; replayed from the server's kept history";
      }
    }
    if (e.extra) appendSpan(meta, "extra", e.extra);
    if (e.rtt !== null && e.rtt !== undefined) {
      var r = appendSpan(meta, "rtt", "RTT " + fmtMs(e.rtt));
      r.title = "Round-trip time: sent → echoed back";
    }
    div.appendChild(meta);

    var pre = document.createElement("pre");
    pre.className = "content" + (e.hex ? " hex" : "");
    pre.textContent = e.display;
    if (e.more) {
      var more = document.createElement("span");
      more.className = "more";
      more.textContent = (e.display ? " " : "") + e.more;
      pre.appendChild(more);
    }
    div.appendChild(pre);
    return div;
  }

  function appendSpan(parent, cls, text) {
    var s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    parent.appendChild(s);
    return s;
  }

  function flush() {
    frameRequested = false;
    var f = el.filter.value.trim().toLowerCase();
    var frag = document.createDocumentFragment();
    var items;
    if (rerenderAll) {
      rerenderAll = false;
      queue = [];
      el.log.textContent = "";
      items = entries;
    } else {
      items = queue;
      queue = [];
    }
    for (var i = 0; i < items.length; i++) {
      if (matches(items[i], f)) frag.appendChild(renderEntry(items[i]));
    }
    el.log.appendChild(frag);
    if (f && entries.length) el.log.setAttribute("data-filtered", "");
    else el.log.removeAttribute("data-filtered");
    // Drop DOM rows whose entries fell out of the kept window.
    var oldest = entries.length ? entries[0].seq : Infinity;
    var first = el.log.firstElementChild;
    while (first && (Number(first.getAttribute("data-seq")) < oldest ||
                     el.log.childElementCount > MAX_ENTRIES)) {
      el.log.removeChild(first);
      first = el.log.firstElementChild;
    }
    var shownCount = el.log.childElementCount;
    el.logCount.textContent = f
      ? "(" + shownCount + " of " + entries.length + " shown)"
      : "(" + entries.length + (state.total > entries.length ? " latest of " + state.total : "") + ")";
    if (el.autoscroll.checked) el.log.scrollTop = el.log.scrollHeight;
  }

  function rerender() { rerenderAll = true; requestFrame(); }

  /* ---------- wiring ---------- */

  el.connect.addEventListener("click", function () {
    if (isChannelMode() && !validateChannel()) { el.channel.focus(); return; }
    state.attempt = 0;
    connect();
  });
  el.disconnect.addEventListener("click", disconnect);
  el.reconnect.addEventListener("change", function () {
    if (!el.reconnect.checked) {
      if (state.retryTimer) {
        clearRetry();
        updateControls();
      }
    } else if (state.wanted && !state.ws && !state.retryTimer) {
      scheduleReconnect();
    }
  });
  el.channel.addEventListener("input", validateChannel);
  el.channel.addEventListener("change", function () {
    if (!validateChannel()) return;
    if (isChannelMode() && currentChannel() !== state.channel && (state.ws || state.wanted)) {
      logSys("Switching to channel " + currentChannel());
      state.attempt = 0;
      connect();
    }
  });
  el.token.addEventListener("input", onTokenInput);
  el.refreshToken.addEventListener("click", refreshToken);
  el.token.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") { ev.preventDefault(); state.attempt = 0; connect(); }
  });

  el.composer.addEventListener("submit", function (ev) { ev.preventDefault(); send(); });
  el.message.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      send();
    }
  });
  el.msgtype.addEventListener("change", updateComposerHints);
  el.envelope.addEventListener("change", renderSendChannels);
  el.followForm.addEventListener("submit", function (ev) { ev.preventDefault(); addFollow(); });
  el.encoding.addEventListener("change", updateComposerHints);
  el.file.addEventListener("change", updateComposerHints);

  var filterFrame = false;
  el.filter.addEventListener("input", function () {
    if (filterFrame) return;
    filterFrame = true;
    requestAnimationFrame(function () { filterFrame = false; rerender(); });
  });
  el.clear.addEventListener("click", function () {
    entries = [];
    queue = [];
    pending.clear();
    state.total = 0;
    rerender();
  });
  el.copyPublish.addEventListener("click", function () { copyCommand(el.copyPublish); });
  el.copySubscribe.addEventListener("click", function () { copyCommand(el.copySubscribe); });
  el.autoscroll.addEventListener("change", function () {
    if (el.autoscroll.checked) el.log.scrollTop = el.log.scrollHeight;
  });

  /* ---------- start ---------- */

  (function init() {
    onTokenInput();   // a token the browser kept in the field across a reload
    updateComposerHints();
    flush();
    startHealthPolling();
    learnProtocol().then(function () {
      var ch = new URLSearchParams(location.search).get("channel");
      if (ch && channelOk(ch)) el.channel.value = ch;
      validateChannel();
      connect();   // talk to the server right away
    });
    document.addEventListener("visibilitychange", pollHealth);
  })();
})();
