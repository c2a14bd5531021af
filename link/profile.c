/* Records which functions ran (SanitizerCoverage inline bool flags + pc table)
   and writes their link-time addresses to $REGCACHE_TEXT_PROFILE/<pid> at exit. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define MAXMOD 8192
static bool *fb[MAXMOD], *fe[MAXMOD]; static int nf;
static const uintptr_t *pb[MAXMOD], *pe[MAXMOD]; static int np;
extern char __ehdr_start;
/* Every module's constructor may pass the same (whole-section) range: keep each once. */
void __sanitizer_cov_bool_flag_init(bool *s, bool *e) {
  for (int i = 0; i < nf; i++) if (fb[i] == s) return;
  if (nf < MAXMOD) { fb[nf] = s; fe[nf++] = e; }
}
void __sanitizer_cov_pcs_init(const uintptr_t *s, const uintptr_t *e) {
  for (int i = 0; i < np; i++) if (pb[i] == s) return;
  if (np < MAXMOD) { pb[np] = s; pe[np++] = e; }
}
__attribute__((destructor)) static void dump(void) {
  const char *dir = getenv("REGCACHE_TEXT_PROFILE");
  if (!dir) return;
  char path[4096]; snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
  FILE *f = fopen(path, "w"); if (!f) return;
  for (int m = 0; m < nf && m < np; m++) {
    long n = fe[m] - fb[m];
    if ((pe[m] - pb[m]) / 2 != n) { fprintf(f, "# module %d: %ld flags, %ld pcs\n", m, n, (long)(pe[m] - pb[m]) / 2); continue; }
    for (long i = 0; i < n; i++) if (fb[m][i]) fprintf(f, "%lx\n", (unsigned long)(pb[m][2 * i] - (uintptr_t)&__ehdr_start));
  }
  fclose(f);
}
