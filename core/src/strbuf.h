/* commandbus: a growable string for building SQL parameters (JSON text,
 * array literals). Out of memory sets `failed` and further writes are
 * ignored, so callers check once at the end. And growable arrays. */
#ifndef COMMANDBUS_STRBUF_H
#define COMMANDBUS_STRBUF_H

#include <stddef.h>

typedef struct cb_strbuf {
  char *data; /* NUL-terminated once anything was written */
  size_t len, cap;
  int failed;
} cb_strbuf;

void cb_strbuf_reset(cb_strbuf *b);
void cb_strbuf_free(cb_strbuf *b);
void cb_strbuf_putc(cb_strbuf *b, char c);
void cb_strbuf_puts(cb_strbuf *b, const char *s);
/* Appends n bytes, NULs among them (binary data). */
void cb_strbuf_putn(cb_strbuf *b, const void *data, size_t n);
void cb_strbuf_printf(cb_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends v in decimal. */
void cb_strbuf_put_int(cb_strbuf *b, long long v);
/* Appends s as a JSON string literal, quoted and escaped. */
void cb_strbuf_json_string(cb_strbuf *b, const char *s);

/* What snprintf(out, size, "%s%s", a, b) writes (cut short to fit), without
 * reading a format: names built on every send (a queue's, its channel's). */
void cb_str_join(char *out, size_t size, const char *a, const char *b);
/* v in decimal into out (room for 12 bytes), as snprintf "%d" writes it. */
void cb_str_int(char out[12], int v);

/* Makes room for `need` elements of `elem` bytes in the array *p of
 * capacity *cap (which doubles, from 8). 0, or -1 when out of memory (then
 * *p and *cap are unchanged). */
int cb_grow(void **p, size_t *cap, size_t need, size_t elem);

#endif
