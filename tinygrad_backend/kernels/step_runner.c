// The step runner of step_runner.py: one call runs every kernel a TinyJit captured, in order, on the calling
// thread, instead of tinygrad's CPU queue handing each kernel to its worker thread from Python (a ctypes
// call and a queue hand-off each, ~10 us). A kernel split over several threads (its `core_id` argument)
// runs its share 0 here and shares 1.. on a small pool of threads of ours that stay alive between calls:
// each spins a while for its next share, then sleeps on a condition variable.
//
// Built as a shared library (not a freestanding kernel): it needs pthreads. Every kernel is called with all
// of its arguments as 64-bit integers: pointers, and ints widened (x86-64 SysV and AArch64 read an int from
// the low half of its register or 8-byte stack slot). step_runner.py checks the platform and the
// argument counts before it uses this.
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_ARGS 16
#define MAX_THREADS 64

typedef struct {  // one kernel of a plan (step_runner.py's KERNEL dtype: the same layout)
  uint64_t fn;             // the kernel's code
  int32_t nargs;           // buffer pointers, then int values
  int32_t threads;         // how many shares (core_id 0..threads-1)
  int32_t core_arg;        // which argument is core_id, or -1
  int32_t unused;
  uint64_t args[MAX_ARGS]; // core_id's is 0 here: the calling thread's share
} sr_kernel;

typedef struct {  // a per-call value: vars[var] goes into kernels[kernel].args[arg] (step_runner.py's PATCH)
  int32_t kernel, arg, var, unused;
} sr_patch;

#define T1 uint64_t
#define T2 T1, uint64_t
#define T3 T2, uint64_t
#define T4 T3, uint64_t
#define T5 T4, uint64_t
#define T6 T5, uint64_t
#define T7 T6, uint64_t
#define T8 T7, uint64_t
#define T9 T8, uint64_t
#define T10 T9, uint64_t
#define T11 T10, uint64_t
#define T12 T11, uint64_t
#define T13 T12, uint64_t
#define T14 T13, uint64_t
#define T15 T14, uint64_t
#define T16 T15, uint64_t
#define V1 a[0]
#define V2 V1, a[1]
#define V3 V2, a[2]
#define V4 V3, a[3]
#define V5 V4, a[4]
#define V6 V5, a[5]
#define V7 V6, a[6]
#define V8 V7, a[7]
#define V9 V8, a[8]
#define V10 V9, a[9]
#define V11 V10, a[10]
#define V12 V11, a[11]
#define V13 V12, a[12]
#define V14 V13, a[13]
#define V15 V14, a[14]
#define V16 V15, a[15]
#define CASE(n) case n: ((void (*)(T##n))fn)(V##n); break;

static void call(uint64_t fn, int n, const uint64_t* a) {
  switch (n) {
    case 0: ((void (*)(void))fn)(); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
    default: break;  // step_runner.py never builds one
  }
}

static inline uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

typedef struct {
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t wake, finished;
  _Atomic uint64_t posted, completed;  // shares handed to this thread so far, and finished so far
  _Atomic int sleeping, waiting;       // it sleeps for its next share; the caller sleeps for it to finish
  uint64_t fn;
  int nargs;
  uint64_t args[MAX_ARGS];
} worker;

static worker workers[MAX_THREADS];
static int started;  // workers running in this process
static pid_t owner;  // the process that started them: a forked child has none
static _Atomic int64_t spin_ns = 50000;
static _Atomic int yielding = 0;  // 1: spin with sched_yield after the first rounds (measured a little slower)
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;

// Wait until *value >= target: spin for up to spin_ns (yielding the core as it spins, if `yielding`), then
// sleep on `cond` with *flag set so the other side knows to signal. (Sequentially consistent stores and loads:
// the waiter stores the flag then loads the value, the notifier stores the value then loads the flag, so one
// of them sees the other's store.)
static void await_value(worker* w, _Atomic uint64_t* value, uint64_t target, _Atomic int* flag, pthread_cond_t* cond) {
  if (atomic_load(value) >= target) return;
  const int64_t limit = atomic_load_explicit(&spin_ns, memory_order_relaxed);
  if (limit > 0) {
    const uint64_t start = now_ns();
    const int yield = atomic_load_explicit(&yielding, memory_order_relaxed);
    for (unsigned i = 1;; i++) {
      if (atomic_load(value) >= target) return;
      if (i <= 64) {  // the first rounds only pause: a share often ends within a microsecond or two
        relax();
        continue;
      }
      if (yield) sched_yield(); else relax();
      if ((yield || (i & 63) == 0) && now_ns() - start >= (uint64_t)limit) break;
    }
  }
  pthread_mutex_lock(&w->lock);
  atomic_store(flag, 1);
  while (atomic_load(value) < target) pthread_cond_wait(cond, &w->lock);
  atomic_store(flag, 0);
  pthread_mutex_unlock(&w->lock);
}

