/* commandbus: PostgreSQL connections on the loop thread.
 *
 * Each connection is nonblocking libpq in pipeline mode, watched by a
 * uv_poll_t on its socket. A connection keeps a ring of "slots", one per
 * answer the server owes it in pipeline order (a Prepare, a statement, a
 * Sync), so that each PGresult is matched to its unit without any state on
 * the server side. A broken connection fails the units in flight on it with
 * CB_ECONNECTION and reconnects with backoff; a new socket always gets a new
 * poll handle (libpq may hand out a new socket with the same number). */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "commandbus/thread.h"
#include "internal.h"
#include "strbuf.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000

static void on_poll(uv_poll_t *handle, int status, int events);
static void conn_broken(cb_conn *conn, const char *why);
static void send_units(cb_conn *conn, cb_unit *first);

/* ---- prepared statement cache (per connection) -------------------------- */

/* Eight bytes a step: every statement of every unit is looked up here, and
 * a worker's receive and acknowledgement run to kilobytes each round (a
 * byte at a time this was some 4% of a burn-down worker's instructions).
 * Equal hashes are compared in full, so a collision costs only time. */
uint64_t cb__sql_hash(const char *s) {
  size_t n = strlen(s), i = 0;
  uint64_t h = 1469598103934665603ULL ^ n, word;
  for (; i + 8 <= n; i += 8) {
    memcpy(&word, s + i, 8);
    h = (h ^ word) * 0x9e3779b97f4a7c15ULL;
    h ^= h >> 29;
  }
  word = 0;
  memcpy(&word, s + i, n - i);
  h = (h ^ word) * 0x9e3779b97f4a7c15ULL;
  h ^= h >> 32;
  return h ? h : 1; /* 0 stands for "not known yet" (unit_stmt) */
}

static void cache_clear(cb_conn *conn) {
  for (size_t i = 0; i < conn->cache_cap; i++) free(conn->cache[i].sql);
  free(conn->cache);
  conn->cache = NULL;
  conn->cache_cap = conn->cache_count = 0;
}

static stmt_cache_entry *cache_slot(stmt_cache_entry *tab, size_t cap, const char *sql, uint64_t h) {
  size_t i = h & (cap - 1);
  while (tab[i].sql && !(tab[i].hash == h && strcmp(tab[i].sql, sql) == 0)) i = (i + 1) & (cap - 1);
  return &tab[i];
}

/* The statement's id on this connection, or -1 when it is not prepared yet
 * (then *fresh is set and the id is reserved: the caller sends a Prepare). */
static int cache_lookup(cb_conn *conn, const char *sql, uint64_t h, int *fresh) {
  *fresh = 0;
  if (conn->cache_count * 2 >= conn->cache_cap) {
    size_t cap = conn->cache_cap ? conn->cache_cap * 2 : 64;
    stmt_cache_entry *tab = calloc(cap, sizeof *tab);
    if (tab == NULL) return -1;
    for (size_t i = 0; i < conn->cache_cap; i++)
      if (conn->cache[i].sql) *cache_slot(tab, cap, conn->cache[i].sql, conn->cache[i].hash) = conn->cache[i];
    free(conn->cache);
    conn->cache = tab;
    conn->cache_cap = cap;
  }
  stmt_cache_entry *e = cache_slot(conn->cache, conn->cache_cap, sql, h);
  if (e->sql && e->id >= 0) return e->id;
  if (e->sql == NULL) {
    e->sql = strdup(sql);
    if (e->sql == NULL) return -1;
    e->hash = h;
    conn->cache_count++;
  }
  e->id = conn->next_stmt_id++; /* names are never reused */
  *fresh = 1;
  return e->id;
}

/* A Prepare that did not succeed (an error, or skipped after one): the
 * statement is prepared again, under a new name, when next used. */
static void cache_forget(cb_conn *conn, const char *sql) {
  if (conn->cache_cap == 0) return;
  stmt_cache_entry *e = cache_slot(conn->cache, conn->cache_cap, sql, cb__sql_hash(sql));
  if (e->sql) e->id = -1;
}

/* ---- slots --------------------------------------------------------------- */

static int push_slot(cb_conn *conn, int kind, cb_unit *u, int index) {
  if (conn->slot_count == conn->slot_cap) {
    size_t cap = conn->slot_cap ? conn->slot_cap * 2 : 64;
    pipe_slot *s = malloc(cap * sizeof *s);
    if (s == NULL) return -1;
    for (size_t i = 0; i < conn->slot_count; i++) s[i] = conn->slots[(conn->slot_head + i) % conn->slot_cap];
    free(conn->slots);
    conn->slots = s;
    conn->slot_cap = cap;
    conn->slot_head = 0;
  }
  pipe_slot *s = &conn->slots[(conn->slot_head + conn->slot_count) % conn->slot_cap];
  s->kind = kind;
  s->unit = u;
  s->index = index;
  conn->slot_count++;
  return 0;
}

static pipe_slot *head_slot(cb_conn *conn) { return conn->slot_count ? &conn->slots[conn->slot_head] : NULL; }

static void pop_slot(cb_conn *conn) {
  conn->slot_head = (conn->slot_head + 1) % conn->slot_cap;
  conn->slot_count--;
}

/* Fails every unit still owed an answer on this connection. */
static void fail_in_flight(cb_conn *conn, int code, const char *why) {
  cb_err err;
  cb_err_set(&err, code, "%s", why);
  if (conn->copying) {
    cb_unit *u = conn->copying;
    conn->copying = NULL;
    conn->copy_streaming = 0;
    conn->copy_waiting = 0;
    conn->units_in_flight--;
    cb__unit_complete(u, code, &err);
  }
  while (conn->slot_count) {
    pipe_slot s = *head_slot(conn);
    pop_slot(conn);
    if (s.kind == SLOT_SYNC) {
      conn->units_in_flight--;
      cb__unit_complete(s.unit, code, &err);
    }
  }
}

/* ---- poll handle ---------------------------------------------------------- */

static void free_handle(uv_handle_t *h) { free(h); }

