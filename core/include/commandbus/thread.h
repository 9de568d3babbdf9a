/* commandbus: starting the library's own threads.
 *
 * Every thread commandbus starts (a runtime's loop thread, worker and router
 * lanes, the reply router's fetcher) starts with every signal blocked. The
 * host's signal handlers (nginx's, a script's SIGINT) then always run on the
 * host's own threads, whose system calls they are meant to interrupt: a
 * signal taken by a library thread would leave nginx asleep in epoll_wait,
 * never noticing its quit or reload. */
#ifndef COMMANDBUS_THREAD_H
#define COMMANDBUS_THREAD_H

#include <pthread.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* pthread_create (default attributes) with every signal blocked in the new
 * thread; the caller's mask is left as it was. Returns pthread_create's. */
int cb_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg);

/* getpid(), without its system call after the first: the id is kept, and a
 * fork's child (pthread_atfork) looks its own up again. Every call on a
 * runtime asks whether it is in the process that made it (a send asked
 * five times, each a system call of about 2 us on a virtual machine). */
pid_t cb_process_id(void);

#ifdef __cplusplus
}
#endif
#endif