static void notify_value(worker* w, _Atomic uint64_t* value, uint64_t v, _Atomic int* flag, pthread_cond_t* cond) {
  atomic_store(value, v);
  if (atomic_load(flag)) {
    pthread_mutex_lock(&w->lock);
    pthread_cond_signal(cond);
    pthread_mutex_unlock(&w->lock);
  }
}

static void* worker_main(void* arg) {
  worker* w = (worker*)arg;
  for (uint64_t seen = 1;; seen++) {
    await_value(w, &w->posted, seen, &w->sleeping, &w->wake);
    call(w->fn, w->nargs, w->args);
    notify_value(w, &w->completed, seen, &w->waiting, &w->finished);
  }
  return NULL;
}

// make sure `count` workers run in this process; 0 when they do
static int start_workers(int count) {
  if (owner != getpid()) {  // first use, or a forked child: the parent's threads are not here
    started = 0;
    owner = getpid();
  }
  if (count > MAX_THREADS) return -1;
  for (; started < count; started++) {
    worker* w = &workers[started];
    memset(w, 0, sizeof *w);
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->wake, NULL);
    pthread_cond_init(&w->finished, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 8u << 20);  // as a Python thread on Linux: our kernels keep rows on their stack
    const int failed = pthread_create(&w->thread, &attr, worker_main, w);
    pthread_attr_destroy(&attr);
    if (failed) return -1;
    pthread_detach(w->thread);
  }
  return 0;
}

static void run_kernel(const sr_kernel* k) {
  const int shares = k->threads;
  for (int i = 1; i < shares; i++) {
    worker* w = &workers[i - 1];
    w->fn = k->fn;
    w->nargs = k->nargs;
    memcpy(w->args, k->args, sizeof(uint64_t) * (size_t)k->nargs);
    if (k->core_arg >= 0) w->args[k->core_arg] = (uint64_t)i;
    notify_value(w, &w->posted, atomic_load(&w->posted) + 1, &w->sleeping, &w->wake);
  }
  call(k->fn, k->nargs, k->args);
  for (int i = 1; i < shares; i++) {
    worker* w = &workers[i - 1];
    await_value(w, &w->completed, atomic_load(&w->posted), &w->waiting, &w->finished);
  }
}

// How long a worker (and the caller) spins before it sleeps, in ns (0: always sleep); whether it yields as it
// spins. (For measuring: step_runner.py sets the spin it was measured best with.)
void sr_set_spin(int64_t ns) { atomic_store(&spin_ns, ns < 0 ? 0 : ns); }
void sr_set_yield(int on) { atomic_store(&yielding, on); }

// Run kernels[0..n) in order, each kernel's vars patched in first. `ns`, when not NULL, has n + 1 counters:
// each kernel's time (from its start to its last share's end) is added to its own and to ns[n].
// 0 when done; -1 when the threads a kernel asks for could not be started (nothing ran).
int sr_run(sr_kernel* kernels, int32_t n, const sr_patch* patches, int32_t npatches, const int64_t* vars, int64_t* ns) {
  int most = 1;
  for (int32_t i = 0; i < n; i++) most = kernels[i].threads > most ? kernels[i].threads : most;
  pthread_mutex_lock(&run_lock);
  if (start_workers(most - 1) != 0) {
    pthread_mutex_unlock(&run_lock);
    return -1;
  }
  for (int32_t i = 0; i < npatches; i++) kernels[patches[i].kernel].args[patches[i].arg] = (uint64_t)vars[patches[i].var];
  if (ns == NULL) {
    for (int32_t i = 0; i < n; i++) run_kernel(&kernels[i]);
  } else {
    for (int32_t i = 0; i < n; i++) {
      const uint64_t start = now_ns();
      run_kernel(&kernels[i]);
      const int64_t took = (int64_t)(now_ns() - start);
      ns[i] += took;
      ns[n] += took;
    }
  }
  pthread_mutex_unlock(&run_lock);
  return 0;
}