static void poll_close(cb_conn *conn) {
  if (conn->poll) {
    uv_poll_stop(conn->poll);
    uv_close((uv_handle_t *)conn->poll, free_handle);
    conn->poll = NULL;
  }
  conn->poll_fd = -1;
  conn->poll_events = 0;
}

static int poll_watch(cb_conn *conn, int events) {
  int fd = PQsocket(conn->pg);
  if (fd < 0) return -1;
  if (conn->poll && conn->poll_fd != fd) poll_close(conn);
  if (conn->poll == NULL) {
    conn->poll = malloc(sizeof *conn->poll);
    if (conn->poll == NULL || uv_poll_init(&conn->rt->loop, conn->poll, fd) != 0) {
      free(conn->poll);
      conn->poll = NULL;
      return -1;
    }
    conn->poll->data = conn;
    conn->poll_fd = fd;
    conn->poll_events = 0;
  }
  if (events != conn->poll_events) {
    if (uv_poll_start(conn->poll, events, on_poll) != 0) return -1;
    conn->poll_events = events;
  }
  return 0;
}

/* Readable always; writable while libpq holds data to send, and while a
 * streamed COPY waits to send its next piece (pump_copy). */
static void watch_ready(cb_conn *conn) {
  if (poll_watch(conn, UV_READABLE | (conn->want_write || conn->copy_streaming ? UV_WRITABLE : 0)) < 0)
    conn_broken(conn, "cannot watch the connection's socket");
}

/* ---- keeping passwords out of messages ----------------------------------- */

/* libpq echoes pieces of a connection string it cannot parse ("invalid
 * percent-encoded token: "..."", a whole URI with a malformed IPv6 host), and
 * those pieces may be the password. Every message about a connection goes
 * through cb__redact_conninfo before it is kept, logged or returned. */

typedef struct secret_span {
  size_t from, to; /* [from, to) of the connection string */
} secret_span;

