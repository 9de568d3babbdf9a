/* commandbus: error codes and messages. */
#include "commandbus/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *cb_strerror(int code) {
  switch (code) {
    case CB_OK: return "OK";
    case CB_EINVAL: return "INVALID_ARGUMENT";
    case CB_ECONNECTION: return "CONNECTION";
    case CB_ECLOSED: return "CLOSED";
    case CB_EDEADLOCK: return "DEADLOCK";
    case CB_EDATABASE: return "DATABASE";
    case CB_ETIMEOUT: return "TIMEOUT";
    case CB_ENOTFOUND: return "NOT_FOUND";
    case CB_EDUPLICATE: return "DUPLICATE_COMMAND";
    case CB_ENOMEM: return "NO_MEMORY";
    case CB_ESTATE: return "INVALID_STATE";
    case CB_EINTERNAL: return "INTERNAL";
    default: return "UNKNOWN";
  }
}

int cb_err_set(cb_err *err, int code, const char *fmt, ...) {
  if (err == NULL) return code;
  err->code = code;
  err->sqlstate[0] = '\0';
  err->table[0] = '\0';
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof err->message, fmt, ap);
  va_end(ap);
  return code;
}

void cb_err_clear(cb_err *err) {
  if (err == NULL) return;
  err->code = CB_OK;
  err->sqlstate[0] = '\0';
  err->table[0] = '\0';
  err->message[0] = '\0';
}
