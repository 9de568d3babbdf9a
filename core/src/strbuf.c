/* commandbus: growable strings and arrays (see strbuf.h). */
#include "strbuf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int reserve(cb_strbuf *b, size_t more) {
  if (b->failed) return -1;
  if (b->len + more + 1 <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + more + 1) cap *= 2;
  char *p = realloc(b->data, cap);
  if (p == NULL) {
    b->failed = 1;
    return -1;
  }
  b->data = p;
  b->cap = cap;
  return 0;
}

void cb_strbuf_reset(cb_strbuf *b) {
  b->len = 0;
  b->failed = 0;
  if (b->data) b->data[0] = '\0';
}

void cb_strbuf_free(cb_strbuf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

void cb_strbuf_putc(cb_strbuf *b, char c) {
  if (reserve(b, 1) < 0) return;
  b->data[b->len++] = c;
  b->data[b->len] = '\0';
}

void cb_strbuf_puts(cb_strbuf *b, const char *s) {
  size_t n = strlen(s);
  if (reserve(b, n) < 0) return;
  memcpy(b->data + b->len, s, n + 1);
  b->len += n;
}

void cb_strbuf_putn(cb_strbuf *b, const void *data, size_t n) {
  if (reserve(b, n) < 0) return;
  memcpy(b->data + b->len, data, n);
  b->len += n;
  b->data[b->len] = '\0';
}

/* Formats into the room the buffer has, and only when that was too small
 * grows it and formats again: most pieces fit, and formatting is the
 * costly part (a worker formats every outcome it acknowledges). */
void cb_strbuf_printf(cb_strbuf *b, const char *fmt, ...) {
  if (b->failed) return;
  size_t room = b->cap - b->len; /* 0 before the first write */
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(room ? b->data + b->len : NULL, room, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= room) {
    if (reserve(b, (size_t)n) < 0) {
      if (b->data) b->data[b->len] = '\0'; /* drop the part that fitted */
      return;
    }
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
  }
  b->len += (size_t)n;
}

void cb_strbuf_put_int(cb_strbuf *b, long long v) {
  char digits[24], *p = digits + sizeof digits;
  unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
  do *--p = (char)('0' + u % 10);
  while (u /= 10);
  if (v < 0) *--p = '-';
  cb_strbuf_putn(b, p, (size_t)(digits + sizeof digits - p));
}

void cb_strbuf_json_string(cb_strbuf *b, const char *s) {
  cb_strbuf_putc(b, '"');
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    switch (*p) {
      case '"': cb_strbuf_puts(b, "\\\""); break;
      case '\\': cb_strbuf_puts(b, "\\\\"); break;
      case '\n': cb_strbuf_puts(b, "\\n"); break;
      case '\r': cb_strbuf_puts(b, "\\r"); break;
      case '\t': cb_strbuf_puts(b, "\\t"); break;
      default:
        if (*p < 0x20) cb_strbuf_printf(b, "\\u%04x", *p);
        else cb_strbuf_putc(b, (char)*p);
    }
  }
  cb_strbuf_putc(b, '"');
}

/* Appends s to out (n bytes there), up to size - 1 bytes in all; the new n. */
static size_t join_part(char *out, size_t size, size_t n, const char *s) {
  size_t len = strlen(s);
  if (len > size - 1 - n) len = size - 1 - n;
  memcpy(out + n, s, len);
  return n + len;
}

void cb_str_join(char *out, size_t size, const char *a, const char *b) {
  if (size == 0) return;
  out[join_part(out, size, join_part(out, size, 0, a), b)] = '\0';
}

void cb_str_int(char out[12], int v) {
  char digits[12], *p = digits + sizeof digits;
  unsigned int u = v < 0 ? 0u - (unsigned int)v : (unsigned int)v;
  *--p = '\0';
  do *--p = (char)('0' + u % 10);
  while (u /= 10);
  if (v < 0) *--p = '-';
  memcpy(out, p, (size_t)(digits + sizeof digits - p));
}

int cb_grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t n = *cap ? *cap : 8;
  while (n < need) {
    if (n > SIZE_MAX / 2) return -1;
    n *= 2;
  }
  if (n > SIZE_MAX / elem) return -1;
  void *q = realloc(*p, n * elem);
  if (q == NULL) return -1;
  *p = q;
  *cap = n;
  return 0;
}