#define MAX_SECRETS 8

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
static int is_word(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Where a key=value value that starts at `at` ends, as far as secrets go: at
 * the next " keyword=" (or the end), whatever quoting says, so that a value
 * quoted the wrong way is still covered whole. */
static size_t value_end(const char *ci, size_t at) {
  size_t n = strlen(ci);
  for (size_t i = at; i < n; i++) {
    if (!is_space(ci[i])) continue;
    size_t k = i;
    while (k < n && is_space(ci[k])) k++;
    size_t w = k;
    while (w < n && is_word(ci[w])) w++;
    if (w == k) continue;
    while (w < n && is_space(ci[w])) w++;
    if (w < n && ci[w] == '=') return i;
  }
  return n;
}

/* Keywords whose values are secrets. */
static const char *const secret_keywords[] = {"password", "sslpassword"};

/* The length of the secret keyword followed by '=' at p, or 0. */
static size_t secret_keyword_at(const char *p) {
  for (size_t k = 0; k < sizeof secret_keywords / sizeof secret_keywords[0]; k++) {
    size_t n = strlen(secret_keywords[k]);
    if (strncmp(p, secret_keywords[k], n) == 0 && p[n] == '=') return n + 1;
  }
  return 0;
}

/* The parts of conninfo that may hold a secret: a URI's user info after the
 * first ':' (up to its last '@', generously), password= and sslpassword= in
 * a URI's query, or those keywords' values in the key=value form. */
static int secret_spans(const char *ci, secret_span *out) {
  int n = 0;
  size_t len = strlen(ci);
  const char *scheme_end = strstr(ci, "://");
  int uri = strncmp(ci, "postgresql://", 13) == 0 || strncmp(ci, "postgres://", 11) == 0;
  if (uri && scheme_end) {
    size_t start = (size_t)(scheme_end - ci) + 3;
    const char *query = strchr(ci + start, '?');
    size_t end = query ? (size_t)(query - ci) : len;
    size_t at = SIZE_MAX;
    for (size_t i = start; i < end; i++)
      if (ci[i] == '@') at = i;
    const char *colon = at != SIZE_MAX ? memchr(ci + start, ':', at - start) : NULL;
    if (colon) out[n++] = (secret_span){(size_t)(colon - ci) + 1, at};
    for (const char *p = query; p && n < MAX_SECRETS; p = strchr(p + 1, '&')) {
      size_t key = secret_keyword_at(p + 1);
      if (key == 0) continue;
      size_t from = (size_t)(p - ci) + 1 + key;
      const char *amp = strchr(ci + from, '&');
      out[n++] = (secret_span){from, amp ? (size_t)(amp - ci) : len};
    }
    return n;
  }
  for (size_t i = 0; i < len && n < MAX_SECRETS; i++) {
    if (i > 0 && is_word(ci[i - 1])) continue;
    size_t w = i;
    while (w < len && is_word(ci[w])) w++;
    if (w == i) continue;
    size_t e = w;
    while (e < len && is_space(ci[e])) e++;
    if (e >= len || ci[e] != '=') continue;
    /* a keyword: is it a secret one? (compared without the spaces before '=') */
    char word[16];
    size_t wl = w - i < sizeof word - 2 ? w - i : 0;
    if (wl == 0) continue;
    memcpy(word, ci + i, wl);
    word[wl] = '=';
    word[wl + 1] = '\0';
    if (secret_keyword_at(word) == 0) continue;
    e++;
    while (e < len && is_space(ci[e])) e++;
    out[n++] = (secret_span){e, value_end(ci, e)};
    i = e;
  }
  return n;
}

/* Appends ci[from, to) with the secrets' bytes shown as one "***" each. */
static void put_masked(cb_strbuf *b, const char *ci, size_t from, size_t to, const secret_span *s, int n) {
  for (size_t i = from; i < to;) {
    int inside = -1;
    for (int k = 0; k < n && inside < 0; k++)
      if (i >= s[k].from && i < s[k].to) inside = k;
    if (inside < 0) {
      cb_strbuf_putc(b, ci[i++]);
      continue;
    }
    cb_strbuf_puts(b, "***");
    i = s[inside].to;
  }
}

/* Whether text[0, len) occurs in ci where it overlaps a secret; *at gets the
 * first such place. */
static int overlaps_secret(const char *ci, const char *text, size_t len, const secret_span *s, int n, size_t *at) {
  if (len == 0 || n == 0) return 0;
  size_t cilen = strlen(ci);
  for (const char *p = ci; (p = memmem(p, cilen - (size_t)(p - ci), text, len)) != NULL; p++) {
    size_t from = (size_t)(p - ci), to = from + len;
    for (int k = 0; k < n; k++)
      if (from < s[k].to && s[k].from < to) {
        *at = from;
        return 1;
      }
  }
  return 0;
}

/* Replaces every occurrence of secret[0, len) in b's text by "***". */
static void mask_text(cb_strbuf *b, const char *secret, size_t len) {
  if (len < 4 || b->data == NULL) return; /* shorter ones are masked where quoted only */
  cb_strbuf out = {0};
  const char *p = b->data;
  for (const char *hit; (hit = memmem(p, strlen(p), secret, len)) != NULL; p = hit + len) {
    for (; p < hit; p++) cb_strbuf_putc(&out, *p);
    cb_strbuf_puts(&out, "***");
  }
  cb_strbuf_puts(&out, p);
  cb_strbuf_free(b);
  *b = out;
}

static int hex_value(char c) {
  return c >= '0' && c <= '9'   ? c - '0'
         : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                : -1;
}

void cb__redact_conninfo(const char *conninfo, const char *message, char *out, size_t outlen) {
  secret_span spans[MAX_SECRETS];
  int n = conninfo ? secret_spans(conninfo, spans) : 0;
  cb_strbuf b = {0};
  /* Quoted pieces first: libpq quotes what it echoes. */
  for (const char *p = message; *p;) {
    const char *close = *p == '"' ? strchr(p + 1, '"') : NULL;
    size_t at;
    if (close && overlaps_secret(conninfo, p + 1, (size_t)(close - p - 1), spans, n, &at)) {
      cb_strbuf_putc(&b, '"');
      put_masked(&b, conninfo, at, at + (size_t)(close - p - 1), spans, n);
      cb_strbuf_putc(&b, '"');
      p = close + 1;
    } else {
      cb_strbuf_putc(&b, *p++);
    }
  }
  /* Then the passwords themselves, as written and percent-decoded, wherever
   * else they appear. */
  for (int k = 0; k < n; k++) {
    size_t len = spans[k].to - spans[k].from;
    const char *raw = conninfo + spans[k].from;
    mask_text(&b, raw, len);
    char decoded[256];
    size_t d = 0;
    for (size_t i = 0; i < len && d < sizeof decoded; i++) {
      int hi = i + 2 < len && raw[i] == '%' ? hex_value(raw[i + 1]) : -1;
      int lo = hi >= 0 ? hex_value(raw[i + 2]) : -1;
      if (hi >= 0 && lo >= 0) {
        decoded[d++] = (char)(hi * 16 + lo);
        i += 2;
      } else {
        decoded[d++] = raw[i];
      }
    }
    if (d != len) mask_text(&b, decoded, d);
  }
  snprintf(out, outlen, "%s",
           b.failed || b.data == NULL ? (*message ? "(message withheld: out of memory)" : "") : b.data);
  cb_strbuf_free(&b);
}

/* ---- connecting ----------------------------------------------------------- */

static void on_retry_timer(uv_timer_t *t) { cb__conn_start(t->data); }

static void on_connect_timeout(uv_timer_t *t) {
  cb_conn *conn = t->data;
  if (conn->state == CONN_CONNECTING) conn_broken(conn, "timed out connecting to PostgreSQL");
}

void cb__conn_init(cb_runtime *rt, cb_conn *conn, int index) {
  memset(conn, 0, sizeof *conn);
  conn->rt = rt;
  conn->index = index;
  conn->poll_fd = -1;
  conn->state = CONN_IDLE;
  uv_timer_init(&rt->loop, &conn->timer);
  conn->timer.data = conn;
}

static void relisten(cb_conn *conn);

/* A pool connection's first attempt ended, well or not: cb_runtime_new
 * waits for them all. */
static void startup_attempt_done(cb_runtime *rt) {
  pthread_mutex_lock(&rt->lock);
  if (rt->startup_pending > 0 && --rt->startup_pending == 0) pthread_cond_broadcast(&rt->started);
  pthread_mutex_unlock(&rt->lock);
}

/* Server notices ("relation already exists, skipping") are not errors; libpq
 * would print them on stderr. One kind matters: an error that arrives while
 * nothing is in flight is the server's goodbye (a terminated backend, a
 * shutdown: FATAL), which libpq hands here as a notice; from then on the
 * connection is known dead, even before the end of the stream is read. */
static void on_notice(void *arg, const PGresult *r) {
  const char *severity = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
  if (severity && (strcmp(severity, "FATAL") == 0 || strcmp(severity, "PANIC") == 0)) ((cb_conn *)arg)->goodbye = 1;
}

static void connected(cb_conn *conn) {
  uv_timer_stop(&conn->timer);
  PQsetNoticeReceiver(conn->pg, on_notice, conn);
  if (PQsetnonblocking(conn->pg, 1) != 0 || PQenterPipelineMode(conn->pg) != 1) {
    conn_broken(conn, PQerrorMessage(conn->pg));
    return;
  }
  int reconnected = conn->ever_connected;
  conn->state = CONN_READY;
  conn->ever_connected = 1;
  conn->backoff_ms = 0;
  conn->last_error[0] = '\0';
  watch_ready(conn);
  if (conn->index >= 0 && !conn->startup_reported) {
    conn->startup_reported = 1;
    startup_attempt_done(conn->rt);
  }
  if (conn->index < 0 && reconnected) relisten(conn);
  cb__dispatch(conn->rt);
}

static void continue_connect(cb_conn *conn) {
  switch (PQconnectPoll(conn->pg)) {
    case PGRES_POLLING_OK: connected(conn); return;
    case PGRES_POLLING_READING:
      if (poll_watch(conn, UV_READABLE) < 0) conn_broken(conn, "cannot watch the connection's socket");
      return;
    case PGRES_POLLING_WRITING:
      if (poll_watch(conn, UV_WRITABLE) < 0) conn_broken(conn, "cannot watch the connection's socket");
      return;
    default: conn_broken(conn, PQerrorMessage(conn->pg)); return;
  }
}

void cb__conn_start(cb_conn *conn) {
  cb_runtime *rt = conn->rt;
  const char *keys[] = {"dbname", "application_name", NULL};
  const char *values[] = {rt->conninfo, rt->application_name, NULL};
  conn->pg = PQconnectStartParams(keys, values, 1);
  conn->state = CONN_CONNECTING;
  conn->goodbye = 0;
  if (conn->pg == NULL || PQstatus(conn->pg) == CONNECTION_BAD) {
    conn_broken(conn, conn->pg ? PQerrorMessage(conn->pg) : "out of memory");
    return;
  }
  uv_timer_start(&conn->timer, on_connect_timeout, (uint64_t)rt->connect_timeout_ms, 0);
  continue_connect(conn);
}

/* why (libpq's message, or the default) with the connection string's
 * secrets redacted and its trailing newline trimmed, into msg. */
static void failure_reason(const cb_runtime *rt, const char *why, char *msg, size_t len) {
  cb__redact_conninfo(rt->conninfo, why && *why ? why : "connection lost", msg, len);
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) msg[--n] = '\0';
}

