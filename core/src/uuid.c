/* commandbus: UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random
 * bits; within one millisecond a per-process counter in the high random bits
 * keeps ids from one process increasing. The random bits come from a pool
 * filled by one getrandom call for many ids (a send_batch makes two ids a
 * command); a forked child empties its copy of the pool, so that parent and
 * child never hand out the same bits. */
#include "commandbus/uuid.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t last_ms;
static uint16_t counter;        /* 12 bits: rand_a */
static unsigned char pool[640]; /* [lock] random bytes, 10 an id */
static size_t pool_left;        /* [lock] unused bytes at the end of pool */
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void) { pthread_mutex_lock(&lock); }
static void fork_parent(void) { pthread_mutex_unlock(&lock); }
static void fork_child(void) {
  pool_left = 0;
  pthread_mutex_unlock(&lock);
}
static void watch_forks(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* Takes n random bytes from the pool, refilling it when it runs short;
 * [lock] held. Returns 0 when the system gave none. */
static int take_random(unsigned char *out, size_t n) {
  if (pool_left < n) {
    if (getrandom(pool, sizeof pool, 0) != (ssize_t)sizeof pool) return 0;
    pool_left = sizeof pool;
  }
  memcpy(out, pool + sizeof pool - pool_left, n);
  memset(pool + sizeof pool - pool_left, 0, n); /* used bits never linger */
  pool_left -= n;
  return 1;
}

void cb_uuid_v7(char out[CB_UUID_LEN + 1]) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
  unsigned char r[10];
  pthread_once(&fork_once, watch_forks);
  pthread_mutex_lock(&lock);
  if (!take_random(r, sizeof r)) {
    /* Never expected; fall back on the clock's nanoseconds. */
    for (size_t i = 0; i < sizeof r; i++) r[i] = (unsigned char)(ts.tv_nsec >> (i % 4 * 8));
  }
  if (ms > last_ms) {
    last_ms = ms;
    counter = (uint16_t)(((r[0] << 8) | r[1]) & 0x07ff); /* leave room to count up */
  } else {
    ms = last_ms;
    counter = (uint16_t)((counter + 1) & 0x0fff);
    if (counter == 0) last_ms = ++ms; /* 4096 ids in one ms: borrow the next ms */
  }
  uint16_t rand_a = counter;
  pthread_mutex_unlock(&lock);

  unsigned char b[16];
  for (int i = 0; i < 6; i++) b[i] = (unsigned char)(ms >> (40 - 8 * i));
  b[6] = (unsigned char)(0x70 | ((rand_a >> 8) & 0x0f));
  b[7] = (unsigned char)(rand_a & 0xff);
  b[8] = (unsigned char)(0x80 | (r[2] & 0x3f));
  memcpy(b + 9, r + 3, 7);
  static const char hex[] = "0123456789abcdef";
  char *p = out;
  for (int i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) *p++ = '-';
    *p++ = hex[b[i] >> 4];
    *p++ = hex[b[i] & 15];
  }
  *p = '\0';
}

int cb_uuid_parse(const char *s, char out[CB_UUID_LEN + 1]) {
  if (s == NULL || strlen(s) != CB_UUID_LEN) return 0;
  for (int i = 0; i < CB_UUID_LEN; i++) {
    char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return 0;
    } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
      return 0;
    }
    if (out) out[i] = (c >= 'A' && c <= 'F') ? (char)(c - 'A' + 'a') : c;
  }
  if (out) out[CB_UUID_LEN] = '\0';
  return 1;
}
