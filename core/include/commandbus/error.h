/* commandbus: errors shared by every component of the core.
 *
 * Every fallible function returns CB_OK (0) or a negative cb_code, and fills
 * an optional cb_err with the same code, the SQLSTATE when PostgreSQL gave
 * one, and a message a person can act on. cb_strerror() names a code with
 * the stable string the Lua API exposes as err.code. */
#ifndef COMMANDBUS_ERROR_H
#define COMMANDBUS_ERROR_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cb_code {
  CB_OK = 0,
  CB_EINVAL = -1,      /* INVALID_ARGUMENT: the caller passed something unusable */
  CB_ECONNECTION = -2, /* CONNECTION: no usable connection to PostgreSQL */
  CB_ECLOSED = -3,     /* CLOSED: the runtime (bus) was closed */
  CB_EDEADLOCK = -4,   /* DEADLOCK: a blocking call from the loop thread */
  CB_EDATABASE = -5,   /* DATABASE: PostgreSQL reported an error (sqlstate set) */
  CB_ETIMEOUT = -6,    /* TIMEOUT: a wait ran out */
  CB_ENOTFOUND = -7,   /* NOT_FOUND: no such command, process, queue... */
  CB_EDUPLICATE = -8,  /* DUPLICATE_COMMAND: (domain, command id) exists */
  CB_ENOMEM = -9,      /* NO_MEMORY */
  CB_ESTATE = -10,     /* INVALID_STATE: the record is not in a state allowing it */
  CB_EINTERNAL = -11   /* INTERNAL: a broken invariant; please report it */
} cb_code;

#define CB_ERR_MESSAGE_MAX 512

typedef struct cb_err {
  int code;         /* a cb_code */
  char sqlstate[6]; /* "" unless PostgreSQL gave one */
  char table[128];  /* "schema.table" the error names (a violated
                       constraint's table), "" when none */
  char message[CB_ERR_MESSAGE_MAX];
} cb_err;

/* The stable name of a code ("INVALID_ARGUMENT", ...); never NULL. */
const char *cb_strerror(int code);

/* Fills err (which may be NULL) and returns code, so that a caller can write
 * `return cb_err_set(err, CB_EINVAL, "bad name `%s`", name);`. */
int cb_err_set(cb_err *err, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Clears err to CB_OK (err may be NULL). */
void cb_err_clear(cb_err *err);

#ifdef __cplusplus
}
#endif
#endif