/* Forgets the session: closes it (if open) with its prepared statements and
 * the pipeline's slots; fail_in_flight must have run. */
static void forget_session(cb_conn *conn) {
  if (conn->pg) PQfinish(conn->pg);
  conn->pg = NULL;
  cache_clear(conn);
  free(conn->slots);
  conn->slots = NULL;
  conn->slot_cap = conn->slot_count = conn->slot_head = 0;
}

/* Called for every failure: of a connection attempt or of a live connection.
 * Fails what was in flight, forgets the session (its prepared statements),
 * and schedules the next attempt. */
static void conn_broken(cb_conn *conn, const char *why) {
  cb_runtime *rt = conn->rt;
  conn->state = CONN_IDLE; /* first: callbacks below must not pick it */
  char msg[sizeof conn->last_error];
  failure_reason(rt, why, msg, sizeof msg);
  memcpy(conn->last_error, msg, sizeof msg);

  poll_close(conn);
  if (conn->pg) {
    PQfinish(conn->pg);
    conn->pg = NULL;
  }
  char full[320];
  snprintf(full, sizeof full, "lost the connection to PostgreSQL: %s", msg);
  fail_in_flight(conn, CB_ECONNECTION, full);
  cache_clear(conn);
  conn->want_write = 0;
  uv_timer_stop(&conn->timer);
  /* The pool's first attempts are reported to cb_runtime_new, which fails
   * fast on an unreachable database; later attempts retry with backoff. */
  if (conn->index >= 0 && !conn->startup_reported) {
    conn->startup_reported = 1;
    startup_attempt_done(rt);
  }
  conn->backoff_ms = conn->backoff_ms ? conn->backoff_ms * 2 : BACKOFF_MIN_MS;
  if (conn->backoff_ms > BACKOFF_MAX_MS) conn->backoff_ms = BACKOFF_MAX_MS;
  uv_timer_start(&conn->timer, on_retry_timer, (uint64_t)conn->backoff_ms, 0);
  if (conn->index < 0) cb_hub_notify_all(rt->hub); /* notifications may be lost */
  cb__dispatch(rt);
}

static void free_unit_when_done(cb_unit *u, void *arg) {
  (void)arg;
  cb_unit_free(u);
}

/* Calls the watches of channel (NULL: every watch), on the loop thread. */
static void notify_watches(cb_runtime *rt, const char *channel) {
  /* By index: a callback may add or remove watches (the array may move). */
  for (size_t i = 0; i < rt->nwatches; i++) {
    notify_watch w = rt->watches[i];
    if (w.id != 0 && (channel == NULL || strcmp(w.channel, channel) == 0)) w.fn(w.arg);
  }
}

static void relisten(cb_conn *conn) {
  cb_runtime *rt = conn->rt;
  pthread_mutex_lock(&rt->lock);
  size_t n = rt->nchannels;
  char **copy = n ? malloc(n * sizeof *copy) : NULL;
  for (size_t i = 0; copy && i < n; i++) copy[i] = strdup(rt->channels[i]);
  pthread_mutex_unlock(&rt->lock);
  if (copy == NULL) return;
  /* One unit, answered by nobody: its completion frees it. */
  cb_unit *u = cb_unit_new();
  for (size_t i = 0; i < n; i++) {
    char sql[96];
    snprintf(sql, sizeof sql, "LISTEN \"%s\"", copy[i]);
    if (u) cb_unit_add_flags(u, sql, 0, NULL, CB_STMT_ONESHOT);
    free(copy[i]);
  }
  free(copy);
  if (u == NULL) return;
  cb_unit_on_done(u, free_unit_when_done, NULL);
  u->group_end = 1;
  u->next = NULL;
  send_units(conn, u);
  cb_hub_notify_all(rt->hub);
  notify_watches(rt, NULL);
}

/* ---- sending ---------------------------------------------------------------- */

static void fill_values(const cb_unit *u, const unit_stmt *s, const char **values) {
  for (int p = 0; p < s->nparams; p++) {
    size_t off = u->param_offsets[s->params + (size_t)p];
    values[p] = off == PARAM_NULL ? NULL : u->arena + off;
  }
}

static int is_copy_unit(const cb_unit *u) {
  for (int i = 0; i < u->nstmts; i++)
    if (u->stmts[i].flags & CB_STMT_COPY) return 1;
  return 0;
}

/* Writes one unit into the pipeline: first, in a segment of their own, the
 * Prepares this session lacks (so that an error inside the unit, which makes
 * PostgreSQL skip the rest of its segment, can never skip a Prepare the cache
 * already counts on); then the statements and the Sync that closes the
 * unit's transaction. Returns 0, or -1 when libpq refused (the connection is
 * then broken); the unit's Sync slot is pushed in any case, so that it is
 * completed exactly once. */
