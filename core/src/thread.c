/* commandbus: starting the library's own threads (see thread.h). */
#include "commandbus/thread.h"

#include <signal.h>

int cb_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg) {
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  int rc = pthread_create(thread, NULL, fn, arg);
  pthread_sigmask(SIG_SETMASK, &previous, NULL);
  return rc;
}
