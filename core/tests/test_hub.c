/* The change hub (no database): wake-ups, timeouts, lost wake-ups, key
 * lifetime, many waiters, notify_all, close, and a concurrent stress that
 * TSan runs too. Waits that should end at once have generous bounds
 * (seconds) that a correct hub meets in microseconds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "commandbus/error.h"
#include "commandbus/hub.h"

/* ------------------------------------------------------------ helpers */

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static cb_hub *hub_new(void) {
  cb_hub *hub = cb_hub_new();
  assert_non_null(hub);
  return hub;
}

static cb_hub_sub *subscribe(cb_hub *hub, const char *key) {
  cb_hub_sub *sub = cb_hub_subscribe(hub, key);
  assert_non_null(sub);
  return sub;
}

/* One thread blocked in cb_hub_wait on its own subscription. */
typedef struct waiter {
  cb_hub_sub *sub;
  int timeout_ms;
  pthread_barrier_t *started; /* optional: crossed before waiting */
  int rc;
  double elapsed;
} waiter;

static void *run_waiter(void *arg) {
  waiter *w = arg;
  if (w->started) pthread_barrier_wait(w->started);
  double t0 = now_seconds();
  w->rc = cb_hub_wait(w->sub, w->timeout_ms);
  w->elapsed = now_seconds() - t0;
  return NULL;
}

/* ------------------------------------------------------------ tests */

static void a_notify_after_subscribe_wakes_a_waiting_thread(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *sub = subscribe(hub, "orders");
  uint64_t before = cb_hub_sub_version(sub);
  waiter w = {sub, 60 * 1000, NULL, -100, 0};
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, run_waiter, &w), 0);
  sleep_ms(50); /* most likely blocked by now; either way it must wake */
  cb_hub_notify(hub, "orders");
  pthread_join(t, NULL);
  assert_int_equal(w.rc, 1);
  assert_true(w.elapsed < 10.0); /* released, not timed out */
  assert_true(cb_hub_sub_version(sub) != before);
  cb_hub_unsubscribe(sub);
  cb_hub_free(hub);
}

static void a_wait_with_nothing_changing_times_out_with_zero(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *sub = subscribe(hub, "quiet");
  cb_hub_notify(hub, "another_key"); /* other keys do not wake it */
  uint64_t before = cb_hub_sub_version(sub);
  double t0 = now_seconds();
  assert_int_equal(cb_hub_wait(sub, 100), 0);
  assert_true(now_seconds() - t0 >= 0.09);
  assert_int_equal(cb_hub_wait(sub, 0), 0);
  assert_true(cb_hub_sub_version(sub) == before);
  cb_hub_unsubscribe(sub);
  cb_hub_free(hub);
}

static void a_notify_between_subscribe_and_wait_is_not_lost(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *sub = subscribe(hub, "orders");
  /* The waiter would read its state here; the change lands before it waits. */
  cb_hub_notify(hub, "orders");
  double t0 = now_seconds();
  assert_int_equal(cb_hub_wait(sub, 60 * 1000), 1);
  assert_true(now_seconds() - t0 < 5.0);
  /* The change was consumed: the next wait has nothing new to see. */
  assert_int_equal(cb_hub_wait(sub, 0), 0);
  /* Several changes before a wait are seen as one. */
  cb_hub_notify(hub, "orders");
  cb_hub_notify(hub, "orders");
  assert_int_equal(cb_hub_wait(sub, 0), 1);
  assert_int_equal(cb_hub_wait(sub, 0), 0);
  cb_hub_unsubscribe(sub);
  cb_hub_free(hub);
}