static int send_unit(cb_conn *conn, cb_unit *u) {
  PGconn *pg = conn->pg;
  if (u->broken) { /* it lost a statement while it was filled: none runs, its Sync completes it in turn */
    conn->units_in_flight++;
    int ok = PQpipelineSync(pg);
    return push_slot(conn, SLOT_SYNC, u, -1) == 0 && ok ? 0 : -1;
  }
  if (is_copy_unit(u)) { /* one sharing a group with others: it cannot leave the pipeline */
    u->status = cb_err_set(&u->err, CB_EINVAL, "a COPY statement must be the only one of its unit");
    conn->units_in_flight++;
    int ok = PQpipelineSync(pg);
    return push_slot(conn, SLOT_SYNC, u, -1) == 0 && ok ? 0 : -1;
  }
  const char *values[CB_UNIT_MAX_PARAMS];
  int ids[u->nstmts > 0 ? u->nstmts : 1];
  int ok = 1, prepared = 0;
  conn->units_in_flight++;
  __atomic_fetch_add(&conn->rt->units_sent, 1, __ATOMIC_RELAXED);
  for (int i = 0; ok && i < u->nstmts; i++) {
    const unit_stmt *s = &u->stmts[i];
    ids[i] = -1;
    if (s->flags & CB_STMT_ONESHOT) continue;
    int fresh;
    const char *sql = cb__stmt_sql(u, s);
    ids[i] = cache_lookup(conn, sql, s->hash ? s->hash : cb__sql_hash(sql), &fresh);
    if (ids[i] < 0) ok = 0;
    else if (fresh) {
      char name[24] = "cb";
      cb_str_int(name + 2, ids[i]);
      ok = PQsendPrepare(pg, name, sql, s->nparams, NULL) && push_slot(conn, SLOT_PREPARE, u, i) == 0;
      prepared = 1;
    }
  }
  if (ok && prepared) ok = PQpipelineSync(pg) && push_slot(conn, SLOT_PREPARE_SYNC, u, -1) == 0;
  for (int i = 0; ok && u->status == CB_OK && i < u->nstmts; i++) {
    const unit_stmt *s = &u->stmts[i];
    fill_values(u, s, values);
    if (ids[i] < 0) {
      ok = PQsendQueryParams(pg, cb__stmt_sql(u, s), s->nparams, NULL, values, NULL, NULL, 0);
    } else {
      char name[24] = "cb";
      cb_str_int(name + 2, ids[i]);
      ok = PQsendQueryPrepared(pg, name, s->nparams, values, NULL, NULL, 0);
    }
    ok = ok && push_slot(conn, SLOT_STMT, u, i) == 0;
  }
  if (ok) ok = PQpipelineSync(pg);
  if (push_slot(conn, SLOT_SYNC, u, -1) < 0) ok = 0;
  return ok ? 0 : -1;
}

/* Starts a CB_STMT_COPY unit on a connection with nothing in flight: out of
 * pipeline mode, its query goes as one simple query (one transaction); the
 * data follow as the server asks for them (read_copy_results). Returns 0,
 * or -1 when libpq refused (the connection is then broken). */
static int send_copy_unit(cb_conn *conn, cb_unit *u) {
  conn->units_in_flight++;
  conn->copying = u;
  conn->copy_next = 0;
  conn->copy_streaming = 0;
  conn->copy_waiting = 0;
  __atomic_fetch_add(&conn->rt->units_sent, 1, __ATOMIC_RELAXED);
  if (u->broken) return -1; /* unreachable: dispatch completes a broken one */
  return PQexitPipelineMode(conn->pg) == 1 && PQsendQuery(conn->pg, cb__stmt_sql(u, &u->stmts[0])) ? 0 : -1;
}

static void flush(cb_conn *conn) {
  int r = PQflush(conn->pg);
  if (r < 0) {
    conn_broken(conn, PQerrorMessage(conn->pg));
    return;
  }
  conn->want_write = r == 1;
  watch_ready(conn);
}

/* Sends a chain of units (ending at a group_end) on a ready connection. */
static void send_units(cb_conn *conn, cb_unit *u) {
  int failed = 0;
  while (u) {
    cb_unit *next = u->group_end ? NULL : u->next;
    u->next = NULL;
    if (failed) { /* never sent: owed a failure like the rest */
      conn->units_in_flight++;
      push_slot(conn, SLOT_SYNC, u, -1);
    } else if (send_unit(conn, u) < 0) {
      failed = 1;
    }
    u = next;
  }
  if (failed) conn_broken(conn, PQerrorMessage(conn->pg));
  else flush(conn);
}

static cb_conn *least_loaded(cb_runtime *rt, int *connecting) {
  cb_conn *best = NULL;
  *connecting = 0;
  for (int i = 0; i < rt->nconns; i++) {
    cb_conn *c = &rt->conns[i];
    if (c->state == CONN_CONNECTING) *connecting = 1;
    if (c->state != CONN_READY || c->copying) continue; /* a COPY holds its connection out of the pipeline */
    if (best == NULL || c->units_in_flight < best->units_in_flight) best = c;
  }
  return best;
}

/* Whether an idle connection is still alive, as far as this side can tell
 * without a round trip: a server that ended the session (a terminated
 * backend, a restart) has left its goodbye and the end of the stream in our
 * socket, and the poll callback may not have run yet. A dead one is marked
 * broken (nothing is in flight on it, so nothing fails) and 0 returned. */
static int session_alive(cb_conn *conn) {
  int read = PQconsumeInput(conn->pg);
  if (read) PQisBusy(conn->pg); /* parses what arrived: a goodbye reaches on_notice */
  return read && !conn->goodbye && PQstatus(conn->pg) == CONNECTION_OK;
}

static int still_alive(cb_conn *conn) {
  if (conn->units_in_flight > 0) return 1; /* busy: its answers will tell */
  if (session_alive(conn)) return 1;
  conn_broken(conn, conn->goodbye ? "the server ended the session" : PQerrorMessage(conn->pg));
  return 0;
}

/* When no pool connection is ready because the ones there were went away,
 * starts one of them again now rather than after its backoff, once per unit
 * (u->reconnect_tried): work that never reached the server gets one fresh
 * connection. 1 when an attempt is under way. */
