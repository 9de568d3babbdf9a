/* commandbus: starting the library's own threads (see thread.h). */
#include "commandbus/thread.h"

#include <signal.h>
#include <unistd.h>

int cb_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg) {
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  int rc = pthread_create(thread, NULL, fn, arg);
  pthread_sigmask(SIG_SETMASK, &previous, NULL);
  return rc;
}

/* 0 until asked, and again in a fork's child. A process made without
 * fork() (clone, vfork) runs no handler, but such a child only execs. */
static pid_t own_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void forgotten_in_child(void) { __atomic_store_n(&own_pid, 0, __ATOMIC_RELAXED); }
static void watch_forks(void) { pthread_atfork(NULL, NULL, forgotten_in_child); }

pid_t cb_process_id(void) {
  pid_t pid = __atomic_load_n(&own_pid, __ATOMIC_RELAXED);
  if (pid != 0) return pid;
  pthread_once(&pid_once, watch_forks);
  pid = getpid();
  __atomic_store_n(&own_pid, pid, __ATOMIC_RELAXED);
  return pid;
}
