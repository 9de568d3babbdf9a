/* commandbus: the change hub, a version counter per key.
 *
 * A waiter subscribes to a key *before* it reads the state it waits on, then
 * waits for the key's version to move past the one it saw: a change that lands
 * between the read and the wait is never lost. Every component that changes
 * state (and the listener connection, for PostgreSQL notifications) calls
 * cb_hub_notify. A key lives in the hub only while it has subscribers, so the
 * hub does not grow with the keys it has seen. All functions are safe from any
 * thread. */
#ifndef COMMANDBUS_HUB_H
#define COMMANDBUS_HUB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cb_hub cb_hub;
typedef struct cb_hub_sub cb_hub_sub;

cb_hub *cb_hub_new(void);
/* Frees the hub. No subscription may outlive it. */
void cb_hub_free(cb_hub *hub);

/* Subscribes to key (copied); NULL when out of memory. The subscription
 * starts at the key's current version. Owned by the caller, which releases it
 * with cb_hub_unsubscribe; one thread at a time may wait on it. */
cb_hub_sub *cb_hub_subscribe(cb_hub *hub, const char *key);
void cb_hub_unsubscribe(cb_hub_sub *sub);

/* The version the subscription has seen so far. */
uint64_t cb_hub_sub_version(const cb_hub_sub *sub);

/* Waits until the key's version differs from the one the subscription has
 * seen, or timeout_ms passes (negative: no limit). Returns 1 when it moved
 * (and records the new version), 0 on timeout, CB_ECLOSED once the hub is
 * closed. */
int cb_hub_wait(cb_hub_sub *sub, int timeout_ms);

/* ---- armed subscriptions ------------------------------------------------------ */

/* A waiter that would, once woken, only hand the loop thread a read can
 * instead arm its subscription with that hand-over: the thread that bumps the
 * key (the loop thread, for a notification) makes it at once, and the
 * waiter sleeps until the read is back. Each hop between threads costs a
 * wake-up, which on a busy machine waits for a CPU. */
typedef void (*cb_hub_fire_fn)(void *arg);
/* Arms sub: the next bump of its key calls fn(arg) once, on the bumping
 * thread, outside the hub's lock, and the subscription counts that change as
 * seen. Returns 0 when armed; 1 without arming when the key moved since the
 * subscription last looked (that change is now seen, as by cb_hub_wait);
 * CB_ECLOSED once the hub is closed. fn must not wait for the armed
 * subscription's owner, and may call the hub. Arming an armed subscription
 * leaves it as it is. */
int cb_hub_arm(cb_hub_sub *sub, cb_hub_fire_fn fn, void *arg);
/* Disarms sub: 0 when it was still armed (fn will not be called), 1 when a
 * bump took it first (fn has been or is being called). Unsubscribing disarms
 * too. */
int cb_hub_disarm(cb_hub_sub *sub);

/* Bumps key's version, wakes its waiters and fires its armed subscriptions
 * (once the hub's lock is let go); a key without subscribers costs one
 * lookup and is not stored. */
void cb_hub_notify(cb_hub *hub, const char *key);

/* Bumps every key (after a lost notification connection, say: anything may
 * have changed). */
void cb_hub_notify_all(cb_hub *hub);

/* Wakes every waiter for good: waits return CB_ECLOSED from now on. */
void cb_hub_close(cb_hub *hub);

/* Number of keys currently held (those with subscribers). */
size_t cb_hub_size(cb_hub *hub);

/* ---- record changes ------------------------------------------------------------ */

/* A change of a record (a command, a process) bumps one key per id:
 * "commandbus_await:<domain>:<id>". Across processes the same change
 * arrives as NOTIFY commandbus_await '<domain>:<id>', which the runtime's
 * listener turns into a bump of that very key. */
#define CB_HUB_CHANGE_CHANNEL "commandbus_await"
#define CB_HUB_KEY_MAX 128
void cb_hub_change_key(const char *domain, const char *id, char *out /* CB_HUB_KEY_MAX bytes */);
/* Wakes this process's waiters on the record (a hash probe when there are
 * none): every writer calls it after the change committed. */
void cb_hub_changed(cb_hub *hub, const char *domain, const char *id);
/* Subscriptions to record-change keys now: the threads awaiting a command,
 * a process or an event. */
size_t cb_hub_record_waiters(cb_hub *hub);

#ifdef __cplusplus
}
#endif
#endif
