/* commandbus: the engine of a runner, driven the same way whatever the
 * runner is (a worker, a reply router).
 *
 * A runner reads its queue on the runtime's loop thread and routes what it
 * read to lanes, threads of the caller's that take the work, handle it and
 * hand it back. Both kinds share that cycle (the engine); these functions
 * start, stop and watch it, for code that drives either kind alike (the Lua
 * binding's run(), start(), stop(), health() and close()), and the only
 * way to run either. cb_worker_engine and cb_reply_router_engine give a
 * runner's engine; it lives as long as its runner. */
#ifndef COMMANDBUS_ENGINE_H
#define COMMANDBUS_ENGINE_H

#include "commandbus/error.h"
#include "commandbus/runner.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_engine cb_engine;

int cb_engine_lanes(const cb_engine *e);
const char *cb_engine_domain(const cb_engine *e);

/* Makes SIGINT and SIGTERM stop the runner while it runs (they end the
 * process again once it stopped). Call before cb_engine_start. */
void cb_engine_watch_signals(cb_engine *e);
/* Starts fetching. While it runs, the runner is registered (runner.h):
 * metrics see its health, and its heartbeats tell other processes. */
int cb_engine_start(cb_engine *e, cb_err *err);
/* Asks the runner to stop: no more fetching; what lanes hold is finished
 * and recorded (the drain), then the lanes get their end. Any thread, signal
 * watchers included; idempotent. */
void cb_engine_stop(cb_engine *e);
/* Blocks until the runner has stopped and drained (timeout_ms -1: no
 * limit); 1 when so, 0 when the timeout passed. */
int cb_engine_wait(cb_engine *e, int timeout_ms);
/* A live snapshot of the runner's health: kind, domain, lanes, state,
 * in-flight count and its kind's counters (any thread). */
void cb_engine_report(cb_engine *e, cb_runner_stat *stat);

#ifdef __cplusplus
}
#endif
#endif
