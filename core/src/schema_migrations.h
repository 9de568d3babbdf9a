/* commandbus: the compiled-in schema migrations (generated from core/sql). */
#ifndef COMMANDBUS_SCHEMA_MIGRATIONS_H
#define COMMANDBUS_SCHEMA_MIGRATIONS_H

typedef struct cb_migration {
  int version;
  const char *name;
  const char *sql;
} cb_migration;

extern const cb_migration cb_migrations[];
extern const int cb_migrations_count;

#endif