static void a_key_is_held_only_while_it_has_subscribers(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_sub *a1 = subscribe(hub, "a");
  cb_hub_sub *a2 = subscribe(hub, "a");
  cb_hub_sub *b = subscribe(hub, "b");
  assert_int_equal(cb_hub_size(hub), 2); /* one entry per key, not per subscription */
  cb_hub_unsubscribe(a1);
  assert_int_equal(cb_hub_size(hub), 2); /* a2 still holds "a" */
  cb_hub_notify(hub, "a");
  assert_int_equal(cb_hub_wait(a2, 0), 1);
  cb_hub_unsubscribe(a2);
  assert_int_equal(cb_hub_size(hub), 1);
  cb_hub_unsubscribe(b);
  assert_int_equal(cb_hub_size(hub), 0);

  /* Notifying keys nobody listens to stores nothing. */
  char key[32];
  for (int i = 0; i < 1000; i++) {
    snprintf(key, sizeof key, "unknown_%d", i);
    cb_hub_notify(hub, key);
  }
  cb_hub_notify_all(hub);
  assert_int_equal(cb_hub_size(hub), 0);

  /* A key subscribed again after it was dropped works like a new one. */
  cb_hub_sub *again = subscribe(hub, "a");
  assert_int_equal(cb_hub_wait(again, 0), 0);
  cb_hub_notify(hub, "a");
  assert_int_equal(cb_hub_wait(again, 0), 1);
  cb_hub_unsubscribe(again);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

static void sixteen_waiters_on_one_key_all_wake_on_one_notify(void **state) {
  (void)state;
  enum { N = 16 };
  cb_hub *hub = hub_new();
  pthread_barrier_t started;
  pthread_barrier_init(&started, NULL, N + 1);
  waiter w[N];
  pthread_t t[N];
  for (int i = 0; i < N; i++) {
    /* Subscribed here, before the notify below: none can miss it. */
    w[i] = (waiter){subscribe(hub, "shared"), 60 * 1000, &started, -100, 0};
    assert_int_equal(pthread_create(&t[i], NULL, run_waiter, &w[i]), 0);
  }
  assert_int_equal(cb_hub_size(hub), 1);
  pthread_barrier_wait(&started);
  sleep_ms(50);
  cb_hub_notify(hub, "shared");
  for (int i = 0; i < N; i++) {
    pthread_join(t[i], NULL);
    assert_int_equal(w[i].rc, 1);
    assert_true(w[i].elapsed < 10.0);
    cb_hub_unsubscribe(w[i].sub);
  }
  pthread_barrier_destroy(&started);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

static void notify_all_bumps_every_key(void **state) {
  (void)state;
  enum { N = 300 }; /* more than the initial table, so it grows */
  cb_hub *hub = hub_new();
  cb_hub_sub *subs[N];
  char key[32];
  for (int i = 0; i < N; i++) {
    snprintf(key, sizeof key, "key_%d", i);
    subs[i] = subscribe(hub, key);
  }
  assert_int_equal(cb_hub_size(hub), N);
  for (int i = 0; i < N; i++) assert_int_equal(cb_hub_wait(subs[i], 0), 0);
  cb_hub_notify_all(hub);
  for (int i = 0; i < N; i++) assert_int_equal(cb_hub_wait(subs[i], 0), 1);
  /* A plain notify still reaches exactly its key after the table grew. */
  cb_hub_notify(hub, "key_123");
  for (int i = 0; i < N; i++) assert_int_equal(cb_hub_wait(subs[i], 0), i == 123);
  for (int i = 0; i < N; i++) cb_hub_unsubscribe(subs[i]);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

static void closing_the_hub_makes_waits_return_closed(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *forever = subscribe(hub, "forever");
  cb_hub_sub *bounded = subscribe(hub, "bounded");
  waiter w1 = {forever, -1, NULL, -100, 0}; /* no time limit at all */
  waiter w2 = {bounded, 60 * 1000, NULL, -100, 0};
  pthread_t t1, t2;
  assert_int_equal(pthread_create(&t1, NULL, run_waiter, &w1), 0);
  assert_int_equal(pthread_create(&t2, NULL, run_waiter, &w2), 0);
  sleep_ms(50);
  cb_hub_close(hub);
  pthread_join(t1, NULL);
  pthread_join(t2, NULL);
  assert_int_equal(w1.rc, CB_ECLOSED);
  assert_int_equal(w2.rc, CB_ECLOSED);
  assert_true(w2.elapsed < 10.0);
  /* From now on every wait says so at once, even on a new subscription. */
  assert_int_equal(cb_hub_wait(forever, -1), CB_ECLOSED);
  cb_hub_sub *late = subscribe(hub, "late");
  assert_int_equal(cb_hub_wait(late, 60 * 1000), CB_ECLOSED);
  cb_hub_unsubscribe(late);
  cb_hub_unsubscribe(forever);
  cb_hub_unsubscribe(bounded);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

/* ------------------------------------------------------------ stress */

enum { STRESS_THREADS = 8, STRESS_ROUNDS = 3000, STRESS_KEYS = 6 };

typedef struct stress_worker {
  cb_hub *hub;
  int id;
  int failures; /* a notify after subscribe that a wait(0) did not see */
} stress_worker;

/* Each round: subscribe to a key (its own, or one shared by all), notify it,
 * and check that the subscription sees the change; notify another shared key
 * in passing; now and then notify_all; unsubscribe. About 5 hub calls a
 * round, so the eight workers make ~120k operations. */
static void *run_stress_worker(void *arg) {
  stress_worker *s = arg;
  char own[32], shared[32], other[32];
  snprintf(own, sizeof own, "own_%d", s->id);
  for (int i = 0; i < STRESS_ROUNDS; i++) {
    snprintf(shared, sizeof shared, "shared_%d", (i + s->id) % STRESS_KEYS);
    snprintf(other, sizeof other, "shared_%d", (i * 7 + s->id + 1) % STRESS_KEYS);
    const char *key = (i % 2) ? own : shared;
    cb_hub_sub *sub = cb_hub_subscribe(s->hub, key);
    if (sub == NULL) {
      s->failures++;
      continue;
    }
    cb_hub_notify(s->hub, key);
    if (cb_hub_wait(sub, 0) != 1) s->failures++;
    cb_hub_notify(s->hub, other);
    if (i % 97 == 0) cb_hub_notify_all(s->hub);
    if (i % 13 == 0) (void)cb_hub_size(s->hub);
    cb_hub_unsubscribe(sub);
  }
  return NULL;
}

/* A long-lived subscriber on one shared key that keeps waiting while the
 * workers churn, until told to stop. */
typedef struct stress_listener {
  cb_hub_sub *sub;
  atomic_int stop;
  int wakes;
  int errors;
  uint64_t last_version;
  int versions_went_back;
} stress_listener;

static void *run_stress_listener(void *arg) {
  stress_listener *l = arg;
  while (!atomic_load(&l->stop)) {
    int rc = cb_hub_wait(l->sub, 100);
    if (rc == 1) {
      l->wakes++;
      uint64_t v = cb_hub_sub_version(l->sub);
      if (v <= l->last_version) l->versions_went_back++;
      l->last_version = v;
    } else if (rc != 0) {
      l->errors++;
    }
  }
  return NULL;
}

static void many_threads_subscribing_notifying_and_unsubscribing_stay_consistent(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  stress_listener listener;
  listener.sub = subscribe(hub, "shared_0");
  atomic_init(&listener.stop, 0);
  listener.wakes = listener.errors = listener.versions_went_back = 0;
  listener.last_version = cb_hub_sub_version(listener.sub);
  pthread_t lt;
  assert_int_equal(pthread_create(&lt, NULL, run_stress_listener, &listener), 0);

  stress_worker workers[STRESS_THREADS];
  pthread_t t[STRESS_THREADS];
  for (int i = 0; i < STRESS_THREADS; i++) {
    workers[i] = (stress_worker){hub, i, 0};
    assert_int_equal(pthread_create(&t[i], NULL, run_stress_worker, &workers[i]), 0);
  }
  for (int i = 0; i < STRESS_THREADS; i++) {
    pthread_join(t[i], NULL);
    assert_int_equal(workers[i].failures, 0);
  }
  /* Only the listener's key is left. */
  assert_int_equal(cb_hub_size(hub), 1);

  atomic_store(&listener.stop, 1);
  cb_hub_notify(hub, "shared_0");
  pthread_join(lt, NULL);
  assert_int_equal(listener.errors, 0);
  assert_int_equal(listener.versions_went_back, 0);
  /* It saw the churn on its key (or, if never scheduled, the change waits). */
  assert_true(listener.wakes > 0 || cb_hub_wait(listener.sub, 0) == 1);
  cb_hub_unsubscribe(listener.sub);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

/* ------------------------------------------------------------ armed subscriptions */

/* A fire callback that counts its calls and the thread it ran on. */
typedef struct fired_count {
  atomic_int calls;
  pthread_t thread;
} fired_count;

static void count_fire(void *arg) {
  fired_count *f = arg;
  f->thread = pthread_self();
  atomic_fetch_add(&f->calls, 1);
}

static void *notify_key_a(void *arg) {
  cb_hub_notify(arg, "a");
  return NULL;
}

static void an_armed_subscription_fires_once_on_the_notifying_thread_and_sees_the_change(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *sub = subscribe(hub, "a");
  fired_count f;
  atomic_init(&f.calls, 0);
  assert_int_equal(cb_hub_arm(sub, count_fire, &f), 0);
  cb_hub_notify(hub, "b"); /* another key: nothing */
  assert_int_equal(atomic_load(&f.calls), 0);
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, notify_key_a, hub), 0);
  pthread_join(t, NULL);
  assert_int_equal(atomic_load(&f.calls), 1);
  assert_true(pthread_equal(f.thread, t));
  /* The change is seen: a wait now waits for the next one. */
  assert_int_equal(cb_hub_wait(sub, 0), 0);
  /* Fired once: the next notify calls nothing, and disarming says it fired. */
  cb_hub_notify(hub, "a");
  assert_int_equal(atomic_load(&f.calls), 1);
  assert_int_equal(cb_hub_disarm(sub), 1);
  assert_int_equal(cb_hub_wait(sub, 0), 1);
  cb_hub_unsubscribe(sub);
  cb_hub_free(hub);
}

static void arming_after_a_change_returns_one_and_arms_nothing(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *sub = subscribe(hub, "a");
  fired_count f;
  atomic_init(&f.calls, 0);
  cb_hub_notify(hub, "a");
  assert_int_equal(cb_hub_arm(sub, count_fire, &f), 1);
  assert_int_equal(cb_hub_wait(sub, 0), 0); /* that change was taken by the arm */
  cb_hub_notify(hub, "a");
  assert_int_equal(atomic_load(&f.calls), 0);
  cb_hub_unsubscribe(sub);
  cb_hub_free(hub);
}

static void a_disarmed_or_unsubscribed_subscription_is_not_fired(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *one = subscribe(hub, "a"), *two = subscribe(hub, "a"), *three = subscribe(hub, "a");
  fired_count f;
  atomic_init(&f.calls, 0);
  assert_int_equal(cb_hub_arm(one, count_fire, &f), 0);
  assert_int_equal(cb_hub_arm(two, count_fire, &f), 0);
  assert_int_equal(cb_hub_arm(three, count_fire, &f), 0);
  assert_int_equal(cb_hub_disarm(two), 0);
  cb_hub_unsubscribe(three);
  cb_hub_notify(hub, "a");
  assert_int_equal(atomic_load(&f.calls), 1); /* one only */
  assert_int_equal(cb_hub_disarm(one), 1);
  assert_int_equal(cb_hub_wait(two, 0), 1); /* a disarmed one still sees the change */
  cb_hub_unsubscribe(one);
  cb_hub_unsubscribe(two);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

static void notify_all_and_close_fire_armed_subscriptions(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  cb_hub_sub *a = subscribe(hub, "a"), *b = subscribe(hub, "b");
  fired_count f;
  atomic_init(&f.calls, 0);
  assert_int_equal(cb_hub_arm(a, count_fire, &f), 0);
  assert_int_equal(cb_hub_arm(b, count_fire, &f), 0);
  cb_hub_notify_all(hub);
  assert_int_equal(atomic_load(&f.calls), 2);
  assert_int_equal(cb_hub_arm(a, count_fire, &f), 0);
  cb_hub_close(hub);
  assert_int_equal(atomic_load(&f.calls), 3);
  assert_int_equal(cb_hub_arm(b, count_fire, &f), CB_ECLOSED);
  cb_hub_unsubscribe(a);
  cb_hub_unsubscribe(b);
  cb_hub_free(hub);
}

/* A waiter that arms and disarms, again and again, while another thread
 * notifies: a disarm that says "fired" is always followed by exactly one
 * call, one that says "not fired" by none (TSan checks the hand-over). */
enum { ARM_ROUNDS = 20000 };

typedef struct arm_race {
  cb_hub *hub;
  atomic_int stop;
} arm_race;

static void *run_arm_notifier(void *arg) {
  arm_race *r = arg;
  while (!atomic_load(&r->stop)) cb_hub_notify(r->hub, "raced");
  return NULL;
}

static void arming_and_disarming_race_with_notifies_without_losing_a_fire(void **state) {
  (void)state;
  arm_race r;
  r.hub = hub_new();
  atomic_init(&r.stop, 0);
  cb_hub_sub *sub = subscribe(r.hub, "raced");
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, run_arm_notifier, &r), 0);
  int missed = 0;
  for (int i = 0; i < ARM_ROUNDS; i++) {
    fired_count f;
    atomic_init(&f.calls, 0);
    int rc = cb_hub_arm(sub, count_fire, &f);
    if (rc == 1) continue;
    assert_int_equal(rc, 0);
    if (cb_hub_disarm(sub) == 1) {
      /* Fired: the callback runs now or soon, once. */
      double until = now_seconds() + 10;
      while (atomic_load(&f.calls) == 0 && now_seconds() < until) {
      }
      if (atomic_load(&f.calls) != 1) missed++;
    } else if (atomic_load(&f.calls) != 0) {
      missed++;
    }
  }
  atomic_store(&r.stop, 1);
  pthread_join(t, NULL);
  assert_int_equal(missed, 0);
  cb_hub_unsubscribe(sub);
  cb_hub_free(r.hub);
}

/* Two subscriptions fired by one notify, each of whose callbacks
 * unsubscribes the other one: the first to run frees a subscription whose
 * callback is still to come. Each callback still runs once (a fire taken
 * is owed, as cb_hub_disarm says), and the hub reads nothing of a
 * subscription once its callback is owed (ASan and valgrind check). */
typedef struct unsubscribing {
  cb_hub_sub *a, *b; /* the one the first callback unsubscribes becomes NULL */
  int calls_a, calls_b;
} unsubscribing;

static void unsubscribe_the_other(cb_hub_sub **mine, cb_hub_sub **other) {
  if (*mine && *other) { /* the first callback to run */
    cb_hub_unsubscribe(*other);
    *other = NULL;
  }
}

static void fire_a(void *arg) {
  unsubscribing *u = arg;
  u->calls_a++;
  unsubscribe_the_other(&u->a, &u->b);
}

static void fire_b(void *arg) {
  unsubscribing *u = arg;
  u->calls_b++;
  unsubscribe_the_other(&u->b, &u->a);
}

static void a_callback_may_unsubscribe_another_fired_subscription(void **state) {
  (void)state;
  cb_hub *hub = hub_new();
  unsubscribing u = {.a = subscribe(hub, "k"), .b = subscribe(hub, "k")};
  assert_int_equal(cb_hub_arm(u.a, fire_a, &u), 0);
  assert_int_equal(cb_hub_arm(u.b, fire_b, &u), 0);
  cb_hub_notify(hub, "k");
  assert_int_equal(u.calls_a, 1);
  assert_int_equal(u.calls_b, 1);
  assert_true((u.a == NULL) != (u.b == NULL)); /* one unsubscribed the other */
  cb_hub_unsubscribe(u.a ? u.a : u.b);
  assert_int_equal(cb_hub_size(hub), 0);
  cb_hub_free(hub);
}

/* More armed subscriptions on one key than a bump takes at a time: each
 * fires once, on a notify and on notify_all. */
static void a_crowd_of_armed_subscriptions_all_fire_once(void **state) {
  (void)state;
  enum { CROWD = 50 };
  cb_hub *hub = hub_new();
  cb_hub_sub *subs[CROWD];
  fired_count f;
  atomic_init(&f.calls, 0);
  for (int i = 0; i < CROWD; i++) {
    subs[i] = subscribe(hub, i % 2 ? "odd" : "even");
    assert_int_equal(cb_hub_arm(subs[i], count_fire, &f), 0);
  }
  cb_hub_notify(hub, "even");
  assert_int_equal(atomic_load(&f.calls), CROWD / 2);
  cb_hub_notify(hub, "even"); /* none armed there now */
  assert_int_equal(atomic_load(&f.calls), CROWD / 2);
  for (int i = 0; i < CROWD; i += 2) { /* the second notify is a change not yet seen: then armed */
    assert_int_equal(cb_hub_arm(subs[i], count_fire, &f), 1);
    assert_int_equal(cb_hub_arm(subs[i], count_fire, &f), 0);
  }
  cb_hub_notify_all(hub);
  assert_int_equal(atomic_load(&f.calls), CROWD / 2 + CROWD); /* every one, once more */
  for (int i = 0; i < CROWD; i++) cb_hub_unsubscribe(subs[i]);
  cb_hub_free(hub);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(a_notify_after_subscribe_wakes_a_waiting_thread),
      cmocka_unit_test(a_wait_with_nothing_changing_times_out_with_zero),
      cmocka_unit_test(a_notify_between_subscribe_and_wait_is_not_lost),
      cmocka_unit_test(a_key_is_held_only_while_it_has_subscribers),
      cmocka_unit_test(sixteen_waiters_on_one_key_all_wake_on_one_notify),
      cmocka_unit_test(notify_all_bumps_every_key),
      cmocka_unit_test(closing_the_hub_makes_waits_return_closed),
      cmocka_unit_test(many_threads_subscribing_notifying_and_unsubscribing_stay_consistent),
      cmocka_unit_test(an_armed_subscription_fires_once_on_the_notifying_thread_and_sees_the_change),
      cmocka_unit_test(arming_after_a_change_returns_one_and_arms_nothing),
      cmocka_unit_test(a_disarmed_or_unsubscribed_subscription_is_not_fired),
      cmocka_unit_test(notify_all_and_close_fire_armed_subscriptions),
      cmocka_unit_test(arming_and_disarming_race_with_notifies_without_losing_a_fire),
      cmocka_unit_test(a_callback_may_unsubscribe_another_fired_subscription),
      cmocka_unit_test(a_crowd_of_armed_subscriptions_all_fire_once),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