static int reconnect_now(cb_runtime *rt, cb_unit *u) {
  if (u->reconnect_tried) return 0;
  for (int i = 0; i < rt->nconns; i++) {
    cb_conn *c = &rt->conns[i];
    if (c->state != CONN_IDLE || !c->ever_connected) continue;
    u->reconnect_tried = 1;
    uv_timer_stop(&c->timer);
    cb__conn_start(c); /* may fail at once: then dispatch runs again and fails u */
    return 1;
  }
  return 0;
}

/* A ready pool connection with nothing in flight, for a COPY unit; NULL when
 * none is idle now (*busy: one is ready, and will be once its answers are
 * in; *connecting: one is being made). */
static cb_conn *idle_conn(cb_runtime *rt, int *busy, int *connecting) {
  *busy = *connecting = 0;
  for (int i = 0; i < rt->nconns; i++) {
    cb_conn *c = &rt->conns[i];
    if (c->state == CONN_CONNECTING) *connecting = 1;
    if (c->state != CONN_READY) continue;
    if (c->units_in_flight == 0) return c;
    *busy = 1;
  }
  return NULL;
}

void cb__dispatch(cb_runtime *rt) {
  while (rt->pending_head) {
    cb_unit *first = rt->pending_head;
    cb_unit *last = first;
    while (!last->group_end && last->next) last = last->next;
    int connecting;
    cb_conn *conn;
    if (is_copy_unit(first) && (first != last || first->nstmts != 1 || first->to_listener || first->broken)) {
      rt->pending_head = last->next; /* a COPY runs alone, in a unit of its own, on a pool connection */
      if (rt->pending_head == NULL) rt->pending_tail = NULL;
      last->next = NULL;
      cb_err err;
      cb_err_set(&err, CB_EINVAL, "a COPY statement must be the only one of its unit");
      while (first) {
        cb_unit *next = first->next;
        cb__unit_complete(first, first->broken ? first->broken : CB_EINVAL, first->broken ? &first->err : &err);
        first = next;
      }
      continue;
    }
    if (is_copy_unit(first)) {
      int busy;
      conn = idle_conn(rt, &busy, &connecting);
      if (conn && !still_alive(conn)) continue;
      /* Waits for the connections' answers (on_poll dispatches again when
       * one has none left owed); the units behind it wait too, so that it
       * is not passed over forever. */
      if (conn == NULL && (busy || connecting)) return;
      if (conn == NULL && reconnect_now(rt, first)) return;
    } else if (first->to_listener) {
      conn = rt->listener.state == CONN_READY ? &rt->listener : NULL;
      connecting = rt->listener.state == CONN_CONNECTING || rt->listener.state == CONN_IDLE;
    } else {
      conn = least_loaded(rt, &connecting);
      /* A dead one was dropped, and dispatch ran again for what is pending. */
      if (conn && !still_alive(conn)) continue;
      if (conn == NULL && !connecting && reconnect_now(rt, first)) return;
    }
    if (conn == NULL && connecting) return; /* wait for it */
    rt->pending_head = last->next;
    if (rt->pending_head == NULL) rt->pending_tail = NULL;
    last->next = NULL;
    last->group_end = 1;
    if (conn == NULL) {
      cb_err err;
      cb_err_set(&err, CB_ECONNECTION, "no connection to PostgreSQL%s%s", rt->conns[0].last_error[0] ? ": " : "",
                 rt->conns[0].last_error);
      while (first) {
        cb_unit *next = first->next;
        cb__unit_complete(first, CB_ECONNECTION, &err);
        first = next;
      }
      continue;
    }
    if (is_copy_unit(first)) {
      if (send_copy_unit(conn, first) < 0) conn_broken(conn, PQerrorMessage(conn->pg));
      else flush(conn);
      continue;
    }
    send_units(conn, first);
  }
}

/* ---- receiving -------------------------------------------------------------- */

static void record_error(cb_unit *u, const PGresult *r) {
  if (u->status != CB_OK) return;
  const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  /* Class 08 (connection exception) and 57P01..57P03 (the server is shutting
   * down or the backend was terminated) mean the connection is going away:
   * report them as CONNECTION, like a dropped socket. */
  int lost = state && (strncmp(state, "08", 2) == 0 || strncmp(state, "57P0", 4) == 0);
  u->status = lost ? CB_ECONNECTION : CB_EDATABASE;
  u->err.code = u->status;
  snprintf(u->err.sqlstate, sizeof u->err.sqlstate, "%s", state ? state : "");
  const char *schema = PQresultErrorField(r, PG_DIAG_SCHEMA_NAME);
  const char *table = PQresultErrorField(r, PG_DIAG_TABLE_NAME);
  snprintf(u->err.table, sizeof u->err.table, "%s%s%s", schema && table ? schema : "", schema && table ? "." : "",
           table ? table : "");
  const char *primary = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
  const char *detail = PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL);
  snprintf(u->err.message, sizeof u->err.message, "%s%s%s", primary ? primary : PQresultErrorMessage(r),
           detail ? ": " : "", detail ? detail : "");
}

/* Hands the server the next piece of a streamed COPY's data (the unit's
 * copy source makes it), and ends the COPY after the last. One piece a
 * call: the loop calls again once the connection has sent it
 * (on_poll), so that the source makes each piece while the server reads
 * the one before, and other connections are served in between. */
static void pump_copy(cb_conn *conn) {
  PGconn *pg = conn->pg;
  cb_unit *u = conn->copying;
  const char *data = NULL;
  size_t len = 0;
  int more = u->copy_source(u->copy_arg, conn->copy_next, u->results[0], &data, &len);
  if (more == CB__COPY_LATER) { /* the caller has not handed over what it is made of yet */
    conn->copy_streaming = 0;
    conn->copy_waiting = 1;
    flush(conn);
    return;
  }
  int ok = more < 0 || len == 0 || PQputCopyData(pg, data, (int)len) == 1;
  if (ok && more <= 0) {
    conn->copy_streaming = 0;
    conn->copy_next++;
    ok = PQputCopyEnd(pg, more < 0 ? "the data for this COPY could not be made" : NULL) == 1;
  }
  if (!ok) {
    conn_broken(conn, PQerrorMessage(pg));
    return;
  }
  flush(conn);
}

