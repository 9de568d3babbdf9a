/* commandbus: schema migrations.
 *
 * The migrations in core/sql are compiled into the library. cb_schema_setup
 * applies those the database lacks, in order, in one transaction under an
 * advisory lock, recording each in commandbus.schema_migrations; calling it
 * twice, or from two processes at once, is fine. */
#ifndef COMMANDBUS_SCHEMA_H
#define COMMANDBUS_SCHEMA_H

#include "commandbus/error.h"
#include "commandbus/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* *applied (may be NULL) gets how many migrations were applied now. */
int cb_schema_setup(cb_runtime *rt, int *applied, cb_err *err);
/* The newest migration version compiled in. */
int cb_schema_version(void);

#ifdef __cplusplus
}
#endif
#endif
