/* commandbus: UUIDs. Generated ids are version 7 (time-ordered), so that
 * fresh rows land at the right edge of the indexes and keep them warm. */
#ifndef COMMANDBUS_UUID_H
#define COMMANDBUS_UUID_H

#ifdef __cplusplus
extern "C" {
#endif

#define CB_UUID_LEN 36

/* Writes a new UUIDv7, lower-case and hyphenated, into out (37 bytes). */
void cb_uuid_v7(char out[CB_UUID_LEN + 1]);

/* 1 when s is a UUID in the 8-4-4-4-12 hex form; writes its lower-case form
 * into out (may be NULL). */
int cb_uuid_parse(const char *s, char out[CB_UUID_LEN + 1]);

#ifdef __cplusplus
}
#endif
#endif