/* The answers to a COPY unit: each COPY ... FROM STDIN gets its data from
 * the unit's copy source, or else the unit's next parameter (none left:
 * the COPY is ended with an error); the first error is kept, and so is the
 * first result with rows (the statement's result, for the copy source);
 * when the query is done the connection goes back to pipeline mode and the
 * unit completes. */
static void read_copy_results(cb_conn *conn) {
  PGconn *pg = conn->pg;
  cb_unit *u = conn->copying;
  /* While a COPY takes data libpq answers each PQgetResult with another
   * COPY_IN; a server error waits in libpq until the COPY is ended. */
  if (conn->copy_streaming || conn->copy_waiting) return;
  while (!PQisBusy(pg)) {
    PGresult *r = PQgetResult(pg);
    if (r == NULL) {
      conn->copying = NULL;
      conn->units_in_flight--;
      int back = PQenterPipelineMode(pg) == 1;
      cb__unit_complete(u, CB_OK, NULL);
      if (!back) conn_broken(conn, PQerrorMessage(pg));
      return;
    }
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_FATAL_ERROR) record_error(u, r);
    if (st == PGRES_TUPLES_OK && u->results[0] == NULL) u->results[0] = r;
    else PQclear(r);
    if (st != PGRES_COPY_IN) continue;
    if (u->copy_source) {
      conn->copy_streaming = 1;
      pump_copy(conn);
      return; /* on_poll pumps the rest, then reads on */
    }
    const unit_stmt *s = &u->stmts[0];
    int ok;
    if (conn->copy_next < s->nparams) {
      size_t off = u->param_offsets[s->params + (size_t)conn->copy_next++];
      const char *data = off == PARAM_NULL ? "" : u->arena + off;
      /* Nonblocking libpq queues it all, growing its buffer; flush sends it
       * as the socket takes it. */
      ok = PQputCopyData(pg, data, (int)strlen(data)) == 1 && PQputCopyEnd(pg, NULL) == 1;
    } else {
      ok = PQputCopyEnd(pg, "no data was given for this COPY") == 1;
    }
    if (!ok) {
      conn_broken(conn, PQerrorMessage(pg));
      return;
    }
    flush(conn);
    if (conn->pg == NULL) return;
  }
}

static void read_results(cb_conn *conn) {
  PGconn *pg = conn->pg;
  if (conn->copying) {
    read_copy_results(conn);
    return;
  }
  while (conn->slot_count && !PQisBusy(pg)) {
    PGresult *r = PQgetResult(pg);
    pipe_slot *s = head_slot(conn);
    if (s->kind == SLOT_SYNC || s->kind == SLOT_PREPARE_SYNC) {
      if (r == NULL) continue; /* tolerated: nothing owed between results */
      ExecStatusType st = PQresultStatus(r);
      PQclear(r);
      if (st != PGRES_PIPELINE_SYNC) continue;
      int kind = s->kind;
      cb_unit *u = s->unit;
      pop_slot(conn);
      if (kind == SLOT_SYNC) {
        conn->units_in_flight--;
        cb__unit_complete(u, CB_OK, NULL);
      }
      continue;
    }
    if (r == NULL) { /* end of this command's results */
      pop_slot(conn);
      continue;
    }
    ExecStatusType st = PQresultStatus(r);
    cb_unit *u = s->unit;
    if (st == PGRES_FATAL_ERROR) record_error(u, r);
    if (s->kind == SLOT_PREPARE && st != PGRES_COMMAND_OK) cache_forget(conn, cb__stmt_sql(u, &u->stmts[s->index]));
    if (s->kind == SLOT_STMT && (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)) {
      if (u->results[s->index]) PQclear(u->results[s->index]);
      u->results[s->index] = r;
    } else {
      PQclear(r);
    }
  }
}

static void read_notifications(cb_conn *conn) {
  PGnotify *n;
  while ((n = PQnotifies(conn->pg)) != NULL) {
    cb_hub_notify(conn->rt->hub, n->relname);
    if (n->extra && n->extra[0]) { /* a payload names what changed: "<channel>:<payload>" */
      char key[256];
      snprintf(key, sizeof key, "%s:%s", n->relname, n->extra);
      cb_hub_notify(conn->rt->hub, key);
    }
    notify_watches(conn->rt, n->relname);
    PQfreemem(n);
  }
}

static void on_poll(uv_poll_t *handle, int status, int events) {
  cb_conn *conn = handle->data;
  if (conn->state == CONN_CONNECTING) {
    continue_connect(conn);
    return;
  }
  if (status < 0) { /* libpq usually knows better what happened to its socket */
    const char *why = conn->pg ? PQerrorMessage(conn->pg) : "";
    conn_broken(conn, why && *why ? why : uv_strerror(status));
    return;
  }
  if (events & UV_READABLE) {
    if (!PQconsumeInput(conn->pg)) {
      conn_broken(conn, PQerrorMessage(conn->pg));
      return;
    }
    read_results(conn);
    if (conn->pg == NULL) return;
    read_notifications(conn);
    if (PQstatus(conn->pg) == CONNECTION_BAD) {
      conn_broken(conn, PQerrorMessage(conn->pg));
      return;
    }
    /* A COPY unit waits at the head of the queue for a connection with
     * nothing in flight: this one may just have become one. */
    if (conn->units_in_flight == 0 && conn->index >= 0 && conn->rt->pending_head) cb__dispatch(conn->rt);
    if (conn->pg == NULL) return;
  }
  if (conn->want_write || (events & UV_WRITABLE)) flush(conn);
  if (conn->pg && conn->copy_streaming && !conn->want_write) {
    pump_copy(conn);
    /* Its last piece ended the COPY: the answers may be in already. */
    if (conn->pg && !conn->copy_streaming && PQconsumeInput(conn->pg)) read_results(conn);
  }
}

void cb__resume_copies(cb_runtime *rt) {
  for (int i = 0; i < rt->nconns; i++) {
    cb_conn *c = &rt->conns[i];
    if (c->pg == NULL || !c->copy_waiting) continue;
    c->copy_waiting = 0;
    c->copy_streaming = 1;
    watch_ready(c); /* writable: on_poll pumps */
  }
}

