/* Live bytes of a process, exactly: every malloc-family block (its usable size) and every private
 * anonymous mapping made through the mmap symbol (Python's 1 MiB object arenas), with a resettable peak.
 * Built and preloaded by benchmarks/memory_phases.py (LD_PRELOAD); read through ctypes:
 * gf_live(), gf_peak(), gf_reset_peak().
 *
 * Why: peak RSS moves in 128 KB steps (the kernel's per-CPU RSS batches, docs/memory.md) and
 * follows where glibc places blocks, so it cannot tell a 20 KB transient from none. These counts
 * are the blocks themselves. glibc's own mmaps for large blocks go through an internal call, not
 * the mmap symbol, so they are counted once, as malloc blocks. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>
#include <sys/mman.h>

static _Atomic long live = 0, peak = 0;

static void add(long n) {
    long now = atomic_fetch_add(&live, n) + n, high = atomic_load(&peak);
    while (now > high && !atomic_compare_exchange_weak(&peak, &high, now)) {}
}

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

void *malloc(size_t n) { void *p = __libc_malloc(n); if (p) add(malloc_usable_size(p)); return p; }
void free(void *p) { if (p) { add(-(long)malloc_usable_size(p)); __libc_free(p); } }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); if (p) add(malloc_usable_size(p)); return p; }
void *realloc(void *old, size_t n) {
    long was = old ? (long)malloc_usable_size(old) : 0;
    void *p = __libc_realloc(old, n);
    if (p) add((long)malloc_usable_size(p) - was); else if (!n) add(-was);
    return p;
}
int posix_memalign(void **out, size_t align, size_t n) {
    void *p = __libc_memalign(align, n);
    if (!p) return 12;  /* ENOMEM */
    add(malloc_usable_size(p));
    *out = p;
    return 0;
}
void *aligned_alloc(size_t align, size_t n) { void *p = __libc_memalign(align, n); if (p) add(malloc_usable_size(p)); return p; }
void *memalign(size_t align, size_t n) { void *p = __libc_memalign(align, n); if (p) add(malloc_usable_size(p)); return p; }

/* Private anonymous mappings, by address (a table: a diagnostic, not a hot path). */
#define SLOTS 65536
static void *mapped[SLOTS];
static size_t lengths[SLOTS];
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);

void *mmap(void *want, size_t n, int prot, int flags, int fd, off_t offset) {
    if (!real_mmap) real_mmap = dlsym(RTLD_NEXT, "mmap");
    void *p = real_mmap(want, n, prot, flags, fd, offset);
    if (p != MAP_FAILED && (flags & MAP_ANONYMOUS) && !(flags & (MAP_SHARED | MAP_NORESERVE)) && n < (1L << 30))
        for (int i = 0; i < SLOTS; i++)
            if (!mapped[i]) { mapped[i] = p; lengths[i] = n; add((long)n); break; }
    return p;
}

int munmap(void *p, size_t n) {
    if (!real_munmap) real_munmap = dlsym(RTLD_NEXT, "munmap");
    for (int i = 0; i < SLOTS; i++)
        if (mapped[i] == p) { add(-(long)lengths[i]); mapped[i] = 0; break; }
    return real_munmap(p, n);
}

long gf_live(void) { return atomic_load(&live); }
long gf_peak(void) { return atomic_load(&peak); }
void gf_reset_peak(void) { atomic_store(&peak, atomic_load(&live)); }
