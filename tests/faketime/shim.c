/* Preloaded before libfaketime by the faketime tier (`make test-faketime`): waits on a monotonic clock go to glibc
 * and the kernel untouched, since FAKETIME_DONT_FAKE_MONOTONIC=1 leaves that clock real. libfaketime 0.9.10 (Debian
 * 12) still shifts those deadlines by the fake offset: clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) fails with
 * EINVAL (libfaketime issue 426; Python 3.11's time.sleep) and pthread_cond_timedwait on a monotonic condition
 * variable waits for the offset (libfaketime pull request 503). And it does not wrap C11 cnd_timedwait at all, so
 * a deadline computed from the faked realtime clock lies 60 days ahead of the real one (librdkafka's timed waits:
 * every list_topics or flush would hang); that deadline is moved back by the fake offset here. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <threads.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_nanosleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);
typedef int (*cond_timedwait_fn)(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem) {
    if (clock_id == CLOCK_MONOTONIC || clock_id == CLOCK_MONOTONIC_RAW || clock_id == CLOCK_BOOTTIME) {
        long rc = syscall(SYS_clock_nanosleep, clock_id, flags, req, rem);
        return rc == 0 ? 0 : errno;
    }
    static clock_nanosleep_fn next;
    if (!next) next = (clock_nanosleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock_id, flags, req, rem);
}

/* glibc keeps a condition variable's clock in bit 0 of __wrefs (1: CLOCK_MONOTONIC). */
int pthread_cond_timedwait(pthread_cond_t *cond, pthread_mutex_t *mutex, const struct timespec *abstime) {
    static cond_timedwait_fn next, libc;
    if (cond->__data.__wrefs & 1) {
        if (!libc) {
            void *handle = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
            libc = (cond_timedwait_fn)dlvsym(handle, "pthread_cond_timedwait", "GLIBC_2.3.2");
        }
        return libc(cond, mutex, abstime);
    }
    if (!next) next = (cond_timedwait_fn)dlvsym(RTLD_NEXT, "pthread_cond_timedwait", "GLIBC_2.3.2");
    return next(cond, mutex, abstime);
}

/* C11 condition variables wait on CLOCK_REALTIME: take the deadline back from the faked clock to the real one. */
int cnd_timedwait(cnd_t *cond, mtx_t *mtx, const struct timespec *deadline) {
    typedef int (*cnd_timedwait_fn)(cnd_t *, mtx_t *, const struct timespec *);
    static cnd_timedwait_fn next;
    if (!next) next = (cnd_timedwait_fn)dlvsym(RTLD_NEXT, "cnd_timedwait", "GLIBC_2.28");
    struct timespec fake, real;
    clock_gettime(CLOCK_REALTIME, &fake); /* through libfaketime */
    syscall(SYS_clock_gettime, CLOCK_REALTIME, &real);
    long long offset_ns = (long long)(fake.tv_sec - real.tv_sec) * 1000000000LL + (fake.tv_nsec - real.tv_nsec);
    long long at_ns = (long long)deadline->tv_sec * 1000000000LL + deadline->tv_nsec - offset_ns;
    struct timespec at = {.tv_sec = at_ns / 1000000000LL, .tv_nsec = at_ns % 1000000000LL};
    return next(cond, mtx, &at);
}