void cb__conn_shutdown(cb_conn *conn) {
  fail_in_flight(conn, CB_ECLOSED, "the runtime was closed");
  poll_close(conn);
  forget_session(conn);
  conn->state = CONN_IDLE;
  uv_timer_stop(&conn->timer);
  uv_close((uv_handle_t *)&conn->timer, NULL);
}

/* ---- the send connection ------------------------------------------------------
 *
 * A single send waits for the server's answer whichever thread talks to the
 * server; through the loop it also waits for two thread hand-overs (the
 * caller wakes the loop thread, which writes the send; the answer wakes the
 * loop thread, which wakes the caller), each a sleep and a wake-up that cost
 * more than the send's own work on the client (most of a caller's CPU for
 * a send, on a two-core virtual machine). So sends run from the caller's own
 * thread on a connection of their own, the runtime's send connection: the
 * caller writes the unit and waits on the socket itself. One caller at a
 * time (direct_lock); bus.c keeps its groups (one out at a time) on it, and
 * sends the rest through the loop. It is made on first use, blocking, with
 * the pool's parameters (its application_name gains ":send"), and made
 * again after it broke; cb_runtime_close closes it. Its statements
 * are prepared as the pool's are (send_unit, read_results: the same slots
 * and cache). */

#define DIRECT_POLL_MS 100   /* how often a send waiting on it looks whether the runtime is closing */
#define DIRECT_RETRY_MS 1000 /* after it could not be made, sends go through the loop this long */

/* Whether cb_runtime_close has begun (read here, not through runtime.c,
 * which calls into this file). */
static int runtime_closing(cb_runtime *rt) {
  pthread_mutex_lock(&rt->lock);
  int closing = rt->closing;
  pthread_mutex_unlock(&rt->lock);
  return closing;
}

static int64_t monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int direct_connect(cb_runtime *rt, cb_conn *conn) {
  char timeout[16], name[80];
  snprintf(timeout, sizeof timeout, "%d", (rt->connect_timeout_ms + 999) / 1000);
  /* Told apart from the pool's in pg_stat_activity (the server keeps 63 bytes). */
  snprintf(name, sizeof name, "%.57s:send", rt->application_name);
  const char *keys[] = {"dbname", "application_name", "connect_timeout", NULL};
  const char *values[] = {rt->conninfo, name, timeout, NULL};
  conn->pg = PQconnectdbParams(keys, values, 1);
  if (conn->pg == NULL || PQstatus(conn->pg) != CONNECTION_OK || PQenterPipelineMode(conn->pg) != 1) {
    if (conn->pg) PQfinish(conn->pg);
    conn->pg = NULL;
    return -1;
  }
  PQsetNoticeReceiver(conn->pg, on_notice, conn);
  conn->rt = rt;
  conn->index = -2;
  conn->state = CONN_READY;
  conn->goodbye = 0;
  return 0;
}

/* Fails what it owes (code, why) and closes it; the next use makes it again. */
static void direct_drop(cb_conn *conn, int code, const char *why) {
  fail_in_flight(conn, code, why);
  conn->units_in_flight = 0;
  forget_session(conn);
  conn->state = CONN_IDLE;
  conn->goodbye = 0;
}

int cb__direct_exec(cb_runtime *rt, cb_unit *const *units, size_t n) {
  if (rt->pid != cb_process_id() || n == 0) return -1;
  if (pthread_mutex_trylock(&rt->direct_lock) != 0) return -1;
  cb_conn *conn = &rt->direct;
  if (runtime_closing(rt)) {
    pthread_mutex_unlock(&rt->direct_lock);
    return -1;
  }
  if (conn->pg && !session_alive(conn)) direct_drop(conn, CB_ECONNECTION, "the send connection was lost");
  /* An unreachable server: one send a while pays for the attempt (up to
   * connect_timeout), the others fail through the loop as they would. */
  if (conn->pg == NULL && monotonic_ms() >= rt->direct_retry_at && direct_connect(rt, conn) < 0)
    rt->direct_retry_at = monotonic_ms() + DIRECT_RETRY_MS;
  if (conn->pg == NULL) {
    pthread_mutex_unlock(&rt->direct_lock);
    return -1;
  }
  int failed = 0, closed = 0;
  for (size_t i = 0; i < n; i++) { /* as runtime.c's chain: each its own transaction */
    cb_unit *u = units[i];
    u->next = NULL;
    u->group_end = 1;
    u->reconnect_tried = 0;
    if (!u->broken) {
      u->status = CB_OK;
      cb_err_clear(&u->err);
    }
    if (failed) { /* never sent: owed a failure like the rest */
      conn->units_in_flight++;
      push_slot(conn, SLOT_SYNC, u, -1);
    } else if (send_unit(conn, u) < 0) {
      failed = 1;
    }
  }
  if (!failed && PQflush(conn->pg) != 0) failed = 1; /* blocking: 0 once all is sent */
  while (!failed && conn->slot_count) {
    struct pollfd p = {.fd = PQsocket(conn->pg), .events = POLLIN};
    int r = poll(&p, 1, DIRECT_POLL_MS);
    if (r < 0 && errno != EINTR) failed = 1;
    else if (r == 0 && runtime_closing(rt)) closed = 1;
    if (r <= 0) {
      if (closed) break;
      continue;
    }
    if (!PQconsumeInput(conn->pg)) failed = 1;
    else read_results(conn);
  }
  if (closed) {
    direct_drop(conn, CB_ECLOSED, "the runtime was closed");
  } else if (failed) {
    char msg[sizeof conn->last_error], full[320];
    failure_reason(rt, PQerrorMessage(conn->pg), msg, sizeof msg);
    snprintf(full, sizeof full, "lost the connection to PostgreSQL: %s", msg);
    direct_drop(conn, CB_ECONNECTION, full);
  }
  pthread_mutex_unlock(&rt->direct_lock);
  return 0;
}

void cb__direct_close(cb_runtime *rt) {
  pthread_mutex_lock(&rt->direct_lock);
  direct_drop(&rt->direct, CB_ECLOSED, "the runtime was closed");
  pthread_mutex_unlock(&rt->direct_lock);
}
